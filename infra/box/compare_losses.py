"""Compare the per-step training losses of two jobs, read back from the tracking server.

    python infra/box/compare_losses.py runs/box-2host runs/box-1host        # run directories
    python infra/box/compare_losses.py --run-id <id> --run-id <id>           # or MLflow run ids

A run directory names its MLflow run in `mlflow_run.json` (every attempt of a job logs to that one run).
Equal means: the same steps, and at every step the same loss to `--atol` (0: bit for bit). Exits 1 with one
line naming the first step that differs, else prints the table and exits 0.
"""

import argparse
import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

METRIC = "train/loss"


def run_id_of(run_dir: str) -> str:
    path = Path(run_dir) / "mlflow_run.json"
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: no MLflow run id ({e})") from None


def losses(client: MlflowClient, run_id: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, METRIC)
    if not history:
        raise SystemExit(f"run {run_id}: no {METRIC!r} metric")
    by_step: dict[int, float] = {}
    for m in history:
        if m.step in by_step and by_step[m.step] != m.value:
            raise SystemExit(f"run {run_id}: step {m.step} logged twice with different losses")
        by_step[m.step] = m.value
    return by_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", help="two run directories (each with mlflow_run.json)")
    p.add_argument("--run-id", action="append", default=[], help="an MLflow run id (twice)")
    p.add_argument("--atol", type=float, default=0.0, help="allowed absolute difference per step")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    args = p.parse_args()
    ids = [run_id_of(d) for d in args.run_dirs] + args.run_id
    if len(ids) != 2:
        p.error("give exactly two runs (run directories or --run-id)")

    client = MlflowClient(tracking_uri=args.tracking_uri)
    a, b = (losses(client, i) for i in ids)
    if sorted(a) != sorted(b):
        print(f"steps differ: {ids[0]} has {sorted(a)}, {ids[1]} has {sorted(b)}", file=sys.stderr)
        return 1
    print(f"{'step':>5}  {ids[0]:>32}  {ids[1]:>32}  diff")
    worst = 0.0
    for step in sorted(a):
        diff = abs(a[step] - b[step])
        worst = max(worst, diff)
        print(f"{step:>5}  {a[step]:>32.9f}  {b[step]:>32.9f}  {diff:.3g}")
    for step in sorted(a):
        if abs(a[step] - b[step]) > args.atol:
            msg = f"losses differ at step {step}: {a[step]!r} != {b[step]!r} (atol {args.atol})"
            print(msg, file=sys.stderr)
            return 1
    print(f"{len(a)} steps equal (max |diff| {worst:.3g}, atol {args.atol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
