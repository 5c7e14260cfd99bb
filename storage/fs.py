"""One place that turns a URI into a filesystem: pyarrow.fs for data (Ray Data and pyarrow.parquet take it
as `filesystem=`), fsspec for DCP's FsspecWriter/FsspecReader. Nothing else knows local from S3.

Credentials and endpoints come from the standard environment, never from a config file that gets logged:
    s3://   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or ~/.aws, or the instance role),
            AWS_REGION (or AWS_DEFAULT_REGION), AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for a store other
            than AWS (pyarrow 25 does not read the endpoint variables itself, apache/arrow#49643, so
            `s3_settings` reads them and passes the endpoint on; keys are left to each client's own chain)
    gs://   Google application-default credentials
    hdfs:// the Hadoop client's own configuration (libhdfs must be installed)

Every call is retried while the cause is transient and otherwise fails with one StorageError line
`<uri>: <cause>` (storage/errors.py). The clients' own retries are kept small so that those bounds hold.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

import pyarrow.fs as pafs

from storage.errors import NO_SUCH_BUCKET, NOT_FOUND, StorageError, with_retries
from storage.uri import LOCAL, check_name, display, join, parse

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
_CHUNK = 8 << 20
T = TypeVar("T")


class S3Settings(NamedTuple):
    endpoint: str | None  # None: AWS itself
    region: str


def s3_settings() -> S3Settings:
    """Endpoint and region from the standard AWS variables (the service-specific endpoint wins)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Settings(endpoint, region)


def _credentials_fingerprint() -> str:
    """Which credentials the environment holds now (a digest, never the values): a cached client is
    rebuilt when they change."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()


@lru_cache(maxsize=8)
def _s3(settings: S3Settings, _credentials: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        region=settings.region,
        endpoint_override=settings.endpoint,
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        # one SDK attempt: errors.with_retries owns retries, so one bound holds for every client
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )


def resolve(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a URI; the path is what the filesystem's methods take."""
    p = parse(uri)
    if p.scheme == LOCAL:
        return pafs.LocalFileSystem(), p.path
    key = f"{p.netloc}/{p.path}".rstrip("/")
    try:
        if p.scheme == "s3":
            return _s3(s3_settings(), _credentials_fingerprint()), key
        if p.scheme == "gs":
            return pafs.GcsFileSystem(), key
        host, _, port = p.netloc.partition(":")
        return pafs.HadoopFileSystem(host, int(port or 8020)), "/" + p.path
    except (OSError, ValueError) as e:
        raise StorageError(
            display(uri), f"cannot open the {p.scheme} client: {str(e).splitlines()[0]}"
        ) from e


def _call(uri: str, fn: Callable[[], T]) -> T:
    """with_retries, and a `not found` on an object store told apart: is it the bucket that is missing?
    (a HEAD on a key of a missing bucket answers 404 like a missing key)."""
    try:
        return with_retries(display(uri), fn)
    except StorageError as e:
        p = parse(uri)
        if e.cause != NOT_FOUND or p.scheme not in ("s3", "gs"):
            raise
        fs, _ = resolve(uri)
        bucket = with_retries(display(uri), lambda: fs.get_file_info(p.netloc))
        if bucket.type == pafs.FileType.NotFound:
            raise StorageError(e.uri, NO_SUCH_BUCKET) from e
        raise


def require_bucket(uri: str | os.PathLike[str]) -> None:
    """StorageError `no such bucket` unless the URI's bucket exists (local paths: nothing to check). For
    writers that would otherwise create one (s3fs's makedirs creates a missing bucket)."""
    p = parse(uri)
    if p.scheme in ("s3", "gs"):
        fs, _ = resolve(uri)
        info = with_retries(display(uri), lambda: fs.get_file_info(p.netloc))
        if info.type == pafs.FileType.NotFound:
            raise StorageError(display(uri), NO_SUCH_BUCKET)


def fsspec_target(uri: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(url, options) such that `fsspec.core.url_to_fs(url, **options)` opens the URI from the same
    environment as `resolve`: what DCP's FsspecWriter(url, **options) / FsspecReader take. The options
    ask for a fresh instance (fsspec caches instances by argument, and a cached one would keep
    credentials the environment no longer holds)."""
    p = parse(uri)
    if p.scheme == LOCAL:
        return p.path, {}
    if p.scheme != "s3":
        raise StorageError(
            display(uri), f"checkpoints on {p.scheme}:// are not supported yet (s3:// or a path)"
        )
    settings = s3_settings()
    return f"s3://{p.netloc}/{p.path}".rstrip("/"), {
        "endpoint_url": settings.endpoint,
        "client_kwargs": {"region_name": settings.region},
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": REQUEST_TIMEOUT_S,
            # DCP calls the filesystem itself (no with_retries around it): botocore's standard retries,
            # exponential backoff over 4 attempts, and s3fs's own on throttling
            "retries": {"total_max_attempts": 4, "mode": "standard"},
        },
        "skip_instance_cache": True,
    }


def fsspec_filesystem(uri: str | os.PathLike[str]) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) for a URI (see `fsspec_target`)."""
    from fsspec.core import url_to_fs

    url, options = fsspec_target(uri)
    return url_to_fs(url, **options)


# ---------------------------------------------------------------------------------------------------
# helpers: every one takes a URI and raises StorageError `<uri>: <cause>`


def open_input(uri: str) -> Any:
    """A readable binary stream (pyarrow NativeFile; use as a context manager)."""
    fs, path = resolve(uri)
    return _call(uri, lambda: fs.open_input_stream(path))


def open_output(uri: str) -> Any:
    """A writable binary stream. On an object store the object appears only when the stream closes
    (a single PUT or a completed multipart upload): a writer killed mid-way leaves nothing there."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return _call(uri, lambda: fs.open_output_stream(path))


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The whole object. With `limit`: at most that many bytes are read, and a larger object is refused in
    one line (a small record file, e.g. train.json, that must not be allowed to fill memory)."""
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read() if limit is None else f.read(limit + 1)

    data = _call(uri, read)
    if limit is not None and len(data) > limit:
        raise StorageError(display(uri), f"larger than {limit:,} bytes; refused unread")
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """One small object, whole or not at all: a single PUT on an object store; on local disk a temporary
    file beside it (a dotfile) renamed over it, so a killed writer never leaves it torn."""
    fs, path = resolve(uri)

    def write() -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)

    _call(uri, write)


def exists(uri: str) -> bool:
    """A file, or a folder / a prefix holding at least one object."""
    fs, path = resolve(uri)
    info = _call(uri, lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return _call(uri, lambda: fs.get_file_info(path)).type == pafs.FileType.File


def listdir(uri: str) -> list[str]:
    """Names directly under a folder or prefix, sorted; [] when there is none."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = _call(uri, lambda: fs.get_file_info(selector))
    return sorted(info.base_name for info in infos)


def delete(uri: str, recursive: bool = False) -> None:
    """Delete a file, or with `recursive` a folder / prefix and all under it; nothing there is fine."""
    fs, path = resolve(uri)

    def remove() -> None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            if not recursive:
                raise StorageError(display(uri), "is a folder (pass recursive=True)")
            fs.delete_dir(path)

    _call(uri, remove)


def _walk_local(root: str, rel: str = "") -> Iterator[str]:
    """Relative names of the files under a local folder. Links are never followed: one is refused."""
    with os.scandir(os.path.join(root, rel) if rel else root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = f"{rel}/{entry.name}" if rel else entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise StorageError(
                    display(os.path.join(root, name)), "is a symbolic link; copies never follow links"
                )
            if stat.S_ISDIR(mode):
                yield from _walk_local(root, name)
            elif stat.S_ISREG(mode):
                yield name


def walk(uri: str) -> list[str]:
    """Relative names of every file under a folder or prefix, sorted."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isdir(path) or os.path.islink(path):
            raise StorageError(display(uri), f"{NOT_FOUND} (or not a folder)")
        return list(_walk_local(path))
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
    infos = _call(uri, lambda: fs.get_file_info(selector))
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File)


def copy_file(src: str, dst: str) -> None:
    """Stream one file across any two URIs (local to S3, S3 to local, ...)."""
    with open_input(src) as fin, open_output(dst) as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)


def copy_tree(src: str, dst: str) -> list[str]:
    """Copy every file under `src` to the same relative name under `dst`; returns the names. A link in a
    local source is refused (never followed), and every name is confined to `dst` by `join`."""
    names = walk(src)
    for name in names:
        check_name(src, name, "copied file")
        copy_file(join(src, name, field="copied file"), join(dst, name, field="copied file"))
    return names
