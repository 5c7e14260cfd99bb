"""The tiny preset's per-step training losses are a regression test (as torchtitan's tests/assets/losses).

A change that should not affect numerics (a refactor, a faster path claimed equal) must reproduce the
recorded curve exactly: same preset, seed, one process, one CPU thread (the thread count changes float
reduction orders), fp32. A change meant to alter numerics regenerates the file, with one command:

    FUXI_UPDATE_LOSS_CURVES=1 PYTHONPATH=$PWD python -m pytest -q tests/integration/test_loss_curve.py

and the commit says why the curve moved. The file also records the torch version and CPU it was made
with: on that CPU the comparison is exact; on another CPU model (other SIMD kernels, other float summation
orders) each loss must match within a relative 1e-5, far below what a numerics change moves (>1e-3 here).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CURVE = Path(__file__).resolve().parents[1] / "assets" / "losses" / "tiny_cpu.txt"
EPOCHS = 3  # 4 steps an epoch (200 users, batches of 64): 12 steps
UPDATE = os.environ.get("FUXI_UPDATE_LOSS_CURVES") == "1"


def tiny_losses(run_dir: Path) -> list[float]:
    from pipeline.train.presets import tiny
    from tests.helpers.distributed import run_recorded

    cfg = tiny()
    cfg.epochs = EPOCHS
    cfg.tracking.enabled = False
    cfg.tracking.log_every_steps = 1
    cfg.checkpoint_every_epochs = 0
    cfg.run_dir = str(run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_recorded(cfg)["losses"]
    finally:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def write_curve(path: Path, losses: list[float]) -> None:
    header = [
        (
            f"# Per-step training loss of the `tiny` preset (pipeline/train/config.py), {EPOCHS} epochs, "
            "seed 42, one"
        ),
        "# process, one CPU thread, fp32; tests/integration/test_loss_curve.py compares a fresh run to it.",
        "# Regenerate after a change meant to alter numerics (and say why in the commit):",
        "#   make loss-curves",
        f"# recorded with torch {torch.__version__} on {platform.machine()} {cpu_model()}".rstrip(),
        "# step loss",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + [f"{step} {loss!r}" for step, loss in enumerate(losses, 1)]) + "\n")


def read_curve(path: Path) -> list[float]:
    rows = [
        line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert [int(step) for step, _ in rows] == list(range(1, len(rows) + 1)), (
        f"{path}: steps must be 1, 2, ..."
    )
    return [float(loss) for _, loss in rows]


def test_tiny_loss_curve_matches_the_recorded_one(tmp_path: Path) -> None:
    losses = tiny_losses(tmp_path / "run")
    assert len(losses) == 4 * EPOCHS
    if UPDATE:
        write_curve(CURVE, losses)
    recorded = read_curve(CURVE)
    same_cpu = f"on {platform.machine()} {cpu_model()}".rstrip() in CURVE.read_text().splitlines()[4]
    rtol = 0.0 if same_cpu else 1e-5

    def differs(a: float, b: float) -> bool:
        return abs(a - b) > rtol * abs(b)

    first = next((k for k, (a, b) in enumerate(zip(losses, recorded)) if differs(a, b)), None)
    assert first is None and len(losses) == len(recorded), (
        f"loss curve differs from {CURVE.name} (rtol {rtol:g}) from step "
        f"{None if first is None else first + 1} on "
        f"(got {losses}, recorded {recorded}); if the change is meant to alter numerics, regenerate it "
        "(see the file's header)"
    )
