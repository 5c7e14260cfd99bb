"""Storage errors a user can act on: one line `<uri>: <cause>`, after bounded retries of transient causes.

Three clients reach an object store here (pyarrow.fs for data, s3fs under DCP, botocore for conditional
pointer writes); each reports the same few causes in its own words. `classify` reads all three and names
the cause once, so a missing bucket reads the same whichever client met it:

    no such bucket        the bucket in the URI does not exist
    not found             the object or prefix does not exist
    access denied         wrong or missing credentials, or no permission on the bucket
    endpoint unreachable  nothing answers at the endpoint (connection refused, DNS, timeout)
    throttled             the store asked us to slow down (SlowDown, 503, Throttling)

Only `throttled` and `endpoint unreachable` are retried (a brief outage or a rate limit may pass); the
rest would fail the same way again. URIs in messages go through `display`, which never shows credentials.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

NO_SUCH_BUCKET = "no such bucket"
NOT_FOUND = "not found"
ACCESS_DENIED = "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the bucket's policy)"
UNREACHABLE = "endpoint unreachable"
THROTTLED = "throttled"
TRANSIENT = (UNREACHABLE, THROTTLED)

# Bounded retries: 4 attempts, 0.25 s doubling to at most 2 s between them (under 2 s of waiting in all).
ATTEMPTS = 4
BACKOFF_S = 0.25
MAX_BACKOFF_S = 2.0


class StorageError(OSError):
    """One line: `<uri>: <cause>`. `cause` is one of the constants above or the client's own words."""

    def __init__(self, uri: str, cause: str) -> None:
        self.uri = uri
        self.cause = cause
        super().__init__(f"{uri}: {cause}")

    def __str__(self) -> str:
        return f"{self.uri}: {self.cause}"


class ConfinementError(StorageError, ValueError):
    """A name read from a manifest, pointer, sidecar or the command line leaves its folder or prefix."""


class CommitConflict(StorageError):
    """Another writer committed the pointer first (the conditional write did not hold)."""


# Words each client uses for a cause, matched case-insensitively against the error text and, for botocore,
# the error code. pyarrow: "AWS Error NO_SUCH_BUCKET", "curlCode: 7, Couldn't connect to server"; botocore:
# ClientError codes and EndpointConnectionError; s3fs: the botocore error it wraps (its __cause__).
_CAUSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (NO_SUCH_BUCKET, ("nosuchbucket", "no_such_bucket", "bucket does not exist", "bucket not found")),
    (
        ACCESS_DENIED,
        (
            "accessdenied",
            "access_denied",
            "access denied",
            "invalidaccesskeyid",
            "invalid_access_key_id",
            "signaturedoesnotmatch",
            "signature_does_not_match",
            "nocredentialserror",
            "unable to locate credentials",
            "forbidden",
            "http status 403",
        ),
    ),
    (
        THROTTLED,
        (
            "slowdown",
            "slow_down",
            "throttl",
            "reduce your request rate",
            "http status 503",
            "status code: 503",
        ),
    ),
    (
        UNREACHABLE,
        (
            "network_connection",
            "couldn't connect",
            "could not connect",
            "could not resolve",
            "connection refused",
            "endpointconnectionerror",
            "connecttimeout",
            "connect timeout",
            "timed out",
            "connection reset",
            "failed to connect",
        ),
    ),
    (NOT_FOUND, ("nosuchkey", "no_such_key", "no such file", "path does not exist", "not found", "404")),
)


def _describe(exc: BaseException) -> str:
    """The error's text plus, for botocore ClientErrors (also when s3fs wrapped one), its error code."""
    parts = [type(exc).__name__, str(exc)]
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            parts += [str(error.get("Code", "")), str(error.get("Message", ""))]
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status:
                parts.append(f"http status {status}")
        if e is not None and e is not exc:
            parts += [type(e).__name__, str(e)]
    return " ".join(parts).lower()


def classify(exc: BaseException) -> str:
    """The cause of a client error, as one of the constants above; else the error's first line."""
    if isinstance(exc, StorageError):
        return exc.cause
    text = _describe(exc)
    for cause, words in _CAUSES:
        if any(w in text for w in words):
            return cause
    if isinstance(exc, FileNotFoundError):
        return NOT_FOUND
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def storage_error(uri: str, exc: BaseException) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    return StorageError(uri, classify(exc))


def _is_client_error(e: BaseException) -> bool:
    """An error from a storage client (pyarrow and s3fs raise OSErrors; botocore raises its own types)."""
    return isinstance(e, OSError) or type(e).__module__.startswith(("botocore", "aiobotocore", "s3fs"))


def with_retries(uri: str, fn: Callable[[], T], attempts: int = ATTEMPTS) -> T:
    """fn(), retried with exponential backoff while the cause is transient; then one StorageError naming
    `uri` (a display URI) and the cause. Other errors (a bug, a bad argument) pass through unchanged."""
    delay = BACKOFF_S
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if isinstance(e, StorageError) or not _is_client_error(e):
                raise
            cause = classify(e)
            if cause not in TRANSIENT:
                raise StorageError(uri, cause) from e
            if attempt == attempts:
                raise StorageError(uri, f"{cause} (after {attempts} attempts)") from e
        time.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_S)
    raise AssertionError("unreachable")
