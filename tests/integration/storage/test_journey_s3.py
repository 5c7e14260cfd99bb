"""The whole journey on s3://, as a user runs it: `fuxi data synth-logs` -> `build-sequences` ->
`append-day` -> `fuxi train` streaming with mid-epoch checkpoints -> kill -9 of the trainer -> resume
(per-step losses bit-identical to an uninterrupted run) -> `fuxi register` -> `fuxi recommend` -> two
`fuxi nightly` dates. Every command is a real subprocess against the real SeaweedFS endpoint
(conftest.py); data, checkpoints, registry artifacts, recommendations and nightly state live on S3 only:
the scratch folder the commands run in ends up holding the MLflow database and logs, nothing else.

MLflow's artifact root is on S3 too (its experiments are created with an s3:// artifact location; MLflow
reaches the endpoint through boto3, which reads AWS_ENDPOINT_URL itself).

Also here: a build killed by SIGKILL at its manifest commit on S3 leaves the previous generation of the
shard directory readable (the generic commit and the checkpoint save are covered by
test_storage_commit.py and test_checkpoint_storage.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import storage

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow

DAYS = ["2024-01-01", "2024-01-02", "2024-01-03"]


class Journey:
    """The commands of one user session: cwd is the scratch folder, the environment the AWS_* of the
    endpoint, MLflow's SQLite database in the scratch folder."""

    def __init__(self, s3: Any, scratch: Path) -> None:
        self.root = f"s3://{s3.bucket}/journey-{uuid.uuid4().hex[:8]}"
        self.scratch = scratch
        self.logs_dir = scratch / "logs"  # command output: logs are allowed to stay local
        self.logs_dir.mkdir(parents=True)
        self.tracking_uri = f"sqlite:///{scratch / 'mlflow.db'}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "OMP_NUM_THREADS": "1",  # one thread: the same inputs give bit-identical losses
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }

    def uri(self, *names: str) -> str:
        return storage.join(self.root, *names)

    def command(self, *args: str, name: str) -> list[str]:
        return [sys.executable, "-m", "jobs.cli", *args]

    def fuxi(self, *args: str, name: str, timeout: float = 600) -> str:
        log = self.logs_dir / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.run(
                self.command(*args, name=name),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.scratch,
                env=self.env,
                timeout=timeout,
            )
        text = log.read_text()
        assert proc.returncode == 0, f"fuxi {' '.join(args)}\n{text[-4000:]}"
        return text

    def train_args(self, run_dir: str, *extra: str) -> list[str]:
        return [
            "train",
            "--preset",
            "tiny",
            "--data",
            self.uri("seq"),
            *("--set", f"run_dir={run_dir}"),
            *("--set", "data.stream=true", "--set", "data.stream_backend=pyarrow"),
            *("--set", "epochs=3", "--set", "checkpoint_every_steps=1"),
            *("--set", "tracking.experiment=journey", "--set", "tracking.log_every_steps=1"),
            *("--set", "progress=false"),
            *extra,
        ]


def step_losses(tracking_uri: str, run_id: str) -> dict[int, float]:
    """train/loss by step as the run's last writer logged it (a resumed run re-logs the steps after its
    checkpoint)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
    out: dict[int, tuple[int, float]] = {}
    for m in history:
        if m.step not in out or m.timestamp >= out[m.step][0]:
            out[m.step] = (m.timestamp, m.value)
    return {step: value for step, (_, value) in sorted(out.items())}


def create_experiments(tracking_uri: str, artifact_root: str, names: list[str]) -> None:
    """The experiments with their artifacts on S3 (as `mlflow server --default-artifact-root s3://...`
    would give them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for name in names:
        client.create_experiment(name, artifact_location=storage.join(artifact_root, name))


def local_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_the_whole_journey_on_s3(s3_env: Any, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    j = Journey(s3_env, scratch)
    create_experiments(j.tracking_uri, j.uri("mlflow"), ["journey", "journey-nightly"])

    # data: synthetic logs -> sequences of two days -> the third day appended
    j.fuxi(
        *("data", "synth-logs", "--out", j.uri("logs"), "--users", "200", "--items", "150"),
        *("--days", "3", "--events", "6000", "--new-items-per-day", "5", "--rows-per-part", "1500"),
        name="synth-logs",
    )
    assert sorted(n for n in storage.listdir(j.uri("logs")) if n.startswith("date=")) == [
        f"date={d}" for d in DAYS
    ]
    j.fuxi(
        *("data", "build-sequences", "--logs", j.uri("logs"), "--out", j.uri("seq")),
        *("--max-length", "50", "--partitions", "2", "--dates", ",".join(DAYS[:2])),
        name="build-sequences",
    )
    j.fuxi(
        "data",
        "append-day",
        "--logs",
        j.uri("logs"),
        "--date",
        DAYS[2],
        "--sequences",
        j.uri("seq"),
        name="append",
    )
    manifest = json.loads(storage.read_bytes(j.uri("seq", "manifest.json")))
    assert sorted(manifest["days"]) == DAYS

    # training: an uninterrupted run, and one killed by SIGKILL mid-run then resumed
    full = j.uri("runs", "full")
    j.fuxi(*j.train_args(full, "--report-json", str(scratch / "full.json")), name="train-full")
    full_report = json.loads((scratch / "full.json").read_text())
    (scratch / "full.json").unlink()
    reference = step_losses(j.tracking_uri, full_report["run_id"])
    assert len(reference) == full_report["steps"] >= 8, reference

    from pipeline.train.checkpoint import Checkpointer, read_meta

    def checkpointed_step() -> int:
        latest = checkpoints.latest()
        # a step checkpoint may be retired between the two reads: then it counts as none
        return 0 if latest is None else read_meta(latest).get("trainer", {}).get("step", 0)

    run = j.uri("runs", "killed")
    checkpoints = Checkpointer(storage.join(run, "checkpoints"))
    with open(j.logs_dir / "train-killed.log", "w") as out:
        proc = subprocess.Popen(
            j.command(*j.train_args(run), name="train-killed"),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=scratch,
            env=j.env,
        )
        try:
            deadline = time.monotonic() + 300
            while checkpointed_step() < 2:  # a checkpoint mid-way through the first epoch
                assert proc.poll() is None, (j.logs_dir / "train-killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no mid-epoch checkpoint within 300 s"
                time.sleep(0.1)
            killed_after = str(checkpoints.latest())
            os.kill(proc.pid, signal.SIGKILL)  # mid-run: no cleanup, no atexit
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoints.named("final") is None  # it never got to the end

    j.fuxi(
        *j.train_args(run, "--set", "resume=true", "--report-json", str(scratch / "resumed.json")),
        name="resume",
    )
    resumed = json.loads((scratch / "resumed.json").read_text())
    (scratch / "resumed.json").unlink()
    pointer = storage.name_of(resumed["resumed_from"])  # step-NNNNNN, the pointer it resumed from
    assert pointer.startswith("step-"), resumed["resumed_from"]
    resumed_step = int(pointer.removeprefix("step-"))
    assert 0 < resumed_step < full_report["steps"], resumed["resumed_from"]
    assert resumed["resumed_from"].startswith(run) and killed_after.startswith(run)
    assert resumed["steps"] == full_report["steps"]
    losses = step_losses(j.tracking_uri, resumed["run_id"])
    after = {s: v for s, v in losses.items() if s > resumed_step}
    assert after and after == {s: v for s, v in reference.items() if s > resumed_step}  # bit-identical
    assert resumed["run_id"] != full_report["run_id"]

    # the registry: the resumed run's final checkpoint (a generation on S3), then batch recommendations
    out = j.fuxi("register", "--run-id", resumed["run_id"], "--name", "journey", "--promote", name="register")
    assert "registered journey v1" in out
    recs = j.uri("recs", "top10.parquet")
    j.fuxi(
        *("recommend", "--model", "models:/journey@champion", "--sequences", j.uri("seq")),
        *("--out", recs, "--k", "10", "--cache", j.uri("models")),
        name="recommend",
    )
    fs, path = storage.resolve(recs)
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == manifest["users"]
    assert set(table.column("model_version").to_pylist()) == {"journey/1"}
    assert max(len(r) for r in table.column("item_ids").to_pylist()) == 10
    assert storage.CommitRoot(j.uri("models", "journey", "v1")).resolve("complete") is not None

    # two nightly dates on the same logs and sequences; its state and runs on S3 too
    nightly = j.uri("nightly")
    for day in DAYS[1:]:
        j.fuxi(
            *("nightly", "--date", day, "--workdir", nightly, "--logs", j.uri("logs")),
            *("--sequences", j.uri("seq"), "--no-demo-data", "--experiment", "journey-nightly"),
            *("--name", "journey", "--set", "epochs=1"),
            *("--scheduler-args", f"log_dir={j.logs_dir / ('torchx-' + day)}"),
            name=f"nightly-{day}",
        )
        state = json.loads(storage.read_bytes(storage.join(nightly, "state", f"{day}.json")))
        assert all(state["steps"][s]["status"] == "done" for s in state["steps"]), state["steps"]
        assert state["steps"]["train"]["outputs"]["checkpoint"].startswith(storage.join(nightly, "runs", day))
    from jobs.nightly import NightlyConfig, read_events

    events = read_events(NightlyConfig(date=DAYS[2], workdir=nightly))
    assert [e["step"] for e in events] == [
        "ingest",
        "update_sequences",
        "train",
        "evaluate",
        "register_promote",
    ]
    assert {e["event"] for e in events} == {"done"}
    # the second date warm-started from the champion's copy, a commit root on S3
    second = json.loads(storage.read_bytes(storage.join(nightly, "state", f"{DAYS[2]}.json")))
    init = second["steps"]["train"]["outputs"]["init_checkpoint"]
    assert init is not None and init.startswith(storage.join(nightly, "runs", DAYS[2])), init

    # MLflow's artifacts went to S3, and nothing of the journey landed in the scratch folder
    assert storage.walk(j.uri("mlflow"))  # the logged models and train.json files
    left = local_files(scratch)
    assert left and all(n == "mlflow.db" or n.startswith("logs/") for n in left), sorted(left)[:20]
    assert not (scratch / "s3:").exists() and not (REPO / "s3:").exists()


# ---------------------------------------------------------------------------------------------------
# a build killed at its manifest commit on S3

_KILLED_AT_COMMIT = r"""
import sys
import time

import pipeline.data.build as build

def stalled(*args, **kwargs):  # every file of the new generation is written: stop at the commit
    print("at-commit", flush=True)
    time.sleep(300)

build._write_manifest = stalled
build.append_day(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""


def test_a_build_killed_at_its_manifest_commit_leaves_the_previous_generation(
    s3_env: Any, tmp_path: Path
) -> None:
    from pipeline.data.sequences import read_sequences
    from pipeline.data.synth_logs import LogConfig, write_logs

    root = f"s3://{s3_env.bucket}/killed-build-{uuid.uuid4().hex[:8]}"
    logs, seq = storage.join(root, "logs"), storage.join(root, "seq")
    write_logs(
        LogConfig(num_users=100, num_items=80, num_days=2, num_events=2000, seed=1, num_themes=8),
        logs,
        progress=False,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "jobs.cli", "data", "build-sequences", "--logs", logs, "--out", seq]
    subprocess.run(
        [*run, "--partitions", "2", "--dates", "2024-01-01"],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    before = json.loads(storage.read_bytes(storage.join(seq, "manifest.json")))
    table = read_sequences(seq).table
    files = set(storage.walk(seq))

    # the child's own session: SIGKILL goes to it and to the Ray processes it started
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_AT_COMMIT, logs, "2024-01-02", seq],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "at-commit"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    assert set(storage.walk(seq)) > files  # the new generation's files were written, never named
    assert json.loads(storage.read_bytes(storage.join(seq, "manifest.json"))) == before
    assert read_sequences(seq).table.equals(table)
    # the next run commits over the previous generation and collects what the killed one left
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "data",
            "append-day",
            "--logs",
            logs,
            "--date",
            "2024-01-02",
            "--sequences",
            seq,
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    after = json.loads(storage.read_bytes(storage.join(seq, "manifest.json")))
    assert sorted(after["days"]) == ["2024-01-01", "2024-01-02"]
    named = {s["file"] for s in after["shards"]} | {after["vocab"]["file"], "manifest.json"}
    quarantined = {q for d in after["days"].values() for q in d["report"]["quarantine_files"]}
    assert set(storage.walk(seq)) == named | quarantined
