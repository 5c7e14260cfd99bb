"""The nightly job on an open world: synthetic logs with hashed 64-bit item ids and new items every day.

One bootstrap date (no earlier day: the preset's leave-one-out protocol, a cold start), then five dates that
each extend the vocabulary and the sequences, grow the item table, warm-start from the champion, and score
candidate and champion on the date's events, which neither trained on. Real MLflow (SQLite), real TorchX
`local_cwd` training jobs, real Ray Data builds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.nightly import NightlyConfig, run_nightly
from jobs.report import timeline_frame
from pipeline.data.synth_logs import LogConfig, write_logs
from pipeline.data.vocab import find_vocabulary, read_vocabulary
from pipeline.train.tracking import mlflow_client
from serving import registry
from serving.loading import load_checkpoint_model

MODEL = "fuxi-open-world"
DATES = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05", "2024-01-06"]

pytestmark = pytest.mark.usefixtures("ray_local")  # tests/conftest.py


@pytest.fixture
def tracking(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    yield uri
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.slow
def test_five_nightly_dates_grow_warm_start_and_serve_new_items(tmp_path: Path, tracking: str) -> None:
    logs = tmp_path / "logs"
    write_logs(
        LogConfig(
            num_users=150,
            num_items=120,
            num_themes=10,
            num_days=len(DATES),
            num_events=12_000,
            new_items_per_day=12,
            item_ids="hashed",
            seed=3,
        ),
        logs,
        progress=False,
    )
    workdir = tmp_path / "nightly"
    states = []
    for date in DATES:
        cfg = NightlyConfig(
            date=date,
            workdir=workdir,
            preset="tiny",
            model_name=MODEL,
            overrides=["epochs=3", "optim.lr=0.005"],
            tracking_uri=tracking,
            logs_dir=logs,
            demo_data=False,
        )
        states.append(run_nightly(cfg))

    boot, *days = states
    assert boot["steps"]["evaluate"]["outputs"]["window"].startswith("bootstrap")
    assert boot["steps"]["train"]["outputs"]["init_version"] is None  # nothing to warm-start from
    rows = [s["steps"]["update_sequences"]["outputs"]["manifest"]["num_items"] for s in states]
    assert rows == sorted(rows) and rows[-1] > rows[0]  # the table grows with the catalogue
    for date, s in zip(DATES[1:], days):
        train = s["steps"]["train"]["outputs"]
        assert train["init_version"] is not None and train["cold_start_reason"] is None, (date, train)
        measured = s["steps"]["evaluate"]["outputs"]
        assert "data.cut=" + date in measured["window"]
        cand, champ = measured["candidate"], measured["champion"]
        assert cand["num_targets"] > 0 and cand["new_items/num_targets"] > 0, date
        # both models are scored on the same window: the same targets, new-item targets and users
        for key in ("num_targets", "new_items/num_targets", "new_users/num_targets", "num_users"):
            assert cand[key] == champ[key], (date, key)

    # new items reach the champion's top-k, returned as raw (hashed 64-bit) ids
    client = mlflow_client(tracking)
    champ = registry.champion(client, MODEL)
    ckpt = registry.version_checkpoint(client, MODEL, champ.version, tmp_path / "champion")
    loaded = load_checkpoint_model(ckpt)
    vocab = read_vocabulary(find_vocabulary(workdir / "sequences"))
    assert loaded.vocab is not None and loaded.vocab.num_rows <= vocab.num_rows
    table = vocab.table.to_pylist()
    first_day = {r["raw_id"]: r["first_day"] for r in table if r["row"] is not None}
    histories = [[r["raw_id"] for r in table[i : i + 5] if r["row"] is not None] for i in range(0, 100, 5)]
    ids, _, ignored = loaded.top_k([h for h in histories if h], k=10)
    flat = [i for user in ids for i in user]
    assert all(i in first_day for i in flat) and not any(ignored)
    assert any(first_day[i] > DATES[0] for i in flat), "no item first seen after the first day"

    # the timeline: one row per date, next-day metrics of both models; the report command plots it
    frame = timeline_frame(client, "fuxi-nightly", MODEL)
    assert list(frame.index) == DATES
    assert frame.loc[DATES[1:], "candidate/new_items/num_targets"].gt(0).all()
    assert frame["warm_start"].tolist() == [0.0] + [1.0] * len(days)
    out = tmp_path / "report"
    assert (
        main(["report", "--nightly", "--model-name", MODEL, "--out", str(out), "--tracking-uri", tracking])
        == 0
    )
    assert (out / "nightly_report.png").stat().st_size > 0
    data = json.loads((out / "nightly_report.json").read_text())
    assert sorted(data) == DATES
