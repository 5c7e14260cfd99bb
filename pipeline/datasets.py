"""In-memory batches of one split of a sequence table: reshuffled per epoch, split evenly across ranks.

Every rank gets the same number of batches (the sharded embedding's all-to-all needs every rank in every
step): the epoch's permutation is cut into global batches of `batch_size * world_size` rows and each
rank takes its slice. A last partial global batch is kept when it has at least one row per rank.
The streaming (Ray Data) source for logs larger than memory yields the same `Batch` type.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.collate import Batch, collate_arrow
from pipeline.sequences import SequenceData, eligible_rows


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
    ) -> None:
        self.data = data
        self.drop_last_items = drop_last_items
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.rows = eligible_rows(data, drop_last_items)
        self.skipped_users = data.num_users - len(self.rows)  # too short for this split; reported by the trainer

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        rows = self.rows
        if self.shuffle:
            rows = rows[np.random.default_rng((self.seed, epoch)).permutation(len(rows))]
        step = self.batch_size * self.world_size
        batches = [rows[i : i + step] for i in range(0, len(rows), step)]
        if batches and len(batches[-1]) < self.world_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        return len(self._global_batches(0))

    def num_rows(self) -> int:
        return len(self.rows)

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        for global_rows in self._global_batches(epoch)[start_batch:]:
            mine = np.array_split(global_rows, self.world_size)[self.rank]
            yield collate_arrow(self.data.table.take(mine), self.max_sequence_length, self.drop_last_items)
