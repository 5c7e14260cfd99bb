"""In-memory batches of one split of a sequence table: reshuffled per epoch, split evenly across ranks.

Every rank gets the same number of batches (the sharded embedding's all-to-all needs every rank in every
step): the epoch's permutation is cut into global batches of `batch_size * world_size` rows and each
rank takes its slice. A last partial global batch is kept when it has at least one row per rank.
The streaming (Ray Data) source for logs larger than memory yields the same `Batch` type.

Token budgets (`batch_tokens > 0`, training only): instead of `batch_size` users, a global batch holds as
many users as fit in `batch_tokens * world_size` supervised positions (histories after truncation), so a
step costs about the same whatever the length mix: a batch of short histories holds more users. Each
rank takes every world_size-th row of the batch sorted by length, which balances tokens across ranks.
The loss is the mean over the global batch's positions either way (pipeline/train/trainer.py).

Position: (epoch, batches yielded in that epoch), kept as batches are yielded; `state_dict()` records it
with the plan it belongs to and a checkpoint stores it (pipeline/train/trainer.py). The global batches of an
epoch depend only on the rows, the seed and the global batch (`batch_size * world_size` rows, or
`batch_tokens * world_size` positions), so a position continues exactly on another world size with the
same global batch; at an epoch boundary any plan continues.

Temporal evaluation (`temporal_batches`, pipeline/data/temporal.py): the train split is a SequenceBatches
over the pre-cut rows; each evaluation split is one over rows that end with their target, with per-row
`tags` that every batch carries (Batch.tags) for the grouped metrics of pipeline/train/evaluate.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.data.collate import Batch, collate_arrow
from pipeline.data.sequences import SequenceData, eligible_rows, token_budget_cuts
from pipeline.data.temporal import temporal_split


class SequenceBatches:
    def __init__(
        self,
        data: SequenceData,
        drop_last_items: int,
        batch_size: int,
        max_sequence_length: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_tokens: int = 0,
        tags: np.ndarray | None = None,  # per row of data.table, carried by every batch (Batch.tags)
        skipped: int = 0,  # rows of the source data left out before these (reported with skipped_users)
    ) -> None:
        if batch_tokens and batch_tokens < 2 * max_sequence_length:
            # with >= 2 full histories per rank, every global batch but the last has >= world_size rows
            raise ValueError(
                f"batch_tokens={batch_tokens} must be at least 2 * max_sequence_length = "
                f"{2 * max_sequence_length}"
            )
        self.data = data
        self.drop_last_items = drop_last_items
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_tokens = batch_tokens
        self.rows = eligible_rows(data, drop_last_items)
        # supervised positions of each eligible row: history after dropping and truncation
        self.tokens = np.minimum(data.lengths()[self.rows] - drop_last_items, max_sequence_length + 1) - 1
        # too short for this split (temporal: targets without history); reported by the trainer
        self.skipped_users = data.num_users - len(self.rows) + skipped
        self.tags = tags
        self._num_batches: int | None = None
        self._epoch, self._batch = 0, 0

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        order = np.arange(len(self.rows))
        if self.shuffle:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))
        rows = self.rows[order]
        if self.batch_tokens:  # cut where the running token count crosses a multiple of the budget
            cuts = token_budget_cuts(self.tokens[order], self.batch_tokens * self.world_size)
            batches = [
                b[np.argsort(-self.tokens[o], kind="stable")]
                for b, o in zip(np.split(rows, cuts), np.split(order, cuts))
            ]
        else:
            step = self.batch_size * self.world_size
            batches = [rows[i : i + step] for i in range(0, len(rows), step)]
        if batches and len(batches[-1]) < self.world_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        """Batches in epoch 0 (with batch_tokens the count can differ by one or two between epochs)."""
        if self._num_batches is None:
            self._num_batches = len(self._global_batches(0))
        return self._num_batches

    def num_rows(self) -> int:
        return len(self.rows)

    # -- position -------------------------------------------------------------------------------------------
    def _plan_key(self) -> dict[str, Any]:
        return {
            "rows": len(self.rows),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch": self.batch_size * self.world_size,
            "global_tokens": self.batch_tokens * self.world_size,
            "drop_last_items": self.drop_last_items,
            "max_sequence_length": self.max_sequence_length,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batch": self._batch, **self._plan_key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a recorded position; mid-epoch only with the plan that recorded it."""
        if int(state["batch"]):
            key = self._plan_key()
            if not key["global_tokens"]:  # batch_size does not shape the batches under a token budget
                key.pop("global_tokens")
            else:
                key.pop("global_batch")
            diff = {k: (state.get(k), v) for k, v in key.items() if state.get(k) != v}
            if diff:
                raise ValueError(
                    f"cannot resume mid-epoch exactly: the recorded plan differs in {diff} "
                    "(recorded, now); resume with the same data, seed and global batch"
                )
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        batches = self._global_batches(epoch)
        for k, global_rows in enumerate(batches[start_batch:], start=start_batch + 1):
            if self.batch_tokens:  # sorted by length: dealing round robin balances tokens
                mine = global_rows[self.rank :: self.world_size]
            else:
                mine = np.array_split(global_rows, self.world_size)[self.rank]
            self._epoch, self._batch = (epoch + 1, 0) if k == len(batches) else (epoch, k)
            yield self.collate(mine)

    def collate(self, rows: np.ndarray) -> Batch:
        """The batch of these rows of data.table, with their tags."""
        batch = collate_arrow(self.data.table.take(rows), self.max_sequence_length, self.drop_last_items)
        if self.tags is not None:
            batch.tags = torch.from_numpy(self.tags[rows].astype(np.int64))
        return batch


def temporal_batches(
    data: SequenceData,
    cut: str | int | dt.date | None,
    window_seconds: int,
    batch_size: int,
    eval_batch_size: int,
    max_sequence_length: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_tokens: int = 0,
) -> dict[str, SequenceBatches]:
    """The splits of `data.protocol=temporal`: train before the cut, valid (and test) windows after it."""
    train, windows = temporal_split(data, cut, window_seconds, max_history=max_sequence_length)
    splits = {
        "train": SequenceBatches(
            train,
            0,
            batch_size,
            max_sequence_length,
            shuffle=True,
            seed=seed,
            rank=rank,
            world_size=world_size,
            batch_tokens=batch_tokens,
            skipped=data.num_users - train.num_users,
        )
    }
    for name, rows in windows.items():
        splits[name] = SequenceBatches(
            rows.data,
            0,
            eval_batch_size,
            max_sequence_length,
            shuffle=False,
            seed=seed,
            rank=rank,
            world_size=world_size,
            tags=rows.tags,
            skipped=rows.skipped,
        )
    return splits
