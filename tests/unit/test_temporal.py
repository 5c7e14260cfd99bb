"""Temporal evaluation (data.protocol=temporal): exact splits on hand-written events, the grouped metrics
on a planted case, plain and sharded evaluation agreeing (`fuxi train` end to end:
tests/integration/test_temporal_training.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data.sequences import SequenceData
from pipeline.data.temporal import TAG_NEW_ITEM, TAG_NEW_USER, resolve_cut, temporal_split
from pipeline.train.config import apply_overrides
from pipeline.train.evaluate import evaluate
from pipeline.train.presets import tiny
from pipeline.train.run import build_batches

D = 86400
C = int(dt.datetime(2024, 1, 5, tzinfo=dt.timezone.utc).timestamp())  # the cut: 2024-01-05 00:00 UTC
NI, NU = TAG_NEW_ITEM, TAG_NEW_USER

# user -> [(item, timestamp)] in sequence order
EVENTS = {
    10: [(1, C - 2 * D), (2, C - 100), (3, C), (4, C), (5, C + D + 10)],  # a tie at the cut timestamp
    20: [(2, C - 50), (6, C + 100)],  # one event before the cut: no training row
    30: [(7, C + 10), (1, C + 20), (6, C + 30)],  # first seen in the window; item 7 cannot be ranked
    40: [(1, C - 3 * D), (3, C - D), (8, C - 10)],  # only before the cut
}


def hand_data() -> SequenceData:
    table = pa.table(
        {
            "user_id": pa.array(list(EVENTS), pa.int64()),
            "item_ids": pa.array([[i for i, _ in ev] for ev in EVENTS.values()], pa.list_(pa.int64())),
            "timestamps": pa.array([[t for _, t in ev] for ev in EVENTS.values()], pa.list_(pa.int64())),
        }
    )
    return SequenceData(table=table, num_items=9)


def rows(split) -> list[tuple[int, list[int], list[int]]]:
    return [(r["user_id"], r["item_ids"], r["timestamps"]) for r in split.data.table.to_pylist()]


def test_cut_resolution():
    data = hand_data()
    assert resolve_cut(data, "2024-01-05") == C
    assert resolve_cut(data, str(C + 7)) == C + 7
    assert resolve_cut(data, None) == C + D  # 00:00 UTC of the newest day with events
    # "end": valid and test are the last two windows, the test one ending at the newest day's end
    assert resolve_cut(data, "end", D) == C
    assert resolve_cut(data, "end", 3 * D) == C + 2 * D - 6 * D
    with pytest.raises(ValueError, match="data.cut='5 Jan'"):
        resolve_cut(data, "5 Jan")


def test_temporal_split_exact_rows_targets_tags_and_no_leakage():
    data = hand_data()
    train, windows = temporal_split(data, "2024-01-05", D)
    assert train.table.to_pylist() == [
        {"user_id": 10, "item_ids": [1, 2], "timestamps": [C - 2 * D, C - 100]},
        {"user_id": 40, "item_ids": [1, 3, 8], "timestamps": [C - 3 * D, C - D, C - 10]},
    ]
    # no training row holds an event at or after the cut
    assert max(t for r in train.table.to_pylist() for t in r["timestamps"]) < C

    valid = windows["valid"]
    assert (valid.start, valid.end) == (C, C + D)
    assert rows(valid) == [
        (10, [1, 2, 3], [C - 2 * D, C - 100, C]),
        (10, [1, 2, 3, 4], [C - 2 * D, C - 100, C, C]),  # the earlier event at the same timestamp counts
        (20, [2, 6], [C - 50, C + 100]),
        (30, [7, 1], [C + 10, C + 20]),
        (30, [7, 1, 6], [C + 10, C + 20, C + 30]),  # earlier events inside the window count
    ]
    # item 3 has an event before the cut (user 40): not new; 4 and 6 have none; user 30 has none
    assert valid.tags.tolist() == [0, NI, NI, NU, NI | NU]
    assert valid.skipped == 1  # user 30's first event (item 7)

    test = windows["test"]
    assert rows(test) == [(10, [1, 2, 3, 4, 5], [C - 2 * D, C - 100, C, C, C + D + 10])]
    assert test.tags.tolist() == [NI] and test.skipped == 0
    # every evaluation target is at or after the cut
    assert min(r[2][-1] for r in rows(valid) + rows(test)) >= C

    # histories are truncated like every history: the latest max_history events
    _, short = temporal_split(data, str(C), D, max_history=1)
    assert [r[1] for r in rows(short["valid"])] == [[2, 3], [3, 4], [2, 6], [7, 1], [1, 6]]

    # the default cut: the newest day is the valid window and there is no test window
    _, last = temporal_split(data, None, D)
    assert sorted(last) == ["valid"] and rows(last["valid"])[0][1][-1] == 5


def test_temporal_split_errors_name_the_cut_and_the_time_range():
    data = hand_data()
    for cut in ("2023-01-01", "2024-03-01"):
        with pytest.raises(ValueError, match=r"data.cut=.*2024-01-02 to 2024-01-06 \(UTC\)") as exc:
            temporal_split(data, cut, D)
        assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="window_seconds must be > 0"):
        temporal_split(data, "2024-01-05", 0)


def test_build_batches_temporal_splits_ranks_and_stream(tmp_path):
    cfg = tiny()
    apply_overrides(cfg, ["data.protocol=temporal", "data.cut=2024-01-05", "data.window_seconds=86400"])
    splits = build_batches(cfg, hand_data())
    assert sorted(splits) == ["test", "train", "valid"]
    assert splits["train"].num_rows() == 2 and splits["valid"].num_rows() == 5
    assert splits["valid"].skipped_users == 1
    batch = next(iter(splits["valid"].epoch()))
    assert batch.tags.tolist() == [0, NI, NI, NU, NI | NU]
    # the train split splits across ranks and keeps a resumable position
    two = [build_batches(cfg, hand_data(), rank, 2)["train"] for rank in (0, 1)]
    users = sorted(int(u) for b in two for batch in b.epoch() for u in batch.user_ids)
    assert users == [10, 40]
    state = two[0].state_dict()
    assert state["epoch"] == 1 and state["rows"] == 2
    two[1].load_state_dict(state)
    cfg.data.stream = True
    with pytest.raises(ValueError, match="data.stream is not supported with data.protocol=temporal"):
        build_batches(cfg, hand_data())


class _FixedScores(torch.nn.Module):
    """Item i scores -i for every user: item 1 first. The ranks of the hand valid window are then
    [1, 1, 5, 1, 5] (history and padding are filtered)."""

    def encode_last(self, seq) -> torch.Tensor:
        return torch.ones(seq["item_id"].lengths().numel(), 1)

    def normalized_item_embeddings(self) -> torch.Tensor:
        return -torch.arange(9, dtype=torch.float32)[:, None]


def test_grouped_metrics_on_a_planted_case():
    cfg = tiny()
    apply_overrides(cfg, ["data.protocol=temporal", "data.cut=2024-01-05"])
    valid = build_batches(cfg, hand_data())["valid"]
    valid.batch_size = 2  # several batches: the aggregation spans them
    m = evaluate(_FixedScores(), valid.epoch())
    # ranks 1, 1, 5 (user 20), 1, 5 (users 10, 10, 20, 30, 30)
    assert m["num_targets"] == m["num_users"] == 5
    assert m["mrr"] == pytest.approx((1 + 1 + 0.2 + 1 + 0.2) / 5)  # 0.68 over targets
    assert m["users/mrr"] == pytest.approx((1.0 + 0.2 + 0.6) / 3)  # 0.6 over users
    n5 = 1 / math.log2(6)
    assert m["ndcg_at_10"] == pytest.approx((3 + 2 * n5) / 5)
    assert m["users/ndcg_at_10"] == pytest.approx((1 + n5 + (1 + n5) / 2) / 3)
    assert m["hr_at_10"] == m["users/hr_at_10"] == 1.0
    assert m["new_items/num_targets"] == 3 and m["new_items/mrr"] == pytest.approx(1.4 / 3)
    assert m["new_users/num_targets"] == 2 and m["new_users/mrr"] == pytest.approx(0.6)

    # a group without targets: count 0, no metrics
    valid.tags = np.zeros_like(valid.tags)
    m = evaluate(_FixedScores(), valid.epoch())
    assert m["new_items/num_targets"] == 0 and m["new_users/num_targets"] == 0
    assert not any(k.startswith(("new_items/", "new_users/")) and "num" not in k for k in m)


def test_leave_one_out_metrics_keep_their_keys():
    cfg = tiny()
    m = evaluate(_FixedScores(), build_batches(cfg, hand_data())["test"].epoch())
    assert sorted(m) == ["hr_at_10", "hr_at_50", "mrr", "ndcg_at_10", "ndcg_at_50", "num_users"]


def test_evaluate_and_evaluate_sharded_agree():
    from pipeline.train.builder import build_parallel_model
    from pipeline.train.distributed import init_distributed, teardown
    from pipeline.train.evaluate import evaluate_sharded

    cfg = tiny()
    apply_overrides(cfg, ["data.protocol=temporal", "data.cut=2024-01-05"])
    cfg.model = dataclasses.replace(cfg.model, num_items=9)
    valid = build_batches(cfg, hand_data())["valid"]
    valid.batch_size = 2
    ctx = init_distributed("cpu")
    try:
        pm = build_parallel_model(cfg.model, cfg.parallel, cfg.optim, torch.device("cpu"), cfg.seed)
        plain = evaluate(pm.model, valid.epoch())
        sharded = evaluate_sharded(pm, valid)
    finally:
        teardown(ctx)
    assert sorted(plain) == sorted(sharded)
    assert "users/ndcg_at_10" in plain and "new_users/mrr" in plain
    for key in plain:
        assert sharded[key] == pytest.approx(plain[key], abs=1e-9), key


def test_bucket_coverage_counts_each_window_pairs_by_time_gap_bucket() -> None:
    """benchmarks/diagnose_fuxi.py buckets: each window's (target, key) pairs by gap bucket
    b = floor(ln(dt) / 0.301), the keys a target's last `max_len` events."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("diagnose_fuxi", "benchmarks/diagnose_fuxi.py")
    assert spec is not None and spec.loader is not None
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)

    counts = diagnose.bucket_coverage(hand_data(), C, D, max_len=2, num_buckets=128, divisor=0.301)
    # train: user 10's C-100 (key C-2D: 2D-100 -> 40); user 40's C-D (2D -> 40) and C-10 (3D-10 -> 41,
    # D-10 -> 37). valid [C, C+D): user 10's two at C (2D -> 40, 100 -> 15; 100 -> 15, 0 -> 0), user 20's
    # C+100 (150 -> 16), user 30's C+20 (10 -> 7) and C+30 (20 -> 9, 10 -> 7). test: user 10's C+D+10,
    # keys the two events at C (D+10 -> 37 twice).
    expected = {
        "train": {40: 2, 41: 1, 37: 1},
        "valid": {40: 1, 15: 2, 0: 1, 16: 1, 7: 2, 9: 1},
        "test": {37: 2},
    }
    got = {split: {int(b): int(c[b]) for b in np.flatnonzero(c)} for split, c in counts.items()}
    assert got == expected
    assert all(len(c) == 129 for c in counts.values())
