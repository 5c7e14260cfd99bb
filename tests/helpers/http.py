"""Loopback HTTP for tests that start a real server: a free port, and one JSON request with its answer."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_json(url: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET (no body) or a POST of `body` (a dict is sent as JSON); an HTTP error
    status is returned, not raised."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
