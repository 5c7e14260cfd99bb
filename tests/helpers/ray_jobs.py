"""A `fuxi data build-sequences` job started in the background, for tests that watch the local Ray it starts
(its processes, their sockets, what is left after a signal).

    job = start_build(tmp_path)   # synthetic logs in tmp_path/logs, the build writing tmp_path/seq
    driver = psutil.Process(job.pid)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO

DATA_CLI = [sys.executable, "-m", "jobs.cli", "data"]


def start_build(tmp_path: Path, stderr: int | IO[bytes] = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Write synthetic logs (2000 users, 2 days, 200000 events: a build that runs long enough to be watched)
    to tmp_path/logs and start `build-sequences` of them into tmp_path/seq; stdout is dropped, stderr goes
    to `stderr` (subprocess.PIPE to read the job's errors)."""
    logs = str(tmp_path / "logs")
    subprocess.run(
        [*DATA_CLI, "synth-logs", "--out", logs, "--users", "2000", "--days", "2", "--events", "200000"],
        check=True,
        capture_output=True,
    )
    return subprocess.Popen(
        [*DATA_CLI, "build-sequences", "--logs", logs, "--out", str(tmp_path / "seq")],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
