"""`fuxi train --set data.protocol=temporal` end to end, and the nightly job's evaluation of its checkpoint
(the split itself: tests/unit/test_temporal.py)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa

from pipeline.data.sequences import write_sequences

D = 86400
C = int(dt.datetime(2024, 1, 5, tzinfo=dt.timezone.utc).timestamp())  # the cut: 2024-01-05 00:00 UTC


def test_fuxi_train_temporal_end_to_end(tmp_path, monkeypatch):
    from jobs.cli import main
    from pipeline.data.synthetic import SyntheticConfig, synthetic_sequences
    from serving.loading import evaluate_checkpoint, load_checkpoint_model

    monkeypatch.chdir(tmp_path)
    data = synthetic_sequences(
        SyntheticConfig(num_users=200, num_items=200, num_themes=10, mean_length=20, max_length=60)
    )
    # squeeze the synthetic year into 10 days: every day has events
    times = data.table.column("timestamps").combine_chunks()
    t = times.values.to_numpy()
    start = C - 8 * D
    squeezed = start + (t - t.min()) * (10 * D - 1) // (t.max() - t.min())
    data.table = data.table.set_column(
        2, "timestamps", pa.ListArray.from_arrays(times.offsets, pa.array(squeezed, pa.int64()))
    )
    path = write_sequences(data, tmp_path / "seq.parquet")

    keys = ("num_targets", "users/ndcg_at_10", "new_items/num_targets", "new_users/num_targets")
    common = [
        "train",
        "--preset",
        "tiny",
        "--set",
        "tracking.enabled=false",
        "--data",
        str(path),
        "--set",
        "epochs=1",
    ]
    out = tmp_path / "report.json"
    args = ["--set", "data.protocol=temporal", "--set", "data.cut=2024-01-05", "--report-json", str(out)]
    assert main(common + args) == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "temporal" and "test_is_valid" not in report
    assert all(k in report["test"] for k in keys)
    assert all(f"valid/{k}" in report["history"][0] for k in keys)
    # a valid target that is its user's first event cannot be ranked: one per user first seen in the window
    firsts = np.array([ts[0] for ts in data.table.column("timestamps").to_pylist()])
    first_seen_in_valid = int(((firsts >= C) & (firsts < C + D)).sum())
    assert report["skipped_users"]["valid"] == first_seen_in_valid

    # the nightly job's call: valid is the window right after the cut
    loaded = load_checkpoint_model(report["checkpoint"])
    overrides = ["data.protocol=temporal", "data.cut=2024-01-05", "data.window_seconds=86400"]
    metrics = evaluate_checkpoint(loaded, str(path), "valid", data_overrides=overrides)
    assert metrics["num_targets"] == report["history"][0]["valid/num_targets"]

    # the default cut (the newest day): no test window, the report's test is the valid window, flagged
    assert main(common + ["--set", "data.protocol=temporal", "--report-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["test_is_valid"] is True
    assert report["test"]["num_targets"] == report["history"][0]["valid/num_targets"]
