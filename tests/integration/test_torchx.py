"""TorchX: the project component runs on local_cwd and renders valid kubernetes and slurm specs.

The dry runs go through the `torchx` CLI exactly as an operator types them (so .torchxconfig is read),
and assert what the cluster needs: torchrun with the right node/process counts, GPUs, the shared run
directory with --resume (a retry continues from the last checkpoint), the retry count, MLflow's URI.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TORCHX = str(Path(sys.executable).with_name("torchx"))
COMPONENT = "jobs/components.py:train"


def torchx(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCHXCONFIG"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun of this venv
    return subprocess.run([TORCHX, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def scheduler_request(out: str) -> str:
    assert "=== SCHEDULER REQUEST ===" in out, out[-3000:]
    return out.split("=== SCHEDULER REQUEST ===", 1)[1]


def test_kubernetes_dryrun_spec() -> None:
    proc = torchx(
        "run",
        "--dryrun",
        "-s",
        "kubernetes",
        "--workspace",
        "",
        COMPONENT,
        "--preset",
        "ml-20m",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "8",
        "--gpu",
        "8",
        "--cpu",
        "32",
        "--memMB",
        "200000",
        "--max_retries",
        "3",
        "--run_dir",
        "/mnt/runs/nightly",
        "--tracking_uri",
        "http://mlflow:5000",
        "model.num_layers=4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = yaml.safe_load(scheduler_request(proc.stdout))
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    assert job["spec"]["schedulerName"] == "volcano"
    assert job["spec"]["queue"] == "default"  # from .torchxconfig
    assert job["spec"]["maxRetry"] == 3
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2  # one task per node
    for task in tasks:
        assert task["maxRetry"] == 3
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "fuxi-pipeline:latest"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        command = " ".join(container["command"])
        assert "--nnodes 2 --nproc_per_node 8" in command
        # in-place restarts of failed workers, each waiting at most join_timeout (default) for every node
        assert "torchrun --rdzv_conf join_timeout=600 --max-restarts 3 " in command
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" in {e["name"] for e in container["env"]}
        run_dir = "--set run_dir=/mnt/runs/nightly --set resume=true"
        assert f"-m jobs.cli train --preset ml-20m {run_dir} --device cuda" in command
        assert "--set model.num_layers=4" in command


def test_slurm_dryrun_spec() -> None:
    proc = torchx(
        "run",
        "--dryrun",
        "-s",
        "slurm",
        "--workspace",
        "",
        COMPONENT,
        "--preset",
        "tiny",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "4",
        "--gpu",
        "4",
        "--max_retries",
        "2",
        "--join_timeout",
        "90",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = scheduler_request(proc.stdout)
    assert script.count("#SBATCH --job-name=") == 2 and "#SBATCH hetjob" in script  # two nodes
    assert "--gpus-per-task=4" in script and "--requeue" in script
    assert "--time=4:00:00" in script  # from .torchxconfig
    assert "export TORCHX_MAX_RETRIES=2" in script and "scontrol requeue" in script
    srun = [line for line in script.splitlines() if "torchrun " in line]
    assert len(srun) == 2  # one srun per node, joined as one heterogeneous job step
    for line in srun:
        assert "--nnodes 2 --nproc_per_node 4" in line and "-m jobs.cli train --preset tiny" in line
        # no run_dir given: the default names the job (stable across requeues and re-submissions), so a
        # retry finds its checkpoints; torchrun restarts failed workers in place as well, and fails when a
        # lost node's agent has not rejoined in join_timeout (then Slurm's requeue takes over)
        assert "--set run_dir=runs/fuxi-train --set resume=true --device cuda" in line
        assert "torchrun --rdzv_conf join_timeout=90 --max-restarts 2 " in line
        # rendezvous port by job id: two jobs sharing a node do not meet in one store
        port = "$((29500 + ${SLURM_JOB_ID:-0} % 1000))"
        assert f"--rdzv_endpoint ${{SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}}:{port} " in line


def test_launcher_applies_torchxconfig_component_defaults(tmp_path: Path, monkeypatch) -> None:
    # sweeps and the nightly job submit through jobs.launch (the runner API, not `torchx run`): the
    # `[component:...]` section of $TORCHXCONFIG (the box's: 1 GB a rank, a 60 s rendezvous wait) holds for
    # them too; a section for another component does not
    from jobs.launch import COMPONENT as LAUNCHED
    from jobs.launch import Launcher, component_args

    config = tmp_path / ".torchxconfig"
    config.write_text(
        "[component:jobs/components.py:train]\nmemMB = 1024\ncpu = 1\njoin_timeout = 60\n\n"
        "[component:jobs/components.py:other]\nmemMB = 7\n"
    )
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TORCHXCONFIG", str(config))
    args = component_args("tiny", [], run_dir="runs/x", tracking_uri="http://head:5000", parent_run_id=None)
    with Launcher("slurm") as launcher:
        script = str(launcher.runner.dryrun_component(LAUNCHED, args, "slurm", cfg={}).request)
    # defaults fill what the launcher leaves out; its own arguments (--cpu 2) win
    assert "--cpus-per-task=2 --mem=1024\n" in script, script
    assert "torchrun --rdzv_conf join_timeout=60 " in script


@pytest.mark.slow
def test_local_cwd_two_processes_log_one_mlflow_run(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    run_dir = tmp_path / "run"
    proc = torchx(
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={tmp_path / 'logs'}",
        COMPONENT,
        "--preset",
        "tiny",
        "--nproc_per_node",
        "2",
        "--run_dir",
        str(run_dir),
        "--tracking_uri",
        f"sqlite:///{db}",
        "--name",
        "fuxi-tx-test",
        "tracking.experiment=torchx-test",
        "progress=false",
        timeout=300,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-5000:]
    with sqlite3.connect(db) as con:
        runs = con.execute(
            "select r.run_uuid, r.status from runs r join experiments e on r.experiment_id = e.experiment_id "
            "where e.name = 'torchx-test'"
        ).fetchall()
        assert len(runs) == 1 and runs[0][1] == "FINISHED", runs  # rank 1 logged nothing
        ((run_id, _),) = runs
        params = dict(con.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall())
        metrics = {
            k for (k,) in con.execute("select distinct key from metrics where run_uuid = ?", (run_id,))
        }
    assert params["name"] == "tiny"
    assert {"train/epoch_loss", "valid/ndcg_at_10", "final_test/ndcg_at_10"} <= metrics
    from pipeline.train.checkpoint import resolve_checkpoint

    final = Path(resolve_checkpoint(run_dir / "checkpoints" / "final"))  # the generation `final` names
    assert (final / ".metadata").exists()
    meta = yaml.safe_load((final / "train.json").read_text())
    assert meta["world_size"] == 2 and meta["mlflow_run_id"] == run_id
