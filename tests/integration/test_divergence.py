"""A run whose loss stops being finite ends at that step in one line and leaves the last good checkpoint,
`best` and `final` exactly as they were; its MLflow run is marked failed, never finished."""

from __future__ import annotations

import hashlib

import mlflow
import pytest

from jobs.cli import main
from pipeline.train.checkpoint import Checkpointer, read_meta

pytestmark = pytest.mark.slow


def _tree_digest(root):
    """Every file under the checkpoint folder (links resolved by name), with its bytes' hash."""
    return {
        str(p.relative_to(root)): (
            p.readlink().as_posix() if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def test_a_run_that_diverges_at_step_n_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    common = ["train", "--preset", "tiny", "--set", "run_dir=runs/x"]
    assert main([*common, "--set", "epochs=1"]) == 0
    ckpt = tmp_path / "runs" / "x" / "checkpoints"
    before = _tree_digest(ckpt)
    latest = Checkpointer(ckpt).latest()
    assert read_meta(latest)["trainer"]["step"] == 4  # 200 users / 64 a batch: 4 steps an epoch
    capsys.readouterr()

    # the second epoch's first step divides the logits by a temperature that makes them infinite
    rc = main([*common, "--set", "resume=true", "--set", "epochs=2", "--set", "loss.temperature=1e-45"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [
        "fuxi: error: training loss is nan at step 5 (epoch 2); stopped, the last checkpoint is unchanged"
    ]
    assert _tree_digest(ckpt) == before
    assert Checkpointer(ckpt).latest() == latest

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs(client.get_experiment_by_name("fuxi-alpha").experiment_id)
    assert len(runs) == 1  # the resumed attempt continues the job's one run
    assert runs[0].info.status == "FAILED"
    losses = [m.value for m in client.get_metric_history(runs[0].info.run_id, "train/epoch_loss")]
    assert len(losses) == 1  # the diverged epoch logged no epoch loss
