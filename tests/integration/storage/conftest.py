"""A real S3 endpoint on this machine for the storage tests: SeaweedFS on free ports of 127.0.0.1, started
once per session through `infra.seaweedfs` (how it is started and stopped is documented there).

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
import threading
import uuid
from pathlib import Path

import pytest

from infra.seaweedfs import SeaweedFS, SeaweedFSError, start

ACCESS_KEY = "storage-test-key"
SECRET_KEY = "storage-test-secret-0123456789"
BUCKET = "fuxi-test"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):
    try:
        server = start(tmp_path_factory.mktemp("seaweedfs"), BUCKET, ACCESS_KEY, SECRET_KEY)
    except SeaweedFSError as e:
        pytest.fail(str(e))
    print(f"\nseaweedfs: S3 at {server.endpoint} ready in {server.startup_s:.1f}s (pid {server.pid})")
    try:
        yield server
    finally:
        server.stop()


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
