"""Chaos: a 2-rank TorchX local_cwd job with retries loses a rank to SIGKILL at a random step and finishes
by itself, with the per-epoch losses and test metrics of an uninterrupted run, in one MLflow run.

The drill (benchmarks/chaos_drill.py, 5 trials) reports restarts and wall times; this runs it with one
trial, as a user would, and reads the trial back from the drill's JSON.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigkilled_rank_recovers_to_the_uninterrupted_result(tmp_path: Path) -> None:
    seed = random.randrange(1 << 16)
    cmd = [sys.executable, "benchmarks/chaos_drill.py", "--trials", "1", "--seed", str(seed)]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "drill.json").exists(), output  # the uninterrupted reference run finished
    (t,) = json.loads((tmp_path / "drill.json").read_text())
    what = f"seed {seed}: {t}\n{output}"
    assert t["killed_rank"] is not None, what
    assert t["succeeded"] and t["restarts"] >= 1, what  # torchrun restarted the job; it exited 0
    assert t["mlflow_runs"] == 1 and t["run_status"] == "FINISHED", what  # one run record, not left RUNNING
    assert t["losses_equal"] and t["test_equal"], what  # equal to the uninterrupted run's
    assert proc.returncode == 0, what  # the drill's verdict: every trial passed
