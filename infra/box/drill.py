"""Drills on the cluster in a box: break it on purpose, check that the work comes back, one record a trial.

    PYTHONPATH=. .venv/bin/python infra/box/drill.py rank-kill       # kill -9 one training rank
    PYTHONPATH=. .venv/bin/python infra/box/drill.py host-loss       # worker host w2 lost, back 20 s later
    PYTHONPATH=. .venv/bin/python infra/box/drill.py ray-host-loss   # w2 lost while Ray builds sequences
    PYTHONPATH=. .venv/bin/python infra/box/drill.py mlflow-restart  # the tracking server restarted mid-run
    PYTHONPATH=. .venv/bin/python infra/box/drill.py cross           # 2 hosts vs 1 host: step time, a2a bytes
    PYTHONPATH=. .venv/bin/python infra/box/drill.py table           # the README's tables from the records

Run as root on the machine that holds the box (`infra/box/box.sh up`), from the repo root. Each trial is one
command: it appends one JSON record to runs/box-drills/<drill>.jsonl (also when a check fails: `passed`
false, `error` the one-line reason) and exits 1 if a check failed. The training drills compare against one
uninterrupted job of the same configuration (runs/box-drills/reference.json; made by the first trial that
needs it). `table` renders every record; the README's drill tables are its output.

`facts RUN_DIR [REF_DIR]` runs inside the box (it needs the tracking server): the MLflow facts of a run as
JSON (the drill calls it through `box.sh exec head`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BOX = str(REPO / "infra/box/box.sh")
RECORDS = REPO / "runs/box-drills"
EPOCHS, STEPS_PER_EPOCH = 12, 2  # tiny: 2 steps an epoch, a checkpoint at each epoch's end
JOB_ARGS = [
    "--preset",
    "tiny",
    "--epochs",
    str(EPOCHS),
    "parallel.sharding_types=row_wise",
    "tracking.log_every_steps=1",
]
DRILLS = ("rank-kill", "host-loss", "ray-host-loss", "mlflow-restart", "cross")


class DrillFailed(Exception):
    """A check of the trial failed; the message is the record's one-line `error`."""


# --- the box ---------------------------------------------------------------------------------------------


def on(host: str, *cmd: str, check: bool = True, timeout: float = 600) -> str:
    """Run `cmd` on a host of the box (its namespaces, the box environment); its stdout."""
    p = subprocess.run([BOX, "exec", host, *cmd], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DrillFailed(f"{host}: {' '.join(cmd[:4])} ... exited {p.returncode}: {last}")
    return p.stdout


def box(*args: str) -> None:
    subprocess.run([BOX, *args], check=True, capture_output=True, text=True)


def host_pids(host: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", f"fuxibox-{host}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


# --- Slurm jobs through TorchX ---------------------------------------------------------------------------


def submit(name: str, *extra: str) -> tuple[str, int]:
    """A 2-host training job (one rank on w1, one on w2); its app handle and Slurm job id."""
    out = on(
        "head",
        "torchx",
        "run",
        "-s",
        "slurm",
        "jobs/components.py:train",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--name",
        name,
        "--run_dir",
        f"runs/{name}",
        *extra,
        *JOB_ARGS,
    )
    handles = re.findall(r"slurm://\S+", out)
    if not handles:
        raise DrillFailed(f"torchx run -s slurm printed no app handle for {name}")
    return handles[-1], int(handles[-1].rsplit("/", 1)[1])


def job_state(handle: str) -> str:
    out = on("head", "torchx", "status", handle, check=False, timeout=60)
    m = re.search(r"State:\s*(\S+)", out)
    return m.group(1) if m else ""


def scontrol_restarts(job: int) -> int:
    """Slurm's requeue count of a job it still holds (MinJobAge=600 in the box)."""
    m = re.search(r"Restarts=(\d+)", on("head", "scontrol", "show", "job", str(job), check=False))
    return int(m.group(1)) if m else 0


def wait_done(handle: str, job: int, seconds: float, logs: Path) -> float:
    """Poll until the job ends; fail unless it SUCCEEDED. Each attempt's Slurm logs are copied to `logs`
    as they grow (a requeued attempt's files are truncated by the next). Returns the end time."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = job_state(handle)
        snapshot_logs(job, logs)
        if state == "SUCCEEDED":
            return time.time()
        if state in ("FAILED", "CANCELLED"):
            raise DrillFailed(f"job {job} ended {state} (torchx log {handle}; slurm-{job}-*.err)")
        time.sleep(3)
    raise DrillFailed(f"job {job} not done in {seconds:.0f} s")


def snapshot_logs(job: int, logs: Path) -> None:
    attempt = logs / f"attempt-{scontrol_restarts(job)}"
    attempt.mkdir(parents=True, exist_ok=True)
    for f in glob.glob(str(REPO / f"slurm-{job}-*")):
        shutil.copy(f, attempt)


def torchrun_restarts(logs: Path) -> int:
    """In-place restarts of the worker group over every attempt: the most any node's torchelastic agent
    logged (LOGLEVEL=INFO; both agents log the one restart they take together)."""
    counts = [0]
    for f in logs.glob("attempt-*/*.err"):
        counts.append(len(re.findall(r"will restart worker group", f.read_text(errors="replace"))))
    return max(counts)


def requeues(job: int) -> int:
    """Attempts that ended REQUEUED, from the accounting (-D: every attempt is a record of its own). A
    heterogeneous job (TorchX, one component a node) has a record per component: count component 0."""
    out = on("head", "sacct", "-n", "-D", "-X", "-j", str(job), "-o", "JobID%20,State")
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return sum(1 for r in rows if r[1:2] == ["REQUEUED"] and ("+" not in r[0] or r[0].endswith("+0")))


def nodes_of(job: int) -> str:
    return " ".join(on("head", "sacct", "-n", "-X", "-j", str(job), "-o", "NodeList%30").split())


def latest_step(run_dir: str) -> int:
    """The step the run's `latest` pointer names (0: none yet); committed only after its checkpoint is."""
    import storage

    pointer = storage.CommitRoot(f"{REPO}/{run_dir}/checkpoints").read("latest")
    return int(pointer.meta.get("step", 0)) if pointer else 0


def wait_for_step(run_dir: str, past: int, seconds: float = 180) -> int:
    deadline = time.time() + seconds
    while time.time() < deadline:
        at = latest_step(run_dir)
        if at > past:
            return at
        time.sleep(1)
    raise DrillFailed(f"{run_dir}: no checkpoint past step {past} in {seconds:.0f} s")


def run_facts(run_dir: str, ref_dir: str | None = None) -> dict[str, Any]:
    out = on("head", "python", "infra/box/drill.py", "facts", run_dir, *([ref_dir] if ref_dir else []))
    return json.loads(out.strip().splitlines()[-1])


def reference() -> dict[str, Any]:
    """The uninterrupted 2-host job the training drills compare against (made once, then reused while the
    tracking server still has its run)."""
    path = RECORDS / "reference.json"
    if path.exists():
        ref = json.loads(path.read_text())
        try:
            run_facts(ref["run_dir"])
            return ref
        except DrillFailed:
            pass  # the box's databases were reset: make a new one
    name = f"drill-ref-{int(time.time())}"
    t0 = time.time()
    handle, job = submit(name)
    end = wait_done(handle, job, 300, RECORDS / name)
    ref = {"run_dir": f"runs/{name}", "job": job, "wall_s": round(end - t0)}
    path.write_text(json.dumps(ref))
    return ref


# --- the drills ------------------------------------------------------------------------------------------


def training_trial(drill: str, extra: list[str], breaker) -> dict[str, Any]:
    """Submit the 2-host job, let `breaker(name, job)` break something once a checkpoint past the first
    epoch is committed, wait for SUCCEEDED, and compare with the reference: one MLflow run, losses and
    test metrics equal."""
    ref = reference()
    name = f"drill-{drill}-{int(time.time())}"
    logs = RECORDS / name
    t0 = time.time()
    handle, job = submit(name, *extra, "--env", "LOGLEVEL=INFO")  # torchelastic logs its restarts
    rec: dict[str, Any] = {"job": job, "run_dir": f"runs/{name}", "reference_job": ref["job"]}
    rec["broken_at_step"] = wait_for_step(rec["run_dir"], STEPS_PER_EPOCH)
    run_before = json.loads((REPO / rec["run_dir"] / "mlflow_run.json").read_text())["run_id"]
    rec["broken_after_s"] = round(time.time() - t0)
    rec.update(breaker(name, job))
    end = wait_done(handle, job, 600, logs)
    rec["wall_s"] = round(end - t0)
    rec["nodes"] = nodes_of(job)
    rec["requeues"] = requeues(job)
    rec["torchrun_restarts"] = torchrun_restarts(logs)
    facts = run_facts(rec["run_dir"], ref["run_dir"])
    rec.update(facts)
    if facts["run_id"] != run_before:
        raise DrillFailed(f"the job moved to another MLflow run ({run_before} -> {facts['run_id']})", rec)
    if facts["runs_named"] != 1:
        raise DrillFailed(f"{facts['runs_named']} MLflow runs log run_dir runs/{name}", rec)
    if not facts["losses_equal"]:
        raise DrillFailed(f"losses differ from the reference: {facts['losses']}", rec)
    if not facts["metrics_complete"]:
        raise DrillFailed(f"metrics missing on the tracking server: {facts['metrics']}", rec)
    if not facts["test_metrics_equal"]:
        raise DrillFailed(f"test metrics differ from the reference: {facts['test_metrics']}", rec)
    return rec


def rank_kill() -> dict[str, Any]:
    """kill -9 of the training process on w2 (a child of torchrun): torchrun restarts the ranks in place
    (--max-restarts 1), they resume from the latest checkpoint; Slurm sees nothing."""

    def breaker(name: str, job: int) -> dict[str, Any]:
        ranks = [
            p for p in host_pids("w2") if "jobs.cli train" in cmdline(p) and "torchrun" in cmdline(parent(p))
        ]
        if len(ranks) != 1:
            raise DrillFailed(f"w2: {len(ranks)} training processes under torchrun, expected 1")
        os.kill(ranks[0], 9)
        return {"killed": f"pid {ranks[0]} on w2"}

    rec = training_trial("rank-kill", ["--max_retries", "1"], breaker)
    if rec["torchrun_restarts"] < 1:
        raise DrillFailed("no torchrun restart was logged", rec)
    if rec["requeues"] != 0:
        raise DrillFailed(f"{rec['requeues']} Slurm requeues: torchrun should have absorbed the kill", rec)
    return rec


def host_loss() -> dict[str, Any]:
    """Every process of w2 SIGKILLed (slurmd, slurmstepd, torchrun, the rank, the Ray worker), the host
    back 20 s later: torchrun on w1 times out (join_timeout), Slurm requeues (--max_retries 1), the second
    attempt resumes from the latest complete checkpoint."""

    def breaker(name: str, job: int) -> dict[str, Any]:
        box("kill-host", "w2")
        time.sleep(20)
        box("start-host", "w2")
        return {"killed": "host w2, back after 20 s"}

    rec = training_trial("host-loss", ["--max_retries", "1"], breaker)
    if rec["requeues"] < 1:
        raise DrillFailed("the job finished without a Slurm requeue", rec)
    return rec


def mlflow_restart() -> dict[str, Any]:
    """The tracking server stopped (SIGTERM to its process group) and started again 15 s later while the
    job trains: the clients' retries carry the metrics over the gap; every step's loss is on the server."""

    def breaker(name: str, job: int) -> dict[str, Any]:
        t = time.time()
        box("restart", "mlflow", "15")
        return {"killed": f"mlflow server, back after {time.time() - t:.0f} s"}

    rec = training_trial("mlflow-restart", [], breaker)
    if rec["requeues"] != 0 or rec["torchrun_restarts"] != 0:
        raise DrillFailed("the job restarted: the server's restart should not have reached it", rec)
    return rec


def ray_host_loss(lose: list[str]) -> dict[str, Any]:
    """The hosts `lose` (default w2; their Ray workers and everything else) SIGKILLed while `fuxi data
    build-sequences` rebuilds, on the Ray cluster, a shard directory that already holds a generation (a
    copy of the local build); they come back only after the build has ended. Either the build completes
    on what is left and its new generation equals a local build, or it fails with one `fuxi: error` line
    and publishes nothing: the manifest is the previous one, byte for byte, and still reads as the local
    build. Losing every worker host leaves the cluster no CPU (the head has none): the failure branch."""
    d = "runs/box-drills/ray-data-2m"  # about 30 s of build on the two workers (under load)
    synth = "--users 50000 --items 5000 --days 6 --events 2000000 --rows-per-part 100000 --overwrite"
    if not (REPO / d / "seq-local/manifest.json").exists():
        on("head", "fuxi", "data", "synth-logs", "--out", f"{d}/logs", *synth.split())
        on("head", "env", "-u", "RAY_ADDRESS", "fuxi", "data", "build-sequences", "--logs", f"{d}/logs",
           "--out", f"{d}/seq-local", "--partitions", "8")  # fmt: skip
    out = f"{d}/seq-{int(time.time())}"
    log = REPO / f"{out}.log"
    shutil.copytree(REPO / d / "seq-local", REPO / out)  # the previous generation the rebuild replaces
    manifest = REPO / out / "manifest.json"
    previous = manifest.read_bytes()
    t0 = time.time()
    with open(log, "w") as f:
        build = subprocess.Popen(
            [BOX, "exec", "head", "env", "-u", "RAY_ADDRESS", "fuxi", "data", "build-sequences", "--logs",
             f"{d}/logs", "--out", out, "--partitions", "8", "--ray-address", "10.77.0.10:6379"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a hung build is stopped whole (the driver too)
        )  # fmt: skip
    rec: dict[str, Any] = {"out": out, "lost": ",".join(lose)}
    wait = float(os.environ.get("DRILL_RAY_HANG_S", "400"))
    try:
        # mid-build: the driver has joined the cluster and its tasks run on both workers
        while "Connecting to existing Ray cluster" not in log.read_text(errors="replace"):
            if build.poll() is not None or time.time() - t0 > 120:
                raise DrillFailed(f"the build did not join the Ray cluster ({log})")
            time.sleep(0.5)
        time.sleep(float(os.environ.get("DRILL_RAY_KILL_AFTER", "3")))
        if build.poll() is not None:
            raise DrillFailed(f"the build ended before {rec['lost']} was lost ({log}): make the data bigger")
        rec["lost_after_s"] = round(time.time() - t0, 1)
        for host in lose:
            box("kill-host", host)
        try:
            rc = build.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            raise DrillFailed(
                f"the build hung: not done {wait:.0f} s after {rec['lost']} was lost ({log})", rec
            ) from None
    finally:
        if build.poll() is None:
            os.killpg(build.pid, 9)
            build.wait()
        for host in lose:
            box("start-host", host)
    rec["wall_s"] = round(time.time() - t0)
    rec["exit"] = rc
    text = log.read_text(errors="replace")
    rec["published"] = manifest.read_bytes() != previous
    rec["generation"] = json.loads(manifest.read_bytes())["generation"]
    cmp = on(
        "head",
        "python",
        "infra/box/compare_sequences.py",
        "--any-generation",
        out,
        f"{d}/seq-local",
        check=False,
    )
    rec["equals_local"] = cmp.startswith("equal")
    rec["compare"] = cmp.strip()
    if rc == 0:
        rec["outcome"] = "completed"
        if not rec["published"]:
            raise DrillFailed("the build completed but published no new generation", rec)
        if not rec["equals_local"]:
            raise DrillFailed(f"the build completed but differs from the local build: {cmp.strip()}", rec)
    else:
        lines = [ln for ln in text.splitlines() if ln.startswith("fuxi: error")]
        rec["outcome"] = "failed"
        rec["error_line"] = lines[-1] if lines else (text.strip().splitlines() or [""])[-1]
        # files of the generation that was never committed (named by it; the next commit removes them)
        rec["uncommitted_files"] = len(list((REPO / out).glob(f"*-g{rec['generation'] + 1:06d}*")))
        if rec["published"]:
            raise DrillFailed("the build failed but a manifest was published", rec)
        if not rec["equals_local"]:
            raise DrillFailed(
                f"the build failed and the previous generation no longer reads: {cmp.strip()}", rec
            )
        if len(lines) != 1:
            raise DrillFailed(f"the build failed without one 'fuxi: error' line ({log})", rec)
    # the retries Ray made: tasks whose node died
    rec["ray_retries_logged"] = len(re.findall(r"(?i)node.*(died|dead|failed)|retry", text))
    return rec


def cross() -> dict[str, Any]:
    """What crossing hosts costs: the same job with its 2 ranks on w1 and w2 (Slurm) and with both on w1
    (local_cwd), one after the other; the per-step time from the trainer's epoch times (median over the
    epochs after the first), and the bytes the item table's all-to-alls move per step (a2a_bytes.py)."""
    stamp = int(time.time())
    two = f"drill-cross-2host-{stamp}"
    t0 = time.time()
    handle, job = submit(two)
    wait_done(handle, job, 300, RECORDS / two)
    rec: dict[str, Any] = {"job": job, "wall_2host_s": round(time.time() - t0)}
    one = f"drill-cross-1host-{stamp}"
    t0 = time.time()
    on(
        "w1",
        "torchx",
        "run",
        "-s",
        "local_cwd",
        "jobs/components.py:train",
        "--nproc_per_node",
        "2",
        "--name",
        one,
        "--run_dir",
        f"runs/{one}",
        *JOB_ARGS,
    )
    rec["wall_1host_s"] = round(time.time() - t0)
    facts2, facts1 = run_facts(f"runs/{two}", f"runs/{one}"), run_facts(f"runs/{one}")
    rec["losses_equal"] = facts2["losses_equal"]
    for key, facts in (("2host", facts2), ("1host", facts1)):
        epochs = facts["epoch_seconds"][1:]
        rec[f"step_ms_{key}"] = round(1000 * statistics.median(epochs) / STEPS_PER_EPOCH, 1)
    rec["slowdown"] = round(rec["step_ms_2host"] / rec["step_ms_1host"], 2)
    a2a = f"runs/box-drills/a2a-{stamp}.json"
    on(
        "w1",
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        "infra/box/a2a_bytes.py",
        a2a,
        "train",
        "--preset",
        "tiny",
        "--set",
        f"epochs={EPOCHS}",
        "--set",
        "parallel.sharding_types=row_wise",
        "--set",
        f"run_dir=runs/drill-a2a-{stamp}",
        "--set",
        "tracking.enabled=false",
    )
    counted = json.loads((REPO / a2a).read_text())
    rec["a2a_bytes_per_step"] = [round(r["bytes_per_step"]) for r in counted["ranks"]]
    rec["a2a_calls_per_step"] = [round(r["calls"] / max(r["steps"], 1), 1) for r in counted["ranks"]]
    return rec


# --- facts from the tracking server (run inside the box) ------------------------------------------------


def facts(run_dir: str, ref_dir: str | None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()

    def run_id(d: str) -> str:
        return json.loads((Path(d) / "mlflow_run.json").read_text())["run_id"]

    def by_step(rid: str, key: str) -> dict[int, float]:
        """A metric's value at each step; a step logged twice (by a retry) must hold the same value."""
        values: dict[int, float] = {}
        for m in client.get_metric_history(rid, key):
            if values.setdefault(m.step, m.value) != m.value:
                values[m.step] = float("nan")  # differs from any reference value
        return values

    rid = run_id(run_dir)
    run = client.get_run(rid)
    # every run this job's attempts opened: the runs that log this run directory
    named = client.search_runs(
        [run.info.experiment_id], filter_string=f"params.run_dir = '{run.data.params.get('run_dir')}'"
    )
    test = {k: v for k, v in run.data.metrics.items() if k.startswith("final_test/")}
    out: dict[str, Any] = {
        "run_id": rid,
        "runs_named": len(named),
        "resumed_from": run.data.tags.get("resumed_from", ""),
        "loss_steps": len(by_step(rid, "train/loss")),
        "epoch_seconds": [v for _, v in sorted(by_step(rid, "train/epoch_seconds").items())],
    }
    if ref_dir:
        ref_id = run_id(ref_dir)
        a, b = by_step(rid, "train/loss"), by_step(ref_id, "train/loss")
        worst = max((abs(a[s] - b[s]) for s in a if s in b), default=float("inf"))
        out["losses_equal"] = sorted(a) == sorted(b) and worst == 0.0
        out["losses"] = f"{len(a)} steps vs {len(b)}, max |diff| {worst:.3g}"
        ref_metrics = client.get_run(ref_id).data.metrics
        ref_test = {k: v for k, v in ref_metrics.items() if k.startswith("final_test/")}
        out["test_metrics_equal"] = bool(test) and test == ref_test
        out["test_metrics"] = f"{len(test)} equal" if out["test_metrics_equal"] else f"{test} vs {ref_test}"
        # every metric the reference logged, at every step it logged it (the tracking server lost nothing)
        missing = [k for k in ref_metrics if set(by_step(rid, k)) != set(by_step(ref_id, k))]
        out["metrics_complete"] = not missing
        out["metrics"] = f"{len(ref_metrics)} keys, all steps" if not missing else f"steps differ: {missing}"
    return out


# --- records and tables ----------------------------------------------------------------------------------


def record(drill: str, fn) -> int:
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{drill}.jsonl"
    trial = sum(1 for _ in path.open()) + 1 if path.exists() else 1
    t = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        rec, error = fn(), None
    except DrillFailed as e:
        rec, error = (e.args[1] if len(e.args) > 1 else {}), str(e.args[0])
    rec = {"drill": drill, "trial": trial, "started": t, **rec, "passed": error is None}
    if error:
        rec["error"] = error
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))
    if error:
        print(f"drill {drill} trial {trial} FAILED: {error}", file=sys.stderr)
        return 1
    return 0


def table() -> None:
    def rows(drill: str) -> list[dict[str, Any]]:
        path = RECORDS / f"{drill}.jsonl"
        return [json.loads(line) for line in path.open()] if path.exists() else []

    def ok(r: dict[str, Any]) -> str:
        return "passed" if r["passed"] else f"FAILED: {cell(r.get('error', ''))}"

    def cell(v: Any) -> str:  # a markdown table cell: no pipes, paths relative to the repo
        return str(v).replace(f"{REPO}/", "").replace("|", "\\|")

    train_head = (
        "| trial | job | broken at (`latest`) | resumed from | Slurm requeues | torchrun restarts "
        "| submit -> SUCCEEDED | losses vs uninterrupted | metrics on the server | test metrics "
        "| MLflow runs | result |"
    )
    for drill in ("rank-kill", "host-loss", "mlflow-restart"):
        rs = rows(drill)
        if not rs:
            continue
        print(f"\n`{drill}`\n\n{train_head}\n|{'---|' * 12}")
        for r in rs:
            print(
                f"| {r['trial']} | {r.get('job', '')} | step {r.get('broken_at_step', '?')} "
                f"| `{Path(r.get('resumed_from', '') or '-').name}` | {r.get('requeues', '')} "
                f"| {r.get('torchrun_restarts', '')} | {r.get('wall_s', '')} s | {cell(r.get('losses', ''))} "
                f"| {r.get('metrics', '')} | {r.get('test_metrics', '')} | {r.get('runs_named', '')} "
                f"| {ok(r)} |"
            )
    rs = rows("ray-host-loss")
    if rs:
        print(
            "\n`ray-host-loss`\n\n| trial | hosts lost, after | build | wall | manifest published "
            "| the directory equals the local build | result |\n|---|---|---|---|---|---|---|"
        )
        for r in rs:
            outcome = r.get("outcome", "")
            if outcome == "failed":
                outcome += f": `{r.get('error_line', '')}`"
            print(
                f"| {r['trial']} | `{r.get('lost', 'w2')}`, {r.get('lost_after_s', '?')} s | {outcome} "
                f"| {r.get('wall_s', '')} s "
                f"| {r.get('published', '')} | {cell(r.get('compare', '-'))} | {ok(r)} |"
            )
    rs = rows("cross")
    if rs:
        print(
            "\n`cross`\n\n| trial | step, 2 hosts | step, 1 host 2 ranks | ratio | losses equal "
            "| table all-to-all bytes a step (rank 0, rank 1) | all-to-alls a step |\n" + "|---" * 7 + "|"
        )
        for r in rs:
            print(
                f"| {r['trial']} | {r.get('step_ms_2host', '')} ms | {r.get('step_ms_1host', '')} ms "
                f"| {r.get('slowdown', '')} | {r.get('losses_equal', '')} "
                f"| {', '.join(str(b) for b in r.get('a2a_bytes_per_step', []))} "
                f"| {r.get('a2a_calls_per_step', [''])[0]} |"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=(*DRILLS, "table", "facts"))
    p.add_argument("run_dirs", nargs="*", help="facts: RUN_DIR [REF_DIR]")
    p.add_argument("--lose", default="w2", help="ray-host-loss: the worker hosts lost, e.g. w1,w2")
    args = p.parse_args()
    if args.what == "facts":
        print(json.dumps(facts(args.run_dirs[0], args.run_dirs[1] if len(args.run_dirs) > 1 else None)))
        return 0
    if args.what == "table":
        table()
        return 0
    fns = {
        "rank-kill": rank_kill,
        "host-loss": host_loss,
        "ray-host-loss": lambda: ray_host_loss(args.lose.split(",")),
        "mlflow-restart": mlflow_restart,
        "cross": cross,
    }
    return record(args.what, fns[args.what])


if __name__ == "__main__":
    sys.exit(main())
