"""Arrow sequence rows -> `Batch` (a KeyedJaggedTensor of item ids and timestamps). No Ray import.

Each batch row is one user's history followed by its target: the last `max_sequence_length + 1` items
that remain after dropping `drop_last` trailing items (the split protocol). Vectorised over the Arrow
list offsets: no per-row Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from pipeline.data.schema import ITEM_FEATURE, TIME_FEATURE


class _DropFxTracingNotice(logging.Filter):
    """torchrec's JaggedTensor and KeyedJaggedTensor are built through torch.fx's ProxyableClassMeta, whose
    __call__ asks the deprecated torch.fx.is_fx_tracing() on every construction; the first call logs (once
    per process, at the first batch) a notice addressed to the caller of is_fx_tracing, i.e. torch itself.
    Nothing here traces, so only that one message of that logger is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("is_fx_tracing will return true for both fx.symbolic_trace")


logging.getLogger("torch.fx._symbolic_trace").addFilter(_DropFxTracingNotice())


@dataclass
class Batch(Pipelineable):
    seq: KeyedJaggedTensor  # keys (item_id, timestamp); per user: history + target
    user_ids: Tensor  # [B]
    # [B] int64 evaluation tags of temporal rows (pipeline/data/temporal.py: new item / new user bits);
    # None for leave-one-out rows
    tags: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.user_ids.numel())

    def history_lengths(self) -> Tensor:
        return self.seq[ITEM_FEATURE].lengths().long() - 1

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            self.seq.to(device, non_blocking=non_blocking),
            self.user_ids.to(device, non_blocking=non_blocking),
            None if self.tags is None else self.tags.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        # Pipelineable takes a torch.Stream, KeyedJaggedTensor a torch.cuda.Stream: the same object on CUDA
        self.seq.record_stream(stream)  # pyrefly: ignore[bad-argument-type]
        self.user_ids.record_stream(stream)
        if self.tags is not None:
            self.tags.record_stream(stream)

    def pin_memory(self) -> Batch:
        tags = None if self.tags is None else self.tags.pin_memory()
        return Batch(self.seq.pin_memory(), self.user_ids.pin_memory(), tags)


def _list_parts(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(absolute offsets [rows + 1], flat values) of a list column, honouring slices."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = column.offsets.to_numpy()
    return offsets.astype(np.int64), column.values.to_numpy(zero_copy_only=False)


def window(offsets: np.ndarray, drop_last: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row [start, end) of the kept window: drop `drop_last` items, keep the last max_len + 1."""
    end = offsets[1:] - drop_last
    start = np.maximum(offsets[:-1], end - (max_len + 1))
    return start, np.maximum(end, start)


def gather_ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    lengths = end - start
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(start - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return shift + np.arange(lengths.sum())


def collate_arrow(rows: pa.Table | pa.RecordBatch, max_sequence_length: int, drop_last: int = 0) -> Batch:
    """Sequence rows -> Batch. Rows left with fewer than 2 items (no target) are an error: filter first."""
    offsets, items = _list_parts(rows.column("item_ids"))
    t_offsets, times = _list_parts(rows.column("timestamps"))
    if not np.array_equal(np.diff(offsets), np.diff(t_offsets)):
        bad = int(np.flatnonzero(np.diff(offsets) != np.diff(t_offsets))[0])
        raise ValueError(f"row {bad}: item_ids and timestamps have different lengths")
    start, end = window(offsets, drop_last, max_sequence_length)
    lengths = end - start
    if (lengths < 2).any():
        bad = int(np.flatnonzero(lengths < 2)[0])
        raise ValueError(f"row {bad} has {lengths[bad]} item(s) after dropping {drop_last}: need >= 2")
    idx = gather_ranges(start, end)
    shift = t_offsets[0] - offsets[0]
    values = torch.from_numpy(np.concatenate([items[idx], times[idx + shift]]).astype(np.int64))
    lengths_t = torch.from_numpy(np.concatenate([lengths, lengths]).astype(np.int32))
    seq = KeyedJaggedTensor.from_lengths_sync(
        keys=[ITEM_FEATURE, TIME_FEATURE], values=values, lengths=lengths_t
    )
    users = rows.column("user_id")
    if pa.types.is_integer(users.type):
        user_ids = torch.from_numpy(users.to_numpy().astype(np.int64))
    else:  # string user ids: positions (nothing downstream reads user ids)
        user_ids = torch.arange(rows.num_rows, dtype=torch.int64)
    return Batch(seq=seq, user_ids=user_ids)
