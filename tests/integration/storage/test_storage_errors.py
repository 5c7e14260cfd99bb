"""Errors a user can act on, against the real endpoint: a missing bucket, wrong credentials, an endpoint
that does not answer. Each is one line `<uri>: <cause>`, after bounded retries where the cause may pass,
and never shows the secret."""

from __future__ import annotations

import time

import pytest

import storage
from storage import CommitRoot, StorageError
from storage.errors import ACCESS_DENIED, NO_SUCH_BUCKET, NOT_FOUND, THROTTLED, UNREACHABLE


def _one_line(exc: pytest.ExceptionInfo[StorageError], secret: str = "") -> str:
    text = str(exc.value)
    assert "\n" not in text and (not secret or secret not in text)
    return text


def test_missing_bucket(s3_env) -> None:
    uri = "s3://no-such-bucket-here/runs/x/latest"
    for call in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"1"),
        lambda: CommitRoot("s3://no-such-bucket-here/runs/x").read("latest"),
    ):
        with pytest.raises(StorageError) as e:
            call()
        assert _one_line(e, s3_env.env()["AWS_SECRET_ACCESS_KEY"]) == f"{uri}: {NO_SUCH_BUCKET}"


def test_missing_object(s3_env) -> None:
    uri = f"s3://{s3_env.bucket}/nothing/here.json"
    with pytest.raises(StorageError) as e:
        storage.read_bytes(uri)
    assert _one_line(e, s3_env.env()["AWS_SECRET_ACCESS_KEY"]) == f"{uri}: {NOT_FOUND}"
    assert not storage.exists(uri) and storage.listdir(f"s3://{s3_env.bucket}/nothing") == []


def test_wrong_credentials(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3_env.bucket}/creds/latest"
    storage.write_bytes(uri, b"{}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for call in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"1"),
        lambda: CommitRoot(f"s3://{s3_env.bucket}/creds").read("latest"),
    ):
        with pytest.raises(StorageError) as e:
            call()
        assert _one_line(e, "not-the-secret") == f"{uri}: {ACCESS_DENIED}"


def test_stopped_endpoint_is_retried_then_one_line(s3_env, s3_proxy) -> None:
    root = CommitRoot(f"s3://{s3_env.bucket}/gone")
    uri = storage.join(root.uri, "latest")
    gen = root.new_generation()
    storage.write_bytes(storage.join(gen, "x"), b"1")
    root.commit("latest", gen, expect=None)
    proxy = s3_proxy()  # reads now go through the proxy: the endpoint answers ...
    assert root.resolve("latest") == gen and storage.read_bytes(storage.join(gen, "x")) == b"1"
    assert proxy.forwarded >= 2
    proxy.stop()  # ... and then goes away
    for call in (lambda: storage.read_bytes(uri), lambda: root.read("latest")):
        started = time.monotonic()
        with pytest.raises(StorageError) as e:
            call()
        elapsed = time.monotonic() - started
        assert (
            _one_line(e, s3_env.env()["AWS_SECRET_ACCESS_KEY"]) == f"{uri}: {UNREACHABLE} (after 4 attempts)"
        )
        # 0.25 + 0.5 + 1 s of backoff between 4 attempts, each refused at once: bounded, not hanging
        assert 1.7 <= elapsed < 15, elapsed


def test_credentials_in_a_uri_are_refused() -> None:
    with pytest.raises(StorageError) as e:
        storage.resolve("s3://AKIAEXAMPLE:hunter2@bucket/x")
    assert "hunter2" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)
    assert str(e.value).startswith("s3://bucket/x: credentials in a URI are refused")


def test_throttled_requests_are_retried(s3_env, s3_proxy) -> None:
    uri = f"s3://{s3_env.bucket}/throttled/latest"
    storage.write_bytes(uri, b'{"generation": "gen-20260101T000000Z-0123abcd"}')
    proxy = s3_proxy(throttle=2)
    assert storage.read_bytes(uri) == b'{"generation": "gen-20260101T000000Z-0123abcd"}'
    assert proxy.throttled == 2 and proxy.forwarded >= 1
    proxy.throttle += 2  # the pointer client (botocore) too
    assert CommitRoot(f"s3://{s3_env.bucket}/throttled").read("latest").generation.endswith("0123abcd")
    assert proxy.throttled == 4


def test_throttled_for_good_is_one_line(s3_env, s3_proxy) -> None:
    uri = f"s3://{s3_env.bucket}/throttled/latest"
    proxy = s3_proxy(throttle=10**6)
    for call in (
        lambda: storage.read_bytes(uri),
        lambda: CommitRoot(f"s3://{s3_env.bucket}/throttled").read("latest"),
    ):
        before = proxy.throttled
        with pytest.raises(StorageError) as e:
            call()
        assert _one_line(e, s3_env.env()["AWS_SECRET_ACCESS_KEY"]) == f"{uri}: {THROTTLED} (after 4 attempts)"
        assert proxy.throttled - before == 4  # one request per attempt: the clients' own retries are off
    assert proxy.forwarded == 0
