"""Chaos: a 2-rank TorchX local_cwd job with retries loses a rank to SIGKILL at a random step and finishes
by itself, with the per-epoch losses and test metrics of an uninterrupted run, in one MLflow run.

The drill (benchmarks/chaos_drill.py, 5 trials) reports restarts and wall times; this runs one trial.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from benchmarks.chaos_drill import reference, trial


@pytest.mark.slow
def test_sigkilled_rank_recovers_to_the_uninterrupted_result(tmp_path: Path) -> None:
    ref = reference(tmp_path)
    assert ref["runs"] == 1 and ref["status"] == "FINISHED" and ref["restarts"] == 0
    seed = random.randrange(1 << 16)
    t = trial(tmp_path, 0, random.Random(seed), ref)
    what = f"seed {seed}: {t}"
    assert t.killed_rank is not None, what
    assert t.succeeded and t.restarts >= 1, what  # torchrun restarted the job; it exited 0
    assert t.mlflow_runs == 1 and t.run_status == "FINISHED", what  # one run record, not left RUNNING
    assert t.losses_equal and t.test_equal, what  # equal to the uninterrupted run's
