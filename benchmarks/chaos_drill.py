"""Chaos drill: a 2-rank TorchX `local_cwd` job with retries loses a rank to SIGKILL and finishes by itself.

Each trial submits `jobs/components.py:train` (tiny preset, 2 gloo ranks, `--max_retries 3`, a checkpoint
every 4 steps), picks a random step, and once the latest checkpoint has reached it kills one random rank
with SIGKILL (within half a second, so mid-step or mid-save). torchrun stops the other rank and starts
both again; they resume from the latest checkpoint and continue the same MLflow run. A trial passes when
the job SUCCEEDED after >= 1 restart, the run is one MLflow run that FINISHED, and its per-epoch losses
and test metrics equal an uninterrupted run's.

    .venv/bin/python benchmarks/chaos_drill.py --trials 5 --out runs/chaos
prints one row per trial (restarts, wall time, equality) and a summary; tests/integration/test_chaos.py
runs it with one trial.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
TORCHX = str(Path(sys.executable).with_name("torchx"))
EPOCHS, STEPS = 8, 64  # 1000 synthetic users: 8 global batches of 128 an epoch on 2 ranks
OVERRIDES = [
    f"epochs={EPOCHS}",
    "data.synthetic.num_users=1000",
    "checkpoint_every_steps=4",
    "progress=false",
    "tracking.experiment=chaos",
]


@dataclass
class Trial:
    name: str
    succeeded: bool
    killed_rank: int | None
    killed_after_step: int | None
    restarts: int
    mlflow_runs: int
    run_status: str
    losses_equal: bool
    test_equal: bool
    wall_s: float

    @property
    def passed(self) -> bool:
        return (
            self.succeeded
            and self.killed_rank is not None
            and self.restarts >= 1
            and self.mlflow_runs == 1
            and self.run_status == "FINISHED"
            and self.losses_equal
            and self.test_equal
        )


def submit(root: Path, name: str, max_retries: int = 3) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("TORCHXCONFIG", None)
    args = [
        TORCHX, "run", "-s", "local_cwd", "-cfg", f"log_dir={root / 'torchx_logs'}",
        "jobs/components.py:train", "--preset", "tiny", "--nproc_per_node", "2", "--cpu", "2",
        "--run_dir", str(root / name), "--tracking_uri", f"sqlite:///{root / 'mlflow.db'}",
        "--name", name, "--max_retries", str(max_retries), *OVERRIDES,
    ]  # fmt: skip
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def workers(run_dir: Path) -> dict[int, psutil.Process]:
    """LOCAL_RANK -> the training process of that rank, for the job training in `run_dir`."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            # the run dir reaches the trainer as `--set run_dir=<dir>`
            if f"run_dir={run_dir}" not in cmd or "jobs.cli" not in cmd:
                continue
            rank = proc.environ().get("LOCAL_RANK")
            if rank is not None and "torchrun" not in " ".join(cmd[:2]):
                found[int(rank)] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_a_rank(run_dir: Path, rng: random.Random, job: subprocess.Popen) -> tuple[int, int]:
    """Pick a random step of the run; once the latest checkpoint has reached it, SIGKILL a random rank
    within half a second. Returns the rank and the step of the latest checkpoint when it was killed."""
    latest = run_dir / "checkpoints" / "latest"
    target = rng.randrange(4, STEPS - 8)  # leaves at least 8 steps to run after the kill

    def reached() -> int:
        try:
            return int(json.loads(latest.read_text())["meta"]["step"])  # the pointer object (checkpoint.py)
        except (OSError, KeyError, TypeError, ValueError):  # not written yet
            return 0

    while reached() < target:
        if job.poll() is not None:
            raise RuntimeError(f"{run_dir.name} ended before step {target}")
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))
    rank = rng.randrange(2)
    procs = workers(run_dir)
    if rank not in procs:
        raise RuntimeError(f"{run_dir.name}: rank {rank} not found to kill (finished already?)")
    step = reached()
    procs[rank].send_signal(signal.SIGKILL)
    return rank, step


def run_record(db: Path, run_dir: Path) -> dict[str, Any]:
    """The MLflow runs that trained in `run_dir` (its `run_dir` param), their status, metric histories."""
    with sqlite3.connect(db) as con:
        runs = con.execute(
            "select r.run_uuid, r.status from runs r join params p on p.run_uuid = r.run_uuid "
            "where p.key = 'run_dir' and p.value = ?",
            (str(run_dir),),
        ).fetchall()
        out: dict[str, Any] = {"runs": len(runs), "status": runs[0][1] if runs else "", "metrics": {}}
        if runs:
            rows = con.execute(
                "select key, step, value from metrics where run_uuid = ? order by step", (runs[0][0],)
            ).fetchall()
            for key, step, value in rows:
                out["metrics"].setdefault(key, {}).setdefault(step, set()).add(value)
            restarts = con.execute(
                "select value from tags where run_uuid = ? and key = 'fuxi.restarts'", (runs[0][0],)
            ).fetchone()
            out["restarts"] = int(restarts[0]) if restarts else 0
    return out


def curve(record: dict[str, Any], key: str) -> dict[int, float] | None:
    """step -> value; None when a step holds two different values (a curve that forked)."""
    points = record["metrics"].get(key, {})
    if any(len(v) != 1 for v in points.values()):
        return None
    return {step: next(iter(v)) for step, v in points.items()}


def compare(ref: dict[str, Any], got: dict[str, Any]) -> tuple[bool, bool]:
    losses = curve(got, "train/epoch_loss")
    want = curve(ref, "train/epoch_loss")
    losses_equal = losses is not None and want is not None and len(want) == EPOCHS and losses == want
    test_keys = [k for k in ref["metrics"] if k.startswith("final_test/")]
    test_equal = bool(test_keys) and all(curve(got, k) == curve(ref, k) for k in test_keys)
    return losses_equal, test_equal


def reference(root: Path) -> dict[str, Any]:
    name = "chaos-reference"
    if not (root / name / "checkpoints" / "final").exists():
        job = submit(root, name)
        if job.wait() != 0:
            raise RuntimeError(f"the uninterrupted run failed: see {root / (name + '.log')}")
    return run_record(root / "mlflow.db", root / name)


def trial(root: Path, index: int, rng: random.Random, ref: dict[str, Any]) -> Trial:
    name = f"chaos-{index}"
    start = time.time()
    job = submit(root, name)
    killed: tuple[int | None, int | None] = (None, None)
    try:
        killed = kill_a_rank(root / name, rng, job)
    except RuntimeError as e:
        print(f"  {e}", file=sys.stderr)
    code = job.wait(timeout=900)
    wall = time.time() - start
    got = run_record(root / "mlflow.db", root / name)
    losses_equal, test_equal = compare(ref, got) if got["runs"] == 1 else (False, False)
    return Trial(
        name,
        code == 0,
        killed[0],
        killed[1],
        got.get("restarts", 0),
        got["runs"],
        got["status"],
        losses_equal,
        test_equal,
        round(wall, 1),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", default="runs/chaos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    ref = reference(root)
    print(f"uninterrupted reference: {time.time() - t0:.1f} s")
    print(f"{'trial':10s} {'killed':>6s} {'after_step':>10s} {'restarts':>8s} {'runs':>4s} {'status':>9s} "
          f"{'losses=':>7s} {'test=':>5s} {'wall_s':>6s}  ok")  # fmt: skip
    trials = []
    for i in range(args.trials):
        t = trial(root, i, rng, ref)
        trials.append(t)
        row = (
            f"{t.name:10s} {t.killed_rank!s:>6s} {t.killed_after_step!s:>10s} {t.restarts:8d} "
            f"{t.mlflow_runs:4d} {t.run_status:>9s} {t.losses_equal!s:>7s} {t.test_equal!s:>5s} "
            f"{t.wall_s:6.1f}  "
        )
        print(row + ("PASS" if t.passed else "FAIL"), flush=True)
    passed = sum(t.passed for t in trials)
    walls = [t.wall_s for t in trials]
    print(f"\n{passed}/{len(trials)} trials recovered by themselves with equal losses and test metrics; "
          f"wall {min(walls):.0f}-{max(walls):.0f} s (uninterrupted run: see above)")  # fmt: skip
    (root / "drill.json").write_text(json.dumps([asdict(t) | {"passed": t.passed} for t in trials], indent=1))
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
