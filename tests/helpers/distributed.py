"""Running the trainer for a test: in this process with every logged metric kept, or under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class RecordingLogger:
    """Keeps every logged metric (the trainer logs train/loss each step with log_every_steps=1)."""

    run_id = None

    def __init__(self) -> None:
        self.points: list[tuple[int, str, float]] = []

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifacts(self, path: Any, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.points.extend((step, k, float(v)) for k, v in metrics.items())

    def losses(self) -> list[float]:
        return [v for _, k, v in self.points if k == "train/loss"]


def run_recorded(cfg: Any) -> dict[str, Any]:
    """run(cfg) with a recording logger: per-step losses, per-epoch metrics, final test metrics, plan."""
    from pipeline.train.run import run

    logger = RecordingLogger()
    report = run(cfg, logger=logger)
    return {
        "losses": logger.losses(),
        "history": report["history"],
        "test": report["test"],
        "sharding": report["sharding"],
        "resumed_from": report["resumed_from"],
        "steps": report["steps"],
        "checkpoint": report["checkpoint"],
    }


def torchrun(nproc: int, args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Launch a test file of this repository as a torchrun worker (gloo, CPU, one thread per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp_path / f"torchrun-{nproc}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc
