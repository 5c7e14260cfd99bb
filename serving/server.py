"""`fuxi serve`: the served model over HTTP, in one process (uvicorn), holding under hostile input.

    fuxi serve --model models:/fuxi-alpha@champion --port 5000              # loopback: no token
    fuxi serve --model s3://bucket/runs/tiny/checkpoints                    # a checkpoint on a store
    FUXI_SERVE_TOKEN=... fuxi serve --model ... --host 0.0.0.0              # any other address: a token

The model is loaded only as serving/trust.py allows (a model or checkpoint folder of the project's own
files, checked; never `mlflow.pyfunc.load_model`); a checkpoint on an object store is resolved to its
generation and staged into a local folder first (serving/loading.py `local_checkpoint`, as `fuxi
recommend` does), and the checks read the staged copy. Then `ServingApp` answers MLflow's scoring routes
itself, with MLflow's request and response layout (serving/pyfunc.py documents the fields):

  POST /invocations  exactly one Content-Type, application/json (charset utf-8 if given), else 415; a
                     body of at most `max_body_bytes` (413, checked against Content-Length before
                     reading and while reading) that arrives within `body_timeout_s` (408: a slow or
                     endless body holds nothing; a request head must arrive within the same time of the
                     connection opening or the last response, else the connection is closed); strict
                     JSON (no NaN, no duplicate keys, 400 for deep nesting or a 5,000-digit number);
                     `check_request` with the server's limits (k, history, users); the answer strict
                     JSON, never row 0, a seen item (filter_seen) or a non-finite score
  GET /ping, /health 200 (no token: what a load balancer probes)
  GET /version       the model version served
With a token every route but /ping and /health needs `Authorization: Bearer <token>` (401 otherwise).
Every refusal is {"error_code": ..., "message": "<field>: <what is wrong>"}, one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serving.pyfunc import DATA_KEYS, Limits, RequestError, check_request

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY_BYTES = 16 * 1024 * 1024  # 256 users x 1000 ids and timestamps as JSON fit with room
BODY_TIMEOUT_S = 10.0
MIN_TOKEN_CHARS = 16
TOKEN_ENV = "FUXI_SERVE_TOKEN"
OPEN_ROUTES = ("/ping", "/health")


@dataclass(frozen=True)
class ServerSettings:
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S
    token: str | None = None  # bearer token clients must send (required off loopback)

    def __post_init__(self) -> None:
        for name, value, low in (
            ("--max-users", self.limits.max_users, 1),
            ("--max-history", self.limits.max_history, 1),
            ("--max-k", self.limits.max_k, 1),
            ("--max-body-bytes", self.max_body_bytes, 1024),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**31:
                raise ValueError(f"{name} must be an integer in {low}..2^31 (got {value!r})")
        timeout = self.body_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ValueError(f"--body-timeout must be a number of seconds in (0, 3600] (got {timeout!r})")
        if self.token is not None and (
            len(self.token) < MIN_TOKEN_CHARS or not self.token.isprintable() or " " in self.token
        ):
            raise ValueError(
                f"the bearer token must be at least {MIN_TOKEN_CHARS} printable characters, no spaces"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


# ---------------------------------------------------------------------------------------------------
# the body


def _strict_object(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(items)
    if len(out) != len(items):
        seen: set[str] = set()
        dup = next(k for k, _ in items if k in seen or seen.add(k))
        raise RequestError("body", f"duplicate key {dup[:40]!r}")
    return out


def _no_constant(name: str) -> Any:
    raise RequestError("body", f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN / Infinity, no duplicate keys; every failure a RequestError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("body", f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except RequestError:
        raise
    except json.JSONDecodeError as exc:
        raise RequestError("body", f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise RequestError("body", "nested too deeply") from None
    except ValueError as exc:  # Python's limit on integer digits (4300)
        raise RequestError("body", f"a number too long ({str(exc).split(':')[0][:80]})") from None


def body_records(body: bytes) -> tuple[Any, Any, str]:
    """(records, params, the data key) of a JSON /invocations body, in any layout MLflow's scoring server
    takes (dataframe_records, dataframe_split, inputs as records; instances is refused)."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise RequestError("body", "expected a JSON object")
    unknown = sorted(set(doc) - set(DATA_KEYS) - {"params"})
    if unknown:
        raise RequestError(unknown[0][:80], f"unknown field (expected one of {', '.join(DATA_KEYS)}, params)")
    keys = [k for k in DATA_KEYS if k in doc]
    if len(keys) != 1:
        raise RequestError("body", f"expected exactly one of {', '.join(DATA_KEYS)}")
    key, data = keys[0], doc[keys[0]]
    if key == "instances":  # MLflow parses it as a tensor batch, which the column schema rejects
        raise RequestError(key, "not supported by this model: send dataframe_records (or inputs)")
    if key == "dataframe_split":
        if not isinstance(data, dict):
            raise RequestError(key, "expected an object with columns and data")
        bad = sorted(set(data) - {"columns", "data", "index"})
        if bad:
            raise RequestError(f"{key}.{bad[0][:40]}", "unknown field (expected columns, data, index)")
        columns = data.get("columns")
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise RequestError(f"{key}.columns", "expected a list of column names (strings)")
        if len(set(columns)) != len(columns):
            raise RequestError(f"{key}.columns", "a column name appears twice")
        rows = data.get("data")
        if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == len(columns) for r in rows
        ):
            raise RequestError(f"{key}.data", "expected a list of rows as long as columns")
        if "index" in data and not (isinstance(data["index"], list) and len(data["index"]) == len(rows)):
            raise RequestError(f"{key}.index", "expected a list as long as data")
        data = [dict(zip(columns, r)) for r in rows]
    elif isinstance(data, dict):  # MLflow's column layout cannot carry ragged lists: records only
        raise RequestError(key, 'expected a list of records ({"item_ids": [...], ...} per user)')
    return data, doc.get("params"), key


# ---------------------------------------------------------------------------------------------------
# the app


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k.lower() == name]


class ServingApp:
    """ASGI app of a loaded model (anything with `answer(Request)` and `item_type`, e.g. TopKModel)."""

    def __init__(self, model: Any, settings: ServerSettings, version: str = "") -> None:
        self.model = model
        self.settings = settings
        self.version = version
        self._lock = asyncio.Lock()  # one inference at a time: torch uses the cores itself

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return
        try:
            status, payload = await self._route(scope, receive)
        except HTTPError as exc:
            status, payload = exc.status, {"error_code": exc.code, "message": exc.message}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, not the client's: logged, answered without a traceback
            traceback.print_exc(file=sys.stderr)
            status, payload = (
                500,
                {"error_code": "INTERNAL_ERROR", "message": f"internal error ({type(exc).__name__})"},
            )
        if payload is None:  # the client went away
            return
        body = json.dumps(payload, allow_nan=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: dict[str, Any], receive: Receive) -> tuple[int, Any]:
        path, method = scope["path"], scope["method"]
        headers = scope.get("headers") or []
        if path in OPEN_ROUTES:
            return 200, {"status": "ok"}
        self._authorize(headers)
        if path == "/version":
            return 200, {"model": self.version}
        if path != "/invocations":
            raise HTTPError(404, "ENDPOINT_NOT_FOUND", f"{path[:80]}: no such route (POST /invocations)")
        if method != "POST":
            raise HTTPError(405, "METHOD_NOT_ALLOWED", f"/invocations: {method[:10]} (expected POST)")
        self._check_content_type(headers)
        body = await self._read_body(headers, receive)
        if body is None:
            return 0, None
        try:
            records, params, key = body_records(body)
            req = check_request(records, params, self.model.item_type, key, self.settings.limits)
            async with self._lock:
                answer = await asyncio.to_thread(self.model.answer, req)
        except (RequestError, ValueError) as exc:
            raise HTTPError(400, "INVALID_PARAMETER_VALUE", " ".join(str(exc).split())) from None
        return 200, {"predictions": answer}

    def _authorize(self, headers: list[tuple[bytes, bytes]]) -> None:
        token = self.settings.token
        if token is None:
            return
        given = _header(headers, b"authorization")
        scheme, _, value = given[0].partition(" ") if len(given) == 1 else ("", "", "")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(value.encode("latin-1"), token.encode())
        if not ok:  # no header, two headers, another scheme or another token: all the same answer
            raise HTTPError(401, "UNAUTHENTICATED", "authorization: a valid bearer token is required")

    def _check_content_type(self, headers: list[tuple[bytes, bytes]]) -> None:
        found = _header(headers, b"content-type")
        if len(found) != 1:
            raise HTTPError(
                415,
                "UNSUPPORTED_MEDIA_TYPE",
                f"content-type: expected one application/json header, got {len(found)}",
            )
        media, *options = [part.strip().lower() for part in found[0].split(";")]
        charset_ok = all(o in ("charset=utf-8", 'charset="utf-8"') for o in options)
        if media != "application/json" or not charset_ok:
            raise HTTPError(
                415,
                "UNSUPPORTED_MEDIA_TYPE",
                f"content-type: {found[0][:60]!r} (expected application/json, charset utf-8)",
            )

    async def _read_body(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> bytes | None:
        """The whole body within the size and time limits; None if the client disconnected."""
        limit, timeout = self.settings.max_body_bytes, self.settings.body_timeout_s
        declared = _header(headers, b"content-length")
        if declared and declared[0].strip().isdigit() and int(declared[0]) > limit:
            raise HTTPError(413, "REQUEST_LIMIT_EXCEEDED", f"body: {declared[0]} bytes, at most {limit}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise HTTPError(
                    408, "REQUEST_TIMEOUT", f"body: not received within {timeout:g} s ({size} bytes came)"
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, "REQUEST_LIMIT_EXCEEDED", f"body: more than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------


def read_token(token_file: str | None) -> str | None:
    """The bearer token: the file's first line (--token-file), else $FUXI_SERVE_TOKEN, else None."""
    import os
    from pathlib import Path

    if token_file:
        path = Path(token_file)
        if not path.is_file() or path.stat().st_size > 4096:
            raise ValueError(f"--token-file {token_file}: not a file of at most 4096 bytes")
        lines = path.read_text().splitlines()
        return lines[0].strip() if lines else ""
    return os.environ.get(TOKEN_ENV) or None


def check_bind(host: str, settings: ServerSettings) -> None:
    if not is_loopback(host) and settings.token is None:
        raise ValueError(
            f"--host {host[:60]} is not a loopback address: set {TOKEN_ENV} or --token-file (a bearer "
            "token every client must send) to serve beyond this machine"
        )


def serve(
    model_ref: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    settings: ServerSettings | None = None,
    tracking_uri: str | None = None,
    cache: str | None = None,
) -> None:
    """Check the bind and settings, load the model (serving/trust.py), serve it on uvicorn (imported
    from the environment: no PATH lookup) until stopped."""
    import uvicorn

    from serving.pyfunc import TopKModel
    from serving.recommend import resolve_model

    settings = settings or ServerSettings()
    check_bind(host, settings)
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535 (got {port})")
    model = resolve_model(model_ref, tracking_uri, cache)
    app = ServingApp(TopKModel(model.checkpoint), settings, model.version)
    uvicorn.run(
        app,
        host=host,
        port=port,
        lifespan="off",
        http=head_timeout_protocol(settings.body_timeout_s),  # h11; a head past 16 KiB is refused (400)
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers
        limit_concurrency=256,
    )


def head_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for every request head: a connection that sends nothing, or
    sends its head slowly (slowloris), is closed `seconds` after it opened or after its last response.
    uvicorn arms its keep-alive timer only after a response and cancels it on any byte received, so
    without this such connections are held forever, and `limit_concurrency` of them refuse everyone."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            self.head_deadline = self.loop.call_later(seconds, self._head_expired)

        def _head_expired(self) -> None:
            # IDLE: no complete request head yet (a body in progress is the app's to time out, a request
            # in progress re-arms this when its response completes)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            super().connection_lost(exc)

    return HeadTimeoutProtocol
