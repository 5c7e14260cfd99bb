"""`python -m infra.seaweedfs up / env / down --dir D`: a server outliving the command that started it, its
`export AWS_...` lines enough for the project's clients, one server per folder, and `down` leaving no
process behind."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from infra.seaweedfs import STATE_FILE, load_state

REPO = Path(__file__).resolve().parents[3]


def seaweedfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra.seaweedfs", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0]
    return env


def test_up_prints_the_env_and_down_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "s3"
    up = seaweedfs("up", "--dir", str(home))
    assert up.returncode == 0, up.stderr
    pid = load_state(home).pid
    try:
        env = parse_exports(up.stdout)
        assert sorted(env) == ["AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_SECRET_ACCESS_KEY"]
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert oct((home / STATE_FILE).stat().st_mode)[-3:] == "600"  # it holds the keys
        assert parse_exports(seaweedfs("env", "--dir", str(home)).stdout) == env

        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        storage.write_bytes("s3://fuxi/hello.txt", b"hello")  # the bucket it created takes writes
        assert storage.read_bytes("s3://fuxi/hello.txt") == b"hello"

        again = seaweedfs("up", "--dir", str(home))
        assert (again.returncode, again.stderr.strip()) == (
            1,
            f"seaweedfs: {home}: a server is already running here (`down --dir {home}` first)",
        )
    finally:
        down = seaweedfs("down", "--dir", str(home))
    assert down.returncode == 0, down.stderr
    assert not (home / STATE_FILE).exists()
    assert gone(pid)


def gone(pid: int) -> bool:
    """No such process, or a zombie waiting for init to reap it (its parent, `up`, exited long ago)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_down_without_a_server_is_one_line(tmp_path: Path) -> None:
    down = seaweedfs("down", "--dir", str(tmp_path))
    assert (down.returncode, down.stderr.strip()) == (
        1,
        f"seaweedfs: {tmp_path.resolve() / STATE_FILE}: no server recorded here "
        f"(start one with `up --dir {tmp_path}`)",
    )
