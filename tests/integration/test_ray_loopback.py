"""The local Ray a data job starts listens on loopback only (pipeline/data/stream.py `init_ray`).

Every listening TCP socket of the job's process tree (driver, GCS, raylet, workers, agents) is sampled
while `fuxi data build-sequences` runs; each must be bound to 127.0.0.1 (IPv4 or IPv4-mapped IPv6) or ::1.
Without `init_ray`'s single-machine mode, Ray 2.60 binds GCS, raylet and the workers to `::`.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from pathlib import Path

import psutil

from tests.helpers.ray_jobs import start_build


def listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `root` and its descendants."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # a worker that ended between the listing and the look
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_data_job_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    job = start_build(tmp_path, stderr=subprocess.PIPE)
    driver = psutil.Process(job.pid)
    seen: set[tuple[str, str, int]] = set()
    deadline = time.time() + 300
    while job.poll() is None and time.time() < deadline:
        try:
            seen |= listening(driver)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err.decode()[-2000:]
    names = {name for name, _, _ in seen}
    # the servers of a local Ray were up while sampled: GCS and raylet at least
    assert {"gcs_server", "raylet"} <= names, sorted(seen)
    outside = sorted(s for s in seen if not is_loopback(s[1]))
    assert not outside, f"listening beyond loopback: {outside}"
