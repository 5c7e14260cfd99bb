"""Sequence format, split windows, Arrow -> KJT collate, and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.batches import SequenceBatches
from pipeline.data.collate import collate_arrow
from pipeline.data.sequences import SequenceData, events_to_sequences, read_sequences, write_sequences
from pipeline.data.synthetic import SyntheticConfig, generate_events, synthetic_sequences

EVENTS = pa.table(
    {
        "user_id": [2, 1, 1, 2, 1, 1, 2],
        "item_id": [9, 5, 3, 8, 4, 7, 6],
        "timestamp": [50, 20, 10, 40, 10, 30, 60],  # user 1 has a tie at t=10: item 3 before item 4
    }
)


def test_events_to_sequences_orders_by_time_ties_in_row_order():
    seq = events_to_sequences(EVENTS)
    assert seq["user_id"].to_pylist() == [1, 2]
    assert seq["item_ids"].to_pylist() == [[3, 4, 5, 7], [8, 9, 6]]
    assert seq["timestamps"].to_pylist() == [[10, 10, 20, 30], [40, 50, 60]]
    # the tie at t=10 in the other row order: the sequence follows the rows, not the item ids
    swapped = EVENTS.take([0, 1, 4, 3, 2, 5, 6])
    assert events_to_sequences(swapped)["item_ids"].to_pylist() == [[4, 3, 5, 7], [8, 9, 6]]
    strings = swapped.set_column(0, "user_id", pa.array(["b", "a", "a", "b", "a", "a", "b"]))
    assert events_to_sequences(strings)["item_ids"].to_pylist() == [[4, 3, 5, 7], [8, 9, 6]]


def test_write_read_roundtrip_keeps_num_items(tmp_path):
    data = SequenceData(events_to_sequences(EVENTS), num_items=10, meta={"source": "test"})
    path = write_sequences(data, tmp_path / "s.parquet")
    back = read_sequences(path)
    assert back.num_items == 10 and back.meta["source"] == "test"
    assert back.table.equals(data.table)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_sequences(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        read_sequences(bad)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": [1], "item_ids": [[1, 2]]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"nocol.parquet.*timestamps"):
        read_sequences(tmp_path / "nocol.parquet")


def test_collate_windows_drop_last_and_truncation():
    table = events_to_sequences(EVENTS)
    # drop the last item (anchor training row), keep at most max_len + 1 = 3 items
    batch = collate_arrow(table, max_sequence_length=2, drop_last=1)
    ids = batch.seq["item_id"]
    assert ids.lengths().tolist() == [3, 2]
    assert ids.values().tolist() == [3, 4, 5, 8, 9]
    assert batch.seq["timestamp"].values().tolist() == [10, 10, 20, 40, 50]
    assert batch.user_ids.tolist() == [1, 2]
    # a slice of the table (offsets not starting at 0) gives the same rows
    sliced = collate_arrow(table.slice(1, 1), max_sequence_length=5, drop_last=0)
    assert sliced.seq["item_id"].values().tolist() == [8, 9, 6]
    with pytest.raises(ValueError, match="row 1"):
        collate_arrow(table, max_sequence_length=5, drop_last=2)


def test_batches_split_evenly_across_ranks_and_cover_each_row_once():
    data = synthetic_sequences(SyntheticConfig(num_users=101, num_items=60, num_themes=5, mean_length=8))
    seen, counts = [], []
    for rank in range(3):
        b = SequenceBatches(
            data, 1, batch_size=8, max_sequence_length=20, shuffle=True, seed=1, rank=rank, world_size=3
        )
        batches = list(b.epoch(0))
        counts.append(len(batches))
        seen += [u for batch in batches for u in batch.user_ids.tolist()]
    assert len(set(counts)) == 1  # same number of steps on every rank
    assert sorted(seen) == sorted(data.table["user_id"].to_pylist())


def test_synthetic_generator_is_deterministic_and_planted():
    cfg = SyntheticConfig(num_users=300, num_items=200, num_themes=10, mean_length=30, seed=7)
    a, b = generate_events(cfg), generate_events(cfg)
    assert a.equals(b)
    assert not a.equals(generate_events(SyntheticConfig(**{**cfg.__dict__, "seed": 8})))
    data = synthetic_sequences(cfg)
    lengths = data.lengths()
    assert abs(lengths.mean() - 30) < 5 and lengths.max() > 2 * lengths.mean()  # long tail
    items = np.concatenate(data.table["item_ids"].to_pylist())
    counts = np.sort(np.bincount(items, minlength=201)[1:])[::-1]
    assert counts[:20].sum() > 4 * counts[-20:].sum()  # power-law popularity (softened by no-repeat draws)
    for row in data.table["item_ids"].to_pylist():
        assert len(row) == len(set(row))  # no repeats within a user


def test_token_budget_batches_cover_every_row_once_with_bounded_tokens():
    """batch_tokens: each global batch holds about the budget in positions (at most one history over it),
    every rank steps the same number of times, every user is trained on once per epoch (but a last batch
    with fewer rows than ranks, as in the fixed-size mode), and ranks get balanced token counts."""
    data = synthetic_sequences(
        SyntheticConfig(num_users=300, num_items=100, num_themes=5, mean_length=25, max_length=80, seed=3)
    )
    max_len, budget, world = 40, 100, 3
    ranks = [
        SequenceBatches(
            data,
            1,
            batch_size=8,
            max_sequence_length=max_len,
            shuffle=True,
            seed=2,
            rank=r,
            world_size=world,
            batch_tokens=budget,
        )
        for r in range(world)
    ]
    steps = list(
        zip(*[list(b.epoch(1)) for b in ranks], strict=True)
    )  # strict: same step count on every rank
    assert len(steps) == len(ranks[0]) > 10
    seen = []
    for k, step in enumerate(steps):
        tokens = [int(b.history_lengths().sum()) for b in step]
        assert sum(tokens) <= budget * world + max_len
        if k < len(steps) - 1:
            assert sum(tokens) > budget * world - max_len
        assert max(tokens) - min(tokens) <= max_len  # dealt round robin over length-sorted rows
        seen += [u for b in step for u in b.user_ids.tolist()]
    assert len(seen) == len(set(seen))
    eligible = set(data.table["user_id"].take(ranks[0].rows).to_pylist())
    assert set(seen) <= eligible and len(eligible - set(seen)) < world
    with pytest.raises(ValueError, match="batch_tokens=50 must be at least 2 \\* max_sequence_length = 80"):
        SequenceBatches(data, 1, 8, max_len, shuffle=True, batch_tokens=50)


def test_token_budget_cuts_by_hand():
    """Running totals 3, 7, 9, 14, 15 against a budget of 6: a batch ends where the total crosses 6 and 12."""
    from pipeline.data.sequences import token_budget_cuts

    tokens = np.array([3, 4, 2, 5, 1])
    cuts = token_budget_cuts(tokens, 6)
    assert cuts.tolist() == [1, 3]
    assert [b.tolist() for b in np.split(tokens, cuts)] == [[3], [4, 2], [5, 1]]
    assert token_budget_cuts(np.array([6, 6, 6]), 6).tolist() == [1, 2]  # exactly full batches
