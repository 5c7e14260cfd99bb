"""No Ray process outlives a stopped `fuxi data build-sequences` (ray_session in pipeline/data/stream.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopped_build_leaves_no_ray_process(sig: signal.Signals, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "jobs.cli", "data"]
    subprocess.run(
        [*cli, "synth-logs", "--out", str(tmp_path / "logs"), "--users", "2000", "--days", "2", "--events",
         "200000"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    job = subprocess.Popen(
        [*cli, "build-sequences", "--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "seq")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    driver = psutil.Process(job.pid)
    deadline, ray = time.time() + 120, []
    while time.time() < deadline and job.poll() is None:  # wait until Ray's processes are up
        ray = [p for p in driver.children(recursive=True) if "ray" in " ".join(p.cmdline()).lower()]
        if len(ray) >= 2:
            break
        time.sleep(0.2)
    assert ray, "the build ended before Ray started; nothing was tested"
    job.send_signal(sig)
    job.wait(timeout=60)
    time.sleep(5)
    alive = [p for p in ray if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, [p.name() for p in alive]
    assert not (tmp_path / "seq" / "manifest.json").exists()  # stopped before its commit: nothing published
