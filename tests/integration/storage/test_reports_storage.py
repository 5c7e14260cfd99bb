"""Reports written to an object store: `fuxi report` (a sweep's leaderboard, the nightly timeline, a tuning
study), `fuxi train --report-json` and the tune / sweep folders, on S3 (SeaweedFS, conftest.py).

Every report is written once to local disk and once to `s3://`, from the same real MLflow store (SQLite)
or Optuna study (SQLite): the files are byte for byte the same, and a report logged to its parent run from
S3 carries the same bytes. A study storage that cannot work on a store is one line and exit status 2,
before anything is written.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest

import storage
from jobs.cli import main
from pipeline.train.tracking import mlflow_client

FILES = ("md", "png", "json")
GRID = {"model.num_layers": ["1", "2"], "seed": ["0", "1"]}


def assert_same_files(local: str, remote: str, name: str) -> None:
    """<local>/<name>.{md,png,json} equal <remote>/<name>.{md,png,json}, and nothing else is there."""
    assert not storage.is_local(remote)
    for ext in FILES:
        mine = Path(storage.join(local, f"{name}.{ext}")).read_bytes()
        assert storage.read_bytes(storage.join(remote, f"{name}.{ext}")) == mine, ext
    assert ext == "json" and json.loads(mine)  # the JSON is JSON
    assert storage.listdir(remote) == sorted(f"{name}.{ext}" for ext in FILES)


@pytest.fixture
def mlflow_store(tmp_path: Path) -> dict[str, Any]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    exp = client.create_experiment("reports", artifact_location=str(tmp_path / "artifacts"))
    return {"uri": uri, "client": client, "experiment": exp}


@pytest.fixture
def sweep_parent(mlflow_store: dict[str, Any]) -> str:
    """A finished sweep as MLflow holds it: a parent run with its grid, four child runs with params (the
    resolved config the report rebuilds the parameter count from) and final metrics."""
    client, exp = mlflow_store["client"], mlflow_store["experiment"]
    parent = client.create_run(
        exp, tags={"mlflow.runName": "sweep", "sweep.grid": json.dumps(GRID), "sweep.preset": "tiny"}
    )
    pid = parent.info.run_id
    for layers in GRID["model.num_layers"]:
        for seed in GRID["seed"]:
            child = client.create_run(
                exp, tags={"mlflow.parentRunId": pid, "mlflow.runName": f"sweep/l{layers}-s{seed}"}
            )
            rid = child.info.run_id
            params = {"model.num_layers": layers, "model.embedding_dim": "16", "model.num_items": "201"}
            for key, value in {**params, "seed": seed}.items():
                client.log_param(rid, key, value)
            base = 0.1 * int(layers) + 0.01 * int(seed)
            for i, metric in enumerate(
                ("final_test/ndcg_at_10", "final_test/hr_at_10", "final_test/mrr", "valid/ndcg_at_10")
            ):
                client.log_metric(rid, metric, base + 0.001 * i)
            client.log_metric(rid, "train/epoch_seconds", 1.5)
            client.set_terminated(rid, "FINISHED")
    client.set_terminated(pid, "FINISHED")
    return pid


def test_sweep_report_on_s3_equals_the_local_one(
    s3_env: Any, mlflow_store: dict[str, Any], sweep_parent: str, tmp_path: Path
) -> None:
    from jobs.report import build_report

    client = mlflow_store["client"]
    local = str(tmp_path / "report")
    remote = f"s3://{s3_env.bucket}/reports-{uuid.uuid4().hex[:8]}"
    build_report(client, sweep_parent, local, name="board", log_to_parent=False)
    argv = ["report", "--parent-run-id", sweep_parent, "--out", remote, "--name", "board"]
    assert main([*argv, "--tracking-uri", mlflow_store["uri"]]) == 0
    assert_same_files(local, remote, "board")
    assert "| 1 | l2-s1 |" in Path(local, "board.md").read_text()  # the best run leads the board

    # logged to the parent run from the store: the same files under report/
    logged = {a.path for a in client.list_artifacts(sweep_parent, "report")}
    assert logged == {f"report/board.{ext}" for ext in FILES}
    with tempfile.TemporaryDirectory() as tmp:
        folder = client.download_artifacts(sweep_parent, "report", tmp)
        for ext in FILES:
            assert Path(folder, f"board.{ext}").read_bytes() == storage.read_bytes(f"{remote}/board.{ext}")


def test_nightly_report_on_s3_equals_the_local_one(
    s3_env: Any, mlflow_store: dict[str, Any], tmp_path: Path
) -> None:
    from jobs.nightly import TIMELINE_TAG
    from jobs.report import build_nightly_report

    client = mlflow_store["client"]
    run = client.create_run(mlflow_store["experiment"], tags={TIMELINE_TAG: "fuxi-alpha"})
    for day, step in enumerate((19724, 19725, 19726)):  # 2024-01-02 .. 04
        for key, value in {
            "num_items": 200 + day,
            "candidate/ndcg_at_10": 0.2 + 0.01 * day,
            "champion/ndcg_at_10": 0.19 + 0.01 * day,
            "candidate/topk_recent_item_share": 0.1,
            "candidate/new_items/hr_at_10": 0.05 * day,
            "promoted": day % 2,
        }.items():
            client.log_metric(run.info.run_id, key, value, step=step)
    local = str(tmp_path / "nightly")
    remote = f"s3://{s3_env.bucket}/nightly-{uuid.uuid4().hex[:8]}"
    markdown, paths = build_nightly_report(client, "reports", "fuxi-alpha", local)
    argv = [
        "report",
        "--nightly",
        "--experiment",
        "reports",
        "--out",
        remote,
        "--tracking-uri",
        mlflow_store["uri"],
    ]
    assert main(argv) == 0
    assert_same_files(local, remote, "nightly_report")
    assert "| 2024-01-04 | 202 |" in markdown and paths["table"] == storage.join(local, "nightly_report.md")


@pytest.fixture
def study(tmp_path: Path) -> str:
    """A tuning study in a local SQLite storage, as `fuxi tune` leaves it: complete trials with their
    per-seed values and validation curves, and one pruned."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    url = f"sqlite:///{tmp_path}/study.db"
    s = optuna.create_study(study_name="s", storage=url, direction="maximize")
    s.set_user_attr("seeds", [0, 1])
    dist = {"optim.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for i, lr in enumerate((1e-3, 3e-3, 5e-3, 2e-4)):
        pruned = i == 3
        s.add_trial(
            create_trial(
                params={"optim.lr": lr},
                distributions=dist,
                value=None if pruned else 0.1 + 0.01 * i,
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                intermediate_values={0: 0.05 + 0.01 * i, 1: 0.08 + 0.01 * i},
                user_attrs={} if pruned else {"seed_values": [0.1 + 0.01 * i] * 2, "seed_std": 0.0},
            )
        )
    return url


def test_study_report_on_s3_equals_the_local_one(s3_env: Any, study: str, tmp_path: Path) -> None:
    from jobs.tune import write_study_report

    local = str(tmp_path / "study-report")
    remote = f"s3://{s3_env.bucket}/study-{uuid.uuid4().hex[:8]}"
    markdown, _ = write_study_report(study, "s", local)
    assert main(["report", "--study", "s", "--storage", study, "--out", remote]) == 0
    assert_same_files(local, remote, "tune_s")
    assert "| 1 | 2 |" in markdown  # trial 2 is the best complete trial


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["report", "--study", "s", "--storage", "s3://{bucket}/study.db"],
            "--storage s3://{bucket}/study.db: an Optuna study cannot live on an object store; use "
            "sqlite:///<a local file>.db or a database URL (postgresql://..., mysql://...)",
        ),
        (
            ["tune", "--space", "{space}", "--study", "s", "--storage", "sqlite:///s3://{bucket}/s.db"],
            "--storage s3://{bucket}/s.db: an Optuna study cannot live on an object store; use "
            "sqlite:///<a local file>.db or a database URL (postgresql://..., mysql://...)",
        ),
        (
            ["tune", "--space", "{space}", "--study", "s", "--tune-dir", "s3://{bucket}/{prefix}"],
            "--tune-dir s3://{bucket}/{prefix}: the study's default SQLite file cannot live on an object "
            "store; pass --storage sqlite:///<a local file>.db or a database URL (postgresql://...)",
        ),
        (
            ["report", "--parent-run-id", "x", "--out", "s3://{bucket}/{prefix}", "--name", "../up"],
            "s3://{bucket}/{prefix}: --name = '../up.md' climbs out with '..'; names must stay inside it",
        ),
    ],
    ids=["report-study-on-s3", "tune-sqlite-on-s3", "tune-dir-on-s3-no-storage", "report-name-climbs"],
)
def test_study_storage_that_cannot_work_is_one_line(
    s3_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}))
    prefix = f"refused-{uuid.uuid4().hex[:8]}"
    fill = {"bucket": s3_env.bucket, "space": str(space), "prefix": prefix}
    before = sorted(os.listdir(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main([a.format(**fill) for a in argv] + ["--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fuxi: error: {message.format(**fill)}"]
    assert sorted(os.listdir(tmp_path)) == before  # no study, MLflow store or report folder
    assert storage.listdir(f"s3://{s3_env.bucket}/{prefix}") == []


def test_job_folders_on_a_store(s3_env: Any) -> None:
    """Sweep points and tuning trials: on a store every job's run folder is the URI (any scheduler), the
    TorchX logs a local temporary folder; on disk an absolute path for local schedulers."""
    from jobs.sweep import job_run_dir, jobs_root, with_log_dir

    root = jobs_root(f"s3://{s3_env.bucket}/tune", "study", "--study")
    assert root == f"s3://{s3_env.bucket}/tune/study"
    for scheduler in ("local_cwd", "kubernetes"):
        assert job_run_dir(root, "trial-0000-seed0", scheduler) == f"{root}/trial-0000-seed0"
    log_dir = with_log_dir("local_cwd", {}, root, "tune-study")["log_dir"]
    assert os.path.isdir(log_dir) and os.listdir(log_dir) == []
    os.rmdir(log_dir)
    assert with_log_dir("local_cwd", {"log_dir": "mine"}, root, "x") == {"log_dir": "mine"}
    assert with_log_dir("kubernetes", None, root, "x") == {}
    with pytest.raises(storage.ConfinementError, match="--study = '../x' climbs out"):
        jobs_root(f"s3://{s3_env.bucket}/tune", "../x", "--study")


def test_job_folders_on_disk(tmp_path: Path) -> None:
    from jobs.sweep import job_run_dir, jobs_root, with_log_dir

    root = jobs_root(os.path.relpath(tmp_path / "sweeps"), "s", "--name")
    assert Path(root).is_dir()
    assert job_run_dir(root, "p", "local_cwd") == str(tmp_path / "sweeps" / "s" / "p")
    assert job_run_dir(root, "p", "kubernetes") is None
    assert with_log_dir("local_cwd", None, root, "x") == {
        "log_dir": str(tmp_path / "sweeps" / "s" / "torchx_logs")
    }


@pytest.mark.slow
def test_train_report_json_on_s3(s3_env: Any, tmp_path: Path) -> None:
    remote = f"s3://{s3_env.bucket}/train-report-{uuid.uuid4().hex[:8]}/report.json"
    argv = ["train", "--preset", "tiny", "--set", "epochs=1", "--set", "tracking.enabled=false"]
    argv += ["--set", f"output_dir={tmp_path / 'runs'}", "--report-json", remote]
    assert main(argv) == 0
    report = json.loads(storage.read_bytes(remote))
    assert report["epochs"] == 1 and 0.0 <= report["test"]["ndcg_at_10"] <= 1.0
    assert report["checkpoint"].startswith(str(tmp_path / "runs"))


@pytest.mark.slow
def test_tune_folder_on_s3(s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fuxi tune --tune-dir s3://...` with a local SQLite study: the trial's run folder (its checkpoints
    and run record) and the study report are on S3; the report equals the one written locally from the
    same study, and the copy logged to the study's parent run too."""
    from jobs.tune import write_study_report

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    client.create_experiment("tune-s3", artifact_location=str(tmp_path / "artifacts"))
    study_url = f"sqlite:///{tmp_path}/study.db"
    tune_dir = f"s3://{s3_env.bucket}/tune-{uuid.uuid4().hex[:8]}"
    argv = ["tune", "--preset", "tiny", "--space", str(space), "--study", "s", "--storage", study_url]
    argv += ["--trials", "1", "--tune-dir", tune_dir, "--tracking-uri", uri, "--experiment", "tune-s3"]
    argv += ["--cpu", "1", "--pruner", "none", "--set", "epochs=1", "--set", "data.synthetic.num_users=100"]
    assert main(argv) == 0

    folder = storage.join(tune_dir, "s")
    assert storage.listdir(folder) == ["trial-0000-seed0", "tune_s.json", "tune_s.md", "tune_s.png"]
    trial = storage.join(folder, "trial-0000-seed0")
    assert {"checkpoints", "mlflow_run.json"} <= set(storage.listdir(trial))
    assert storage.is_file(storage.join(trial, "checkpoints", "final"))  # the trial's final pointer

    local = str(tmp_path / "local-report")
    write_study_report(study_url, "s", local, tracking_uri=uri)
    for ext in FILES:
        assert (
            storage.read_bytes(storage.join(folder, f"tune_s.{ext}"))
            == Path(local, f"tune_s.{ext}").read_bytes()
        )
    parent = optuna.load_study(study_name="s", storage=study_url).user_attrs["mlflow_parent_run_id"]
    assert {a.path for a in client.list_artifacts(parent, "report")} == {
        f"report/tune_s.{ext}" for ext in FILES
    }
