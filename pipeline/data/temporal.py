"""Temporal evaluation (`data.protocol=temporal`): a global time cut instead of leave-one-out by position.

  train  per user, the events with timestamp < cut (users with >= 2 of them), as ordinary sequence rows
  valid  one row per target event with cut <= t < cut + window: the user's events before it in the
         time-ordered sequence (earlier events inside the window included; ties at equal timestamps keep
         the sequence's order), then the target
  test   the same for [cut + window, cut + 2 * window), when that window has events

A target that is a user's very first event has no history and cannot be ranked: it is counted as skipped.
Every evaluation row carries tags (`TAG_NEW_ITEM`, `TAG_NEW_USER`): the target item, or the user, has no
event before the window's start anywhere in the data. Pure pyarrow/numpy; timestamps are unix seconds.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.data.collate import _list_parts, gather_ranges
from pipeline.data.schema import SEQUENCE_SCHEMA
from pipeline.data.sequences import SequenceData

DAY = 86400
TAG_NEW_ITEM, TAG_NEW_USER = 1, 2  # bits of the per-row tag


@dataclass
class EvalRows:
    """The evaluation rows of one window: `data.table` rows end with their target (drop nothing)."""

    data: SequenceData
    tags: np.ndarray  # int64 [rows]: TAG_NEW_ITEM | TAG_NEW_USER bits
    skipped: int  # targets without any earlier event of their user (not rankable)
    start: int
    end: int


def _utc_date(t: int) -> str:
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc).date().isoformat()


def _flat(data: SequenceData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets [users + 1], items, timestamps) of the sequence table."""
    offsets, items = _list_parts(data.table.column("item_ids"))
    t_offsets, times = _list_parts(data.table.column("timestamps"))
    if not np.array_equal(np.diff(offsets), np.diff(t_offsets)):
        raise ValueError("item_ids and timestamps have different lengths")
    n = offsets[-1] - offsets[0]
    items, times = items[offsets[0] : offsets[0] + n], times[t_offsets[0] : t_offsets[0] + n]
    return offsets - offsets[0], items, times


def time_range(data: SequenceData) -> str:
    _, _, times = _flat(data)
    if len(times) == 0:
        return "no events"
    return f"events from {_utc_date(times.min())} to {_utc_date(times.max())} (UTC)"


def resolve_cut(data: SequenceData, cut: str | int | dt.date | None, window_seconds: int = DAY) -> int:
    """The cut in unix seconds: a date or ISO date string (00:00 UTC), integer seconds (as a string or an
    int), "end": two windows before 00:00 UTC of the day after the newest event (valid and test are then
    the data's last two windows), or None: 00:00 UTC of the last day that has events."""
    if cut is None or cut == "end":
        _, _, times = _flat(data)
        if len(times) == 0:
            raise ValueError("data.cut: the data has no events")
        last_day = int(times.max()) // DAY * DAY
        return last_day if cut is None else last_day + DAY - 2 * window_seconds
    text = str(cut).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"data.cut={cut!r} is neither an ISO date (YYYY-MM-DD) nor integer unix seconds"
        ) from None
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())


def train_rows(data: SequenceData, cut: int) -> SequenceData:
    """Per user, the events before the cut (sequence order kept); users with >= 2 of them."""
    offsets, items, times = _flat(data)
    keep = times < cut
    row = np.repeat(np.arange(data.num_users), np.diff(offsets))
    counts = np.bincount(row[keep], minlength=data.num_users)
    users = np.flatnonzero(counts >= 2)
    keep &= counts[row] >= 2
    new_offsets = pa.array(np.r_[0, np.cumsum(counts[users])].astype(np.int32))
    table = pa.Table.from_arrays(
        [
            data.table.column("user_id").take(pa.array(users)).combine_chunks(),
            pa.ListArray.from_arrays(new_offsets, pa.array(items[keep], pa.int64())),
            pa.ListArray.from_arrays(new_offsets, pa.array(times[keep], pa.int64())),
        ],
        schema=SEQUENCE_SCHEMA,
    )
    return SequenceData(table=table, num_items=data.num_items, meta=data.meta, vocab=data.vocab)


def eval_rows(data: SequenceData, start: int, end: int, max_history: int | None = None) -> EvalRows:
    """One row per event with start <= t < end: the user's earlier events (at most `max_history`, the
    latest ones) followed by the event. Rows are in (user, position) order."""
    offsets, items, times = _flat(data)
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(data.num_users), lengths)
    pos = np.arange(len(items)) - offsets[row]
    in_window = (times >= start) & (times < end)
    targets = np.flatnonzero(in_window & (pos > 0))
    skipped = int((in_window & (pos == 0)).sum())
    first = offsets[row[targets]]
    if max_history is not None:
        first = np.maximum(first, targets - max_history)
    idx = gather_ranges(first, targets + 1)
    row_offsets = pa.array(np.r_[0, np.cumsum(targets + 1 - first)].astype(np.int32))
    user_ids = data.table.column("user_id").to_numpy()
    table = pa.Table.from_arrays(
        [
            pa.array(user_ids[row[targets]], pa.int64()),
            pa.ListArray.from_arrays(row_offsets, pa.array(items[idx], pa.int64())),
            pa.ListArray.from_arrays(row_offsets, pa.array(times[idx], pa.int64())),
        ],
        schema=SEQUENCE_SCHEMA,
    )
    before = times < start
    seen_items = np.unique(items[before])
    new_item = ~np.isin(items[targets], seen_items)
    new_user = np.bincount(row[before], minlength=data.num_users)[row[targets]] == 0
    tags = new_item.astype(np.int64) * TAG_NEW_ITEM | new_user.astype(np.int64) * TAG_NEW_USER
    rows = SequenceData(table=table, num_items=data.num_items, meta=data.meta, vocab=data.vocab)
    return EvalRows(rows, tags, skipped, start, end)


def temporal_split(
    data: SequenceData,
    cut: str | int | dt.date | None,
    window_seconds: int,
    max_history: int | None = None,
) -> tuple[SequenceData, dict[str, EvalRows]]:
    """(train rows, {"valid": ..., "test": ...}); "test" only when its window has events."""
    if window_seconds <= 0:
        raise ValueError(f"data.window_seconds must be > 0, got {window_seconds}")
    at = resolve_cut(data, cut, window_seconds)
    _, _, times = _flat(data)
    if not (times < at).any() or not ((times >= at) & (times < at + window_seconds)).any():
        where = "before the cut" if not (times < at).any() else "in the window after it"
        shown = str(cut) if isinstance(cut, dt.date) else repr(cut)
        raise ValueError(
            f"data.cut={shown} ({_utc_date(at)} {at}): no events {where} "
            f"(window_seconds={window_seconds}); the data has {time_range(data)}"
        )
    splits = {"valid": eval_rows(data, at, at + window_seconds, max_history)}
    if ((times >= at + window_seconds) & (times < at + 2 * window_seconds)).any():
        splits["test"] = eval_rows(data, at + window_seconds, at + 2 * window_seconds, max_history)
    return train_rows(data, at), splits
