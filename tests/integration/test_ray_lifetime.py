"""No Ray process outlives a stopped `fuxi data build-sequences` (ray_session in pipeline/data/stream.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.ray_jobs import DATA_CLI, start_build


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopped_build_leaves_no_ray_process(sig: signal.Signals, tmp_path: Path) -> None:
    job = start_build(tmp_path)
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


BLOCKED = """
import ctypes
import pipeline.data.stream as stream

stream.STOP_GRACE_S = 1.0
libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)  # zeros: PTHREAD_MUTEX_INITIALIZER
with stream.ray_session():
    libc.pthread_mutex_lock(mutex)
    print("ready", flush=True)
    # the main thread blocked in C for good (a second lock of a normal mutex; signals do not interrupt
    # it): no Python handler can run
    libc.pthread_mutex_lock(mutex)
"""


def test_a_stop_ends_a_driver_blocked_in_c_code() -> None:
    """SIGTERM while the main thread sits in C code that never returns to the interpreter: the wakeup-fd
    watcher still starts the watchdog, and the process exits 128 + 15 after the grace period."""
    import os

    job = subprocess.Popen(
        [sys.executable, "-c", BLOCKED],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert job.stdout is not None and job.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        start = time.monotonic()
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=30) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 15
    finally:
        job.kill()  # a hung driver would otherwise outlive the test


CLUSTER = """
import sys
import ray

ray.init(num_cpus=1, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
if sys.stdin.readline():
    print(sum(1 for n in ray.nodes() if n["Alive"]), flush=True)
    sys.stdin.read()
ray.shutdown()
"""


def test_data_commands_join_the_cluster_named_by_ray_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--ray-address` makes build-sequences and append-day join that cluster (not start a local Ray), also
    with no RAY_ADDRESS in the environment; the cluster outlives the commands."""
    import os

    logs, seq = str(tmp_path / "logs"), str(tmp_path / "seq")
    subprocess.run(
        [*DATA_CLI, "synth-logs", "--out", logs, "--users", "200", "--items", "100", "--days", "2",
         "--events", "3000"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the commands and this cluster share no token file
    env = dict(os.environ)
    # the cluster lives in its own process: a Ray started inside the test process leaves state behind that
    # breaks the next test's local Ray (its GCS then wants a token the driver does not send)
    cluster = subprocess.Popen(
        [sys.executable, "-c", CLUSTER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert cluster.stdin is not None and cluster.stdout is not None
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the test's Ray cluster did not start"
        runs = [
            [*DATA_CLI, "build-sequences", "--logs", logs, "--out", seq, "--dates", "2024-01-01"],
            [*DATA_CLI, "append-day", "--logs", logs, "--date", "2024-01-02", "--sequences", seq],
        ]
        for argv in runs:
            done = subprocess.run(
                [*argv, "--ray-address", address], env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stderr[-2000:]
            joined = f"Connecting to existing Ray cluster at address: {address}"
            assert joined in done.stderr, done.stderr[-2000:]
            assert "Started a local Ray instance" not in done.stderr
        cluster.stdin.write("nodes\n")
        cluster.stdin.flush()
        assert cluster.stdout.readline().strip() == "1"  # the test's cluster is still up, one node alive
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
    manifest = json.loads((tmp_path / "seq" / "manifest.json").read_text())
    assert "2024-01-02" in json.dumps(manifest), manifest
