"""Runs jobs/dags/fuxi_nightly.py with `dag.test()` (called by scripts/airflow_test.sh, in .venv-airflow).

Checks, on the embedded synthetic data:
  1. day 1 succeeds end to end and registers the first champion;
  2. day 2 succeeds (warm start from day 1's champion);
  3. day 2 again succeeds and changes nothing: MLflow runs, model versions, the alias, the state files;
  4. day 3 with a step forced to fail (FUXI_NIGHTLY_FAIL_STEP) fails and leaves the champion as it was;
  5. day 3 again, without the fault, succeeds from the failed step.
Prints one JSON line `AIRFLOW_TEST_RESULT {...}` and exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def snapshot(db: Path, workdir: Path) -> dict:
    """What a re-run must not change: runs, versions and aliases in MLflow, and the per-date state files."""
    con = sqlite3.connect(db)
    try:
        runs = con.execute("select count(*) from runs").fetchone()[0]
        versions = con.execute("select count(*) from model_versions").fetchone()[0]
        aliases = dict(con.execute("select alias, version from registered_model_aliases").fetchall())
    finally:
        con.close()
    states = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted((workdir / "state").glob("*.json"))
    }
    return {"runs": runs, "versions": versions, "aliases": aliases, "states": states}


def events(workdir: Path, date: str) -> list[str]:
    """The date's audit events, oldest first: one JSON object each in `state/<date>.events/`, named by time
    (jobs.nightly.read_events; read here by hand, since this venv is Airflow's, without the project)."""
    folder = workdir / "state" / f"{date}.events"
    return [json.loads(p.read_text())["event"] for p in sorted(folder.glob("*.json"))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dag-file", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dates", default="2024-01-01,2024-01-02,2024-01-03")
    ap.add_argument("--fail-step", default="register_promote")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    db = workdir / "mlflow.db"
    spec = importlib.util.spec_from_file_location("fuxi_nightly_dag", args.dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag
    dates = args.dates.split(",")
    d1, d2, d3 = [datetime.fromisoformat(d).replace(tzinfo=timezone.utc) for d in dates]
    result: dict = {"timings": {}}

    def run(label: str, when: datetime, fail: str | None = None) -> str:
        if fail:
            os.environ["FUXI_NIGHTLY_FAIL_STEP"] = fail
        else:
            os.environ.pop("FUXI_NIGHTLY_FAIL_STEP", None)
        t0 = time.monotonic()
        dagrun = dag.test(logical_date=when)
        result["timings"][label] = round(time.monotonic() - t0, 1)
        state = str(getattr(dagrun.state, "value", dagrun.state))
        print(f"== {label}: dag run {state} in {result['timings'][label]}s", flush=True)
        return state

    def check(name: str, ok: bool, detail: object = "") -> None:
        result.setdefault("checks", {})[name] = bool(ok)
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)
        if not ok:
            print("AIRFLOW_TEST_RESULT " + json.dumps(result), flush=True)
            sys.exit(1)

    check("day1 succeeds", run("day1", d1) == "success")
    s1 = snapshot(db, workdir)
    check("day1 registers a champion", s1["aliases"].get("champion") is not None, s1)
    check("day2 succeeds", run("day2", d2) == "success")
    s2 = snapshot(db, workdir)
    check(
        "day2 adds one run and one version",
        (s2["runs"], s2["versions"]) == (s1["runs"] + 1, s1["versions"] + 1),
        s2,
    )
    skipped_before = events(workdir, dates[1]).count("skipped")
    check("day2 re-run succeeds", run("day2_rerun", d2) == "success")
    s2b = snapshot(db, workdir)
    check(
        "day2 re-run ran every task, each a no-op",
        events(workdir, dates[1]).count("skipped") - skipped_before == 5,
    )
    check("day2 re-run changes nothing", s2b == s2, s2b)
    check(
        f"day3 with {args.fail_step} forced to fail fails", run("day3_fail", d3, args.fail_step) == "failed"
    )
    s3f = snapshot(db, workdir)
    steps3 = json.loads((workdir / "state" / f"{dates[2]}.json").read_text())["steps"]
    check(
        f"day3 failed at {args.fail_step}",
        steps3.get(args.fail_step, {}).get("status") == "failed",
        {k: v["status"] for k, v in steps3.items()},
    )
    check("the failure leaves the champion", s3f["aliases"] == s2["aliases"], s3f)
    check("day3 re-run succeeds", run("day3_retry", d3) == "success")
    s3 = snapshot(db, workdir)
    state3 = json.loads((workdir / "state" / f"{dates[2]}.json").read_text())
    decision = state3["steps"]["register_promote"]["outputs"]["decision"]
    check("day3 retry registered no second version", s3["versions"] == s3f["versions"], s3)
    check(
        "day3 alias follows the decision",
        str(s3["aliases"]["champion"])
        == str(decision["version"] if decision["promoted"] else s2["aliases"]["champion"]),
        decision["reason"],
    )
    result.update(final=s3, day3_decision=decision)
    print("AIRFLOW_TEST_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
