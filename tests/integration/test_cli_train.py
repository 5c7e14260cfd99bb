"""End to end through the `fuxi` CLI.

Train the tiny preset, find the MLflow run, re-evaluate the checkpoint.
"""

from __future__ import annotations

import json

import pytest

from jobs.cli import main


def test_fuxi_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "data", "presets"):
        assert command in out


def test_unknown_override_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(["train", "--preset", "tiny", "--set", "tracking.enabled=false", "--set", "model.num_layerz=3"])
        == 2
    )
    assert "model.num_layerz" in capsys.readouterr().err


def test_unknown_amp_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "tiny", "--set", "tracking.enabled=false", "--set", "amp=fp8"]) == 2
    assert "fuxi: error: amp must be one of 'auto', 'none', 'bf16' (got 'fp8')" in capsys.readouterr().err


@pytest.mark.slow
def test_train_logs_mlflow_run_and_checkpoint_reevaluates(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    report_path = tmp_path / "report.json"
    assert main(["train", "--preset", "tiny", "--set", "epochs=3", "--report-json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "ndcg@10" in out and "hr@10" in out and "mrr" in out
    report = json.loads(report_path.read_text())

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.architecture"] == "fuxi"
    assert run.data.metrics["final_test/ndcg_at_10"] == pytest.approx(report["test"]["ndcg_at_10"])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/epoch_loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]

    # the checkpoint holds the selected (best-validation) weights: evaluating it reproduces the reported test
    # metrics (printed to 4 decimals)
    assert main(["eval", "--checkpoint", report["checkpoint"], "--split", "test"]) == 0
    printed = {
        line.split()[0]: float(line.split()[1])
        for line in capsys.readouterr().out.splitlines()[1:]
        if line.strip()
    }
    assert printed["ndcg@10"] == pytest.approx(report["test"]["ndcg_at_10"], abs=6e-5)
    assert printed["mrr"] == pytest.approx(report["test"]["mrr"], abs=6e-5)
