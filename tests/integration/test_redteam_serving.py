"""Red-team corpus, HTTP: crafted bodies, headers and slow clients against one real `fuxi serve` (uvicorn
in a subprocess on a free loopback port), started once for the module with a bearer token and tight limits
(k <= 50, 200 ids per history, 16 users, 64 KiB bodies arriving within 2 s).

Requests are written byte for byte on raw sockets (duplicate headers, lying Content-Length, chunked bodies,
stalls). One row = one request and its exact answer: status, error code and the whole one-line message.
Every valid answer is parsed as strict JSON (NaN / Infinity refused) and holds no padding row, no seen item
and only finite scores. After the slow clients, and at the end, a valid request is still answered.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.http import free_port
from tests.helpers.redteam import RAW_IDS, genuine_checkpoint, genuine_model_folder

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "redteam-token-0123456789"
LIMITS = ["--max-k", "50", "--max-history", "200", "--max-users", "16", "--max-body-bytes", "65536"]
LIMITS += ["--body-timeout", "2"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("redteam-http")
    return genuine_model_folder(genuine_checkpoint(base / "root"), base / "model")


@pytest.fixture(scope="module")
def port(model_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """`fuxi serve` of the genuine model folder; stopped by its pid at the end of the module."""
    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), FUXI_SERVE_TOKEN=TOKEN)
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "serve",
        "--model",
        str(model_folder),
        "--port",
        str(port),
        *LIMITS,
    ]
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError((work / "serve.log").read_text()[-3000:])
            try:
                if exchange(port, request(b"", method="GET", path="/ping"))[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError("fuxi serve did not answer /ping in 120 s")
        yield port
        assert proc.poll() is None, "the server died during the corpus"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# ---------------------------------------------------------------------------------------------------
# raw HTTP


def request(
    body: bytes | dict | str,
    content_type: str | None = "application/json",
    auth: str | None = f"Bearer {TOKEN}",
    method: str = "POST",
    path: str = "/invocations",
    headers: list[tuple[str, str]] | None = None,
    length: bool = True,
) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise AssertionError(f"response holds {name}: not strict JSON")

    return json.loads(text, parse_constant=refuse)


def read_response(sock: socket.socket) -> tuple[int, object]:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, _strict(body.decode())
    except (ValueError, UnicodeDecodeError):
        return status, body.decode("latin-1")


def exchange(port: int, raw: bytes, timeout: float = 30) -> tuple[int, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):  # the server answered before reading it all
            pass
        return read_response(sock)


def records(*users: dict, **params: object) -> dict:
    return (
        {"dataframe_records": list(users), "params": params} if params else {"dataframe_records": list(users)}
    )


U = {"item_ids": [1001, 1002, 1003], "timestamps": [1_700_000_000, 1_700_000_100, 1_700_000_200]}
R0 = "dataframe_records[0]"
BAD = "INVALID_PARAMETER_VALUE"


def check_valid(reply: dict, histories: list[list[int]], k: int, filter_seen: bool = True) -> None:
    """A valid answer: per user at most k raw ids of the catalogue, finite scores best first, none seen."""
    assert set(reply) == {"predictions"} and len(reply["predictions"]) == len(histories)
    for pred, seen in zip(reply["predictions"], histories):
        ids, scores = pred["item_ids"], pred["scores"]
        assert len(ids) == len(scores) <= k and set(ids) <= set(RAW_IDS), pred
        assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)
        if filter_seen:
            assert not set(ids) & set(seen), pred


# ---------------------------------------------------------------------------------------------------
# bodies: every malformed shape is a 400 whose one line names the field


DIGITS = "9" * 5000
TOP_FIELDS = "(expected one of dataframe_records, dataframe_split, inputs, instances, params)"
BODY_CASES = [
    # numbers and nesting that escape type checks
    (
        "k-5000-digits",
        '{"dataframe_records": [{"item_ids": [1001]}], "params": {"k": ' + DIGITS + "}}",
        "body: a number too long (Exceeds the limit (4300 digits) for integer string conversion)",
    ),
    (
        "id-5000-digits",
        '{"dataframe_records": [{"item_ids": [' + DIGITS + "]}]}",
        "body: a number too long (Exceeds the limit (4300 digits) for integer string conversion)",
    ),
    (
        "k-4000-digits",
        '{"dataframe_records": [{"item_ids": [1001]}], "params": {"k": ' + "9" * 4000 + "}}",
        "params.k: 999999999999...: expected 1 <= k <= 50",
    ),
    ("id-2^63", records({"item_ids": [2**63]}), f"{R0}.item_ids: expected a list of 64-bit integers"),
    (
        "id-below-int64",
        records({"item_ids": [-(2**63) - 1]}),
        f"{R0}.item_ids: expected a list of 64-bit integers",
    ),
    ("deep-nesting", "[" * 30_000 + "]" * 30_000, "body: nested too deeply"),
    (
        "deep-nesting-in-ids",
        records({"item_ids": [[[[[1001]]]]]}),
        f"{R0}.item_ids: expected a list of 64-bit integers",
    ),
    (
        "nan-timestamp",
        '{"dataframe_records": [{"item_ids": [1001], "timestamps": [NaN]}]}',
        "body: NaN is not JSON",
    ),
    (
        "infinity-k",
        '{"dataframe_records": [{"item_ids": [1001]}], "params": {"k": Infinity}}',
        "body: Infinity is not JSON",
    ),
    ("minus-infinity", '{"dataframe_records": [{"item_ids": [-Infinity]}]}', "body: -Infinity is not JSON"),
    (
        "duplicate-params",
        '{"dataframe_records": [{"item_ids": [1001]}], "params": {}, "params": {"k": 3}}',
        "body: duplicate key 'params'",
    ),
    (
        "duplicate-item-ids",
        '{"dataframe_records": [{"item_ids": [1001], "item_ids": [1002]}]}',
        "body: duplicate key 'item_ids'",
    ),
    # column names
    (
        "split-mixed-columns",
        {"dataframe_split": {"columns": [1, "item_ids"], "data": [[1, [1001]]]}},
        "dataframe_split.columns: expected a list of column names (strings)",
    ),
    (
        "split-unhashable-columns",
        {"dataframe_split": {"columns": [["a"]], "data": [[[1001]]]}},
        "dataframe_split.columns: expected a list of column names (strings)",
    ),
    (
        "split-null-columns",
        {"dataframe_split": {"columns": None, "data": []}},
        "dataframe_split.columns: expected a list of column names (strings)",
    ),
    (
        "split-duplicate-columns",
        {"dataframe_split": {"columns": ["item_ids", "item_ids"], "data": [[[1], [2]]]}},
        "dataframe_split.columns: a column name appears twice",
    ),
    (
        "split-ragged-rows",
        {"dataframe_split": {"columns": ["item_ids"], "data": [[[1001], 5]]}},
        "dataframe_split.data: expected a list of rows as long as columns",
    ),
    (
        "split-index-length",
        {"dataframe_split": {"columns": ["item_ids"], "data": [[[1001]]], "index": [0, 1]}},
        "dataframe_split.index: expected a list as long as data",
    ),
    (
        "split-unknown-key",
        {"dataframe_split": {"columns": ["item_ids"], "data": [], "dtypes": {}}},
        "dataframe_split.dtypes: unknown field (expected columns, data, index)",
    ),
    (
        "split-not-object",
        {"dataframe_split": [1]},
        "dataframe_split: expected an object with columns and data",
    ),
    # encodings and top-level shapes
    ("not-utf8", b'{"dataframe_records": "\xff"}', "body: not UTF-8 (byte 23)"),
    (
        "utf8-bom",
        b"\xef\xbb\xbf" + json.dumps(records(U)).encode(),
        "body: not JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at line 1 column 1)",
    ),
    ("empty-body", b"", "body: not JSON (Expecting value at line 1 column 1)"),
    ("truncated-json", b'{"dataframe_records": [', "body: not JSON (Expecting value at line 1 column 24)"),
    ("null", "null", "body: expected a JSON object"),
    ("list", "[]", "body: expected a JSON object"),
    ("string", '"dataframe_records"', "body: expected a JSON object"),
    (
        "two-data-keys",
        {"dataframe_records": [U], "inputs": [U]},
        "body: expected exactly one of dataframe_records, dataframe_split, inputs, instances",
    ),
    (
        "params-only",
        {"params": {"k": 3}},
        "body: expected exactly one of dataframe_records, dataframe_split, inputs, instances",
    ),
    (
        "unknown-top-level",
        {"dataframe_records": [U], "extra": 1},
        "extra: unknown field " + TOP_FIELDS,
    ),
    (
        "long-unknown-key",
        {"dataframe_records": [U], "x" * 10_000: 1},
        "x" * 80
        + ": unknown field (expected one of dataframe_records, dataframe_split, inputs, instances, params)",
    ),
    (
        "instances",
        {"instances": [U]},
        "instances: not supported by this model: send dataframe_records (or inputs)",
    ),
    (
        "inputs-columns",
        {"inputs": {"item_ids": [[1001]]}},
        'inputs: expected a list of records ({"item_ids": [...], ...} per user)',
    ),
    ("records-string", {"dataframe_records": "1001,1002"}, "dataframe_records: expected a list of users"),
    (
        "record-list",
        {"dataframe_records": [[1001, 1002]]},
        f"{R0}: expected an object with item_ids (and timestamps, request_time)",
    ),
    ("no-users", {"dataframe_records": []}, "dataframe_records: no users"),
    ("17-users", records(*[U] * 17), "dataframe_records: 17 users, at most 16 per request"),
    # fields of a user
    ("item-ids-missing", records({"timestamps": [1]}), f"{R0}.item_ids: missing"),
    ("item-ids-object", records({"item_ids": {"a": 1}}), f"{R0}.item_ids: expected a list"),
    (
        "empty-history",
        records({"item_ids": []}),
        f"{R0}.item_ids: empty history: at least one item id is needed",
    ),
    ("201-items", records({"item_ids": [*RAW_IDS, 1001]}), f"{R0}.item_ids: 201 items, at most 200"),
    ("string-ids", records({"item_ids": ["1001"]}), f"{R0}.item_ids: expected a list of 64-bit integers"),
    ("bool-id", records({"item_ids": [True]}), f"{R0}.item_ids: expected a list of 64-bit integers"),
    ("float-id", records({"item_ids": [1001.0]}), f"{R0}.item_ids: expected a list of 64-bit integers"),
    ("null-id", records({"item_ids": [None]}), f"{R0}.item_ids: expected a list of 64-bit integers"),
    (
        "negative-timestamp",
        records({"item_ids": [1001], "timestamps": [-1]}),
        f"{R0}.timestamps: expected a list of integers in 0..2^40 (seconds)",
    ),
    (
        "timestamp-2^40",
        records({"item_ids": [1001], "timestamps": [2**40]}),
        f"{R0}.timestamps: expected a list of integers in 0..2^40 (seconds)",
    ),
    (
        "timestamps-count",
        records({"item_ids": [1001, 1002], "timestamps": [1]}),
        f"{R0}.timestamps: 1 timestamps for 2 item ids",
    ),
    (
        "timestamps-string",
        records({"item_ids": [1001], "timestamps": "1"}),
        f"{R0}.timestamps: expected a list of integers in 0..2^40 (seconds)",
    ),
    (
        "request-time-float",
        records({"item_ids": [1001], "request_time": 1.5}),
        f"{R0}.request_time: expected an integer in 0..2^40 (seconds)",
    ),
    (
        "request-time-bool",
        records({"item_ids": [1001], "request_time": True}),
        f"{R0}.request_time: expected an integer in 0..2^40 (seconds)",
    ),
    (
        "unknown-record-field",
        records({"item_ids": [1001], "user": 3}),
        f"{R0}.user: unknown field (expected one of item_ids, timestamps, request_time)",
    ),
    (
        "many-unknown-fields",
        records({"item_ids": [1001], **{f"f{i:05d}": i for i in range(2000)}}),
        f"{R0}.f00000: unknown field (expected one of item_ids, timestamps, request_time)",
    ),
    # params
    ("params-list", {"dataframe_records": [U], "params": [1]}, "params: expected an object"),
    ("k-bool", records(U, k=True), "params.k: expected an integer"),
    ("k-float", records(U, k=10.0), "params.k: expected an integer"),
    ("k-string", records(U, k="10"), "params.k: expected an integer"),
    ("k-zero", records(U, k=0), "params.k: 0: expected 1 <= k <= 50"),
    ("k-above-server-max", records(U, k=51), "params.k: 51: expected 1 <= k <= 50"),
    ("k-negative", records(U, k=-1), "params.k: -1: expected 1 <= k <= 50"),
    ("filter-seen-null", records(U, filter_seen=None), "params.filter_seen: expected true or false"),
    ("use-index-string", records(U, use_index="yes"), "params.use_index: expected true or false"),
    (
        "unknown-param",
        records(U, top_k=3),
        "params.top_k: unknown parameter (expected one of k, filter_seen, use_index)",
    ),
    # numbers JSON reads as floats, odd keys, and bodies that are more than one document
    (
        "k-1e400",
        '{"dataframe_records": [{"item_ids": [1001]}], "params": {"k": 1e400}}',
        "params.k: expected an integer",
    ),
    (
        "id-1e400",
        '{"dataframe_records": [{"item_ids": [1e400]}]}',
        f"{R0}.item_ids: expected a list of 64-bit integers",
    ),
    (
        "timestamp-minus-1e400",
        '{"dataframe_records": [{"item_ids": [1001], "timestamps": [-1e400]}]}',
        f"{R0}.timestamps: expected a list of integers in 0..2^40 (seconds)",
    ),
    (
        "k-minus-zero",
        '{"dataframe_records": [{"item_ids": [1001]}], "params": {"k": -0}}',
        "params.k: 0: expected 1 <= k <= 50",
    ),
    ("k-object", records(U, k={"a": 1}), "params.k: expected an integer"),
    (
        "lone-surrogate-key",
        '{"dataframe_records": [{"item_ids": [1001]}], "\\ud800": 1}',
        "\ud800: unknown field " + TOP_FIELDS,
    ),
    (
        "nul-in-record-key",
        '{"dataframe_records": [{"item_ids": [1001], "item_ids\\u0000": 1}]}',
        f"{R0}.item_ids\x00: unknown field (expected one of item_ids, timestamps, request_time)",
    ),
    (
        "lookalike-key",
        '{"dataframe_records": [{"\u00eftem_ids": [1001]}]}',
        f"{R0}.\u00eftem_ids: unknown field (expected one of item_ids, timestamps, request_time)",
    ),
    (
        "split-data-objects",
        {"dataframe_split": {"columns": ["item_ids"], "data": [{"item_ids": [1001]}]}},
        "dataframe_split.data: expected a list of rows as long as columns",
    ),
    (
        "split-column-nul",
        {"dataframe_split": {"columns": ["item_ids\x00"], "data": [[[1001]]]}},
        "dataframe_split[0].item_ids\x00: unknown field (expected one of item_ids, timestamps, request_time)",
    ),
    ("30k-zeros", "[" + ",".join(["0"] * 30_000) + "]", "body: expected a JSON object"),
    (
        "records-object",
        {"dataframe_records": {"0": U}},
        'dataframe_records: expected a list of records ({"item_ids": [...], ...} per user)',
    ),
    (
        "inputs-nested",
        {"inputs": [[U]]},
        "inputs[0]: expected an object with item_ids (and timestamps, request_time)",
    ),
    ("ids-60k-string", records({"item_ids": "x" * 60_000}), f"{R0}.item_ids: expected a list"),
    ("whitespace-only", b" \n\t ", "body: not JSON (Expecting value at line 2 column 3)"),
    ("two-documents", json.dumps(records(U)) * 2, "body: not JSON (Extra data at line 1 column 110)"),
    ("trailing-garbage", json.dumps(records(U)) + " x", "body: not JSON (Extra data at line 1 column 111)"),
    (
        "comment",
        b'{"dataframe_records": [{"item_ids": [1001]}] /* c */}',
        "body: not JSON (Expecting ',' delimiter at line 1 column 46)",
    ),
    (
        "gzip-body",
        __import__("gzip").compress(json.dumps(records(U)).encode(), mtime=0),
        "body: not UTF-8 (byte 1)",
    ),
]


@pytest.mark.parametrize("body, message", [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES])
def test_malformed_body(port: int, body: object, message: str) -> None:
    status, reply = exchange(port, request(body))
    assert (status, reply) == (400, {"error_code": BAD, "message": message})


# ---------------------------------------------------------------------------------------------------
# headers, routes and the token


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _with(*headers: tuple[str, str]) -> bytes:
    """A valid request whose framing headers are `headers` (no Content-Length of ours)."""
    return request(records(U), length=False, headers=list(headers))


HEADER_CASES = [
    # media types: one application/json header, charset utf-8
    *[
        (
            name,
            request(body, content_type),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"content-type: '{content_type}' (expected application/json, charset utf-8)",
        )
        for name, body, content_type in [
            ("csv", records(U), "text/csv"),
            ("parquet", b"PAR1....", "application/x-parquet"),
            ("latin1-charset", records(U), "application/json; charset=latin-1"),
            ("utf16-charset", json.dumps(records(U)).encode("utf-16"), "application/json; charset=utf-16"),
            ("jsonx", records(U), "application/jsonx"),
            ("multipart", records(U), "multipart/form-data; boundary=x"),
        ]
    ],
    (
        "no-content-type",
        request(records(U), None),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        "content-type: expected one application/json header, got 0",
    ),
    (
        "two-content-types",
        request(records(U), headers=[("Content-Type", "application/json")]),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        "content-type: expected one application/json header, got 2",
    ),
    (
        "json-then-parquet",
        request(records(U), headers=[("Content-Type", "application/x-parquet")]),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        "content-type: expected one application/json header, got 2",
    ),
    # authorization: exactly one bearer token, the server's, on every route
    *[
        (name, raw, 401, "UNAUTHENTICATED", "authorization: a valid bearer token is required")
        for name, raw in [
            ("no-token", request(records(U), auth=None)),
            ("wrong-token", request(records(U), auth="Bearer " + "x" * 24)),
            ("token-prefix", request(records(U), auth=f"Bearer {TOKEN[:-1]}")),
            ("token-non-ascii", request(records(U), auth="Bearer " + "\u00e9" * 20)),
            ("basic-auth", request(records(U), auth="Basic dXNlcjpwYXNz")),
            ("two-auth-headers", request(records(U), headers=[("Authorization", f"Bearer {TOKEN}")])),
            ("version-no-token", request(b"", method="GET", path="/version", auth=None)),
        ]
    ],
    # sizes and lengths
    (
        "declared-1GB",
        request(b"", headers=[("X", "y")])[:-4].replace(b"Content-Length: 0", b"Content-Length: 1000000000")
        + b"\r\n\r\n",
        413,
        "REQUEST_LIMIT_EXCEEDED",
        "body: 1000000000 bytes, at most 65536",
    ),
    ("body-70000", request(b" " * 70_000), 413, "REQUEST_LIMIT_EXCEEDED", "body: 70000 bytes, at most 65536"),
    (
        "chunked-over-limit",
        request(b"", length=False, headers=[("Transfer-Encoding", "chunked")]) + chunked(*[b" " * 8192] * 9),
        413,
        "REQUEST_LIMIT_EXCEEDED",
        "body: more than 65536 bytes",
    ),
    ("header-1MB", request(records(U), headers=[("X-Pad", "x" * 1_000_000)]), 400, None, None),
    (
        "content-length-text",
        request(records(U), length=False, headers=[("Content-Length", "abc")]),
        400,
        None,
        None,
    ),
    (  # h11 reads it as chunked; the JSON is no chunk size, so the body never completes
        "length-and-chunked",
        request(records(U), headers=[("Transfer-Encoding", "chunked")]),
        408,
        "REQUEST_TIMEOUT",
        "body: not received within 2 s (0 bytes came)",
    ),
    # methods and routes
    ("head", request(b"", method="HEAD"), 405, None, None),  # HEAD: the status, never a body
    *[
        (
            name,
            request(body, method=method),
            405,
            "METHOD_NOT_ALLOWED",
            f"/invocations: {method} (expected POST)",
        )
        for name, method, body in [
            ("get-invocations", "GET", b""),
            ("options", "OPTIONS", b""),
            ("put", "PUT", records(U)),
            ("delete", "DELETE", b""),
            ("trace", "TRACE", b""),
        ]
    ],
    (
        "options-star",
        request(b"", method="OPTIONS", path="*"),
        404,
        "ENDPOINT_NOT_FOUND",
        "*: no such route (POST /invocations)",
    ),
    *[  # the path named as it came
        (
            name,
            request(records(U), path=path),
            404,
            "ENDPOINT_NOT_FOUND",
            f"{path}: no such route (POST /invocations)",
        )
        for name, path in [
            ("other-route", "/admin"),
            ("trailing-slash", "/invocations/"),
            ("double-slash", "//invocations"),
            ("dotdot-path", "/../invocations"),
            ("upper-path", "/Invocations"),
            ("absolute-form", "http://evil.example/invocations"),
        ]
    ],
    (  # the path named percent-decoded
        "pct-nul-path",
        request(records(U), path="/invocations%00"),
        404,
        "ENDPOINT_NOT_FOUND",
        "/invocations\x00: no such route (POST /invocations)",
    ),
    ("http-0.9", b"GET /ping\r\n\r\n", 400, None, None),
    # framing: lengths and transfer codings the parser must refuse (no smuggling, no guessing)
    ("length-negative", _with(("Content-Length", "-1")), 400, None, None),
    ("length-plus", _with(("Content-Length", "+110")), 400, None, None),
    ("length-exponent", _with(("Content-Length", "1e3")), 400, None, None),
    ("two-lengths-differ", _with(("Content-Length", "110"), ("Content-Length", "5")), 400, None, None),
    ("te-gzip", _with(("Transfer-Encoding", "gzip")), 400, None, None),
    ("te-chunked-twice", _with(("Transfer-Encoding", "chunked, chunked")), 400, None, None),
    (
        "chunk-size-overflow",
        request(b"", length=False, headers=[("Transfer-Encoding", "chunked")])
        + b"ffffffffffffffffff\r\nabc\r\n",
        408,
        "REQUEST_TIMEOUT",
        "body: not received within 2 s (5 bytes came)",
    ),
    ("header-nul", request(records(U), headers=[("X-A", "a\x00b")]), 400, None, None),
    ("header-name-space", request(records(U), headers=[("X A", "b")]), 400, None, None),
]


@pytest.mark.parametrize(
    "raw, status, code, message", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_header_and_route(port: int, raw: bytes, status: int, code: str | None, message: str | None) -> None:
    got, reply = exchange(port, raw)
    if code is None:  # refused by uvicorn's HTTP parser before the app: a 400, no body of ours
        assert got == status and not isinstance(reply, dict), reply
    else:
        assert (got, reply) == (status, {"error_code": code, "message": message})


# ---------------------------------------------------------------------------------------------------
# valid requests: strict JSON, no row 0, no seen item, no non-finite score, k from the server's bound


def test_valid_answers(port: int) -> None:
    status, reply = exchange(port, request(records(U, k=5)))
    assert status == 200
    check_valid(reply, [U["item_ids"]], 5)
    assert len(reply["predictions"][0]["item_ids"]) == 5
    # 198 of the 200 items seen: exactly the two left, never row 0 or a -inf score (invalid JSON)
    seen = [i for i in RAW_IDS if i not in (1150, 1200)]
    for use_index in (False, True):
        status, reply = exchange(port, request(records({"item_ids": seen}, k=50, use_index=use_index)))
        assert status == 200
        check_valid(reply, [seen], 50)
        assert sorted(reply["predictions"][0]["item_ids"]) == [1150, 1200]
    # every item seen: nothing left
    status, reply = exchange(port, request(records({"item_ids": RAW_IDS}, k=5)))
    assert (status, reply) == (200, {"predictions": [{"item_ids": [], "scores": [], "ignored": 0}]})
    # filter_seen off, the index path, other layouts, case-insensitive media type and scheme
    for body, ct, auth in [
        (records(U, k=5, filter_seen=False), "application/json", f"Bearer {TOKEN}"),
        (records(U, k=5, use_index=True), "APPLICATION/JSON; charset=UTF-8", f"bearer {TOKEN}"),
        (
            {"dataframe_split": {"columns": ["item_ids"], "data": [[[1001, 1002]]]}, "params": {"k": 5}},
            "application/json",
            f"Bearer {TOKEN}",
        ),
        ({"inputs": [U], "params": {"k": 5}}, "application/json", f"Bearer {TOKEN}"),
    ]:
        status, reply = exchange(port, request(body, ct, auth))
        assert status == 200, reply
        assert len(reply["predictions"][0]["item_ids"]) == 5
    # ids the model never saw are counted, the user gets nothing
    status, reply = exchange(port, request(records({"item_ids": [5, 7]})))
    assert (status, reply) == (200, {"predictions": [{"item_ids": [], "scores": [], "ignored": 2}]})
    status, reply = exchange(port, request(b"", method="GET", path="/ping", auth=None))
    assert (status, reply) == (200, {"status": "ok"})
    body = request(b"", length=False, headers=[("Transfer-Encoding", "chunked")])
    status, reply = exchange(port, body + chunked(json.dumps(records(U, k=3)).encode()))
    assert status == 200 and len(reply["predictions"][0]["item_ids"]) == 3


def _framed(*lines: str, body: bytes) -> bytes:
    head = ["POST /invocations HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


VALID = json.dumps(records(U, k=4)).encode()
CT, AUTH, LEN = (
    "Content-Type: application/json",
    f"Authorization: Bearer {TOKEN}",
    f"Content-Length: {len(VALID)}",
)
# requests an HTTP/1.1 parser must accept as the same valid request (each answered with 4 recommendations)
VALID_FRAMINGS = [
    ("query-string", request(VALID, path="/invocations?k=50&filter_seen=false")),  # the query is ignored
    ("http-1.0", b"POST /invocations HTTP/1.0\r\n" + f"{CT}\r\n{AUTH}\r\n{LEN}\r\n\r\n".encode() + VALID),
    ("two-equal-lengths", _framed(CT, AUTH, LEN, LEN, body=VALID)),
    ("te-upper-case", _framed(CT, AUTH, "Transfer-Encoding: CHUNKED", body=chunked(VALID))),
    (
        "chunk-extension",
        _framed(
            CT, AUTH, "Transfer-Encoding: chunked", body=b"%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(VALID), VALID)
        ),
    ),
    (
        "chunk-trailer",
        _framed(CT, AUTH, "Transfer-Encoding: chunked", body=chunked(VALID)[:-2] + b"X-T: 1\r\n\r\n"),
    ),
    (
        "one-byte-chunks",
        _framed(CT, AUTH, "Transfer-Encoding: chunked", body=chunked(*[bytes([b]) for b in VALID])),
    ),
    ("folded-header", _framed(CT, AUTH, "X-A: a", " b", LEN, body=VALID)),
    ("5000-headers", _framed(CT, AUTH, *[f"X-{i}: {i}" for i in range(5000)], LEN, body=VALID)),
    ("escaped-key", request(VALID.replace(b"dataframe_records", b"dataframe_record\\u0073"))),
]


@pytest.mark.parametrize("raw", [c[1] for c in VALID_FRAMINGS], ids=[c[0] for c in VALID_FRAMINGS])
def test_valid_framings_are_answered(port: int, raw: bytes) -> None:
    status, reply = exchange(port, raw)
    assert status == 200, reply
    check_valid(reply, [U["item_ids"]], 4)
    assert len(reply["predictions"][0]["item_ids"]) == 4


def _responses(data: bytes) -> list[tuple[int, object]]:
    """The responses in a byte stream of several (each with a Content-Length)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        if status == 100:  # an interim answer to Expect: 100-continue, no body
            out.append((status, None))
            data = rest
            continue
        out.append((status, _strict(rest[:length].decode())))
        data = rest[length:]
    return out


def _stream(port: int, raw: bytes) -> list[tuple[int, object]]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return _responses(data)


def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    """Three requests in one write on one connection: each answered, in order, the bad one with its 400."""
    keep = request(VALID).replace(b"Connection: close", b"Connection: keep-alive")
    bad = request(records({"item_ids": []})).replace(b"Connection: close", b"Connection: keep-alive")
    got = _stream(port, keep + bad + request(VALID))
    assert [status for status, _ in got] == [200, 400, 200]
    check_valid(got[0][1], [U["item_ids"]], 4)  # type: ignore[arg-type]
    assert got[1][1] == {
        "error_code": BAD,
        "message": f"{R0}.item_ids: empty history: at least one item id is needed",
    }
    assert got[2][1] == got[0][1]


def test_expect_continue(port: int) -> None:
    """Expect: 100-continue: an interim 100, then the answer; over the limit: 413 without the 100."""
    got = _stream(port, _framed(CT, AUTH, "Expect: 100-continue", LEN, body=VALID))
    assert [status for status, _ in got] == [100, 200]
    check_valid(got[1][1], [U["item_ids"]], 4)  # type: ignore[arg-type]
    got = _stream(port, _framed(CT, AUTH, "Expect: 100-continue", "Content-Length: 1000000", body=b""))
    assert got == [
        (413, {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "body: 1000000 bytes, at most 65536"})
    ]


# ---------------------------------------------------------------------------------------------------
# slow and endless clients hold nothing; the server answers others meanwhile and afterwards


def _open(port: int, raw: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(raw)
    return sock


def _valid(port: int) -> None:
    status, reply = exchange(port, request(records(U, k=5)), timeout=10)
    assert status == 200
    check_valid(reply, [U["item_ids"]], 5)


def test_slow_body_times_out_and_others_are_served(port: int) -> None:
    head = request(b"x" * 100)[:-100]  # headers for 100 bytes
    stalled = _open(port, head + b'{"datafram')
    start = time.monotonic()
    _valid(port)  # while that body stalls
    assert time.monotonic() - start < 2
    status, reply = read_response(stalled)
    stalled.close()
    assert (status, reply) == (
        408,
        {"error_code": "REQUEST_TIMEOUT", "message": "body: not received within 2 s (10 bytes came)"},
    )
    assert time.monotonic() - start < 5


def test_trickled_body_is_cut_at_the_deadline(port: int) -> None:
    sock = _open(port, request(b"x" * 200)[:-200])
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < 4:
        try:
            sock.sendall(b" ")
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        time.sleep(0.25)
    status, reply = read_response(sock)
    sock.close()
    assert status == 408 and reply["error_code"] == "REQUEST_TIMEOUT"
    assert re.fullmatch(r"body: not received within 2 s \(\d bytes came\)", reply["message"]), reply
    _valid(port)


def test_endless_chunked_bodies(port: int) -> None:
    # slow and endless: cut by the deadline
    sock = _open(port, request(b"", length=False, headers=[("Transfer-Encoding", "chunked")]))
    start = time.monotonic()
    try:
        while time.monotonic() - start < 5:
            sock.sendall(b"10\r\n" + b" " * 16 + b"\r\n")
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, reply = read_response(sock)
    sock.close()
    assert status == 408 and reply["message"].startswith("body: not received within 2 s"), reply
    # fast and endless: cut by the size limit
    sock = _open(port, request(b"", length=False, headers=[("Transfer-Encoding", "chunked")]))
    try:
        for _ in range(1000):
            sock.sendall(b"2000\r\n" + b" " * 8192 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, reply = read_response(sock)
    sock.close()
    assert (status, reply) == (
        413,
        {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "body: more than 65536 bytes"},
    )
    _valid(port)


def test_slow_headers_idle_connections_and_hangups_hold_nothing(port: int) -> None:
    partial = _open(port, b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")  # never finished
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    hangup = _open(port, request(b"x" * 1000)[:-900])
    hangup.close()  # mid-body
    try:
        for _ in range(3):
            _valid(port)
    finally:
        partial.close()
        for s in idle:
            s.close()
    _valid(port)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head, then a body of its Content-Length), however the segments arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                  if k.strip().lower() == b"content-length")  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes `sock` (it sends nothing: no request head came)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_heads_that_never_finish_are_closed(port: int) -> None:
    """Slowloris: a connection that sends no head, half a head, a head one byte at a time, or nothing
    after its first response, is closed by the server at the 2 s head deadline; 300 of them (more than
    the server's 256 connections) refuse nobody once they are closed."""
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    half = _open(port, b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    assert _closed_within(idle, 10) < 4 and _closed_within(half, 10) < 4
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    start, closed = time.monotonic(), False
    for byte in b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n":
        try:
            trickle.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.25)
    assert closed and time.monotonic() - start < 4  # cut at the deadline, bytes coming or not
    trickle.close()
    keep = _open(port, request(records(U)).replace(b"Connection: close", b"Connection: keep-alive"))
    assert _read_response(keep).startswith(b"HTTP/1.1 200 OK\r\n")  # all of it: the body may come later
    keep.sendall(b"POST /invocations HTTP/1.1\r\n")  # the next head, never finished
    assert _closed_within(keep, 10) < 4
    crowd = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        time.sleep(3)
        _valid(port)
    finally:
        for sock in crowd:
            sock.close()


def test_server_still_answers_after_the_corpus(port: int) -> None:
    _valid(port)


# ---------------------------------------------------------------------------------------------------
# `fuxi serve` itself: a crafted model folder is refused in one line before anything is loaded


def test_serve_refuses_a_model_folder_with_code(model_folder: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_folder, model)
    marker = tmp_path / "marker"
    (model / "code" / "serving").mkdir(parents=True)
    (model / "code" / "serving" / "pyfunc.py").write_text(f"open({str(marker)!r}, 'w')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "serve", "--model", str(model), "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"fuxi: error: {model}/code: unexpected folder in a model folder"]
    assert not marker.exists()
