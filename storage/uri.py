"""URIs: what every path the project reads or writes is, how child URIs are built, and how one is shown.

A URI is a plain path (`runs/x`, `/data/logs`), `file:///abs/path`, `s3://bucket/prefix`,
`gs://bucket/prefix` or `hdfs://host:port/path`. The local disk stays the default: a plain path is a local
path, and `join` keeps it plain, so code that still calls `open()` on it keeps working.

`join(uri, *names, field=...)` is the only way to build a child URI. Each name is confined to its parent:
absolute paths, `..`, empty segments and (on local disk) links that resolve outside the parent are refused
with one line naming the field and the value. Names read from a manifest, pointer, sidecar, Parquet
metadata or the command line all go through it.

Credentials never live in a URI (they would be logged): `s3://key:secret@bucket` is refused, and
`display` drops any user info and query string before a URI reaches a message, a log or MLflow.
"""

from __future__ import annotations

import os
from typing import NamedTuple
from urllib.parse import urlsplit

from storage.errors import ConfinementError, StorageError

LOCAL = "file"
SCHEMES = (LOCAL, "s3", "gs", "hdfs")


class Parsed(NamedTuple):
    scheme: str  # one of SCHEMES
    netloc: str  # bucket (s3, gs), host:port (hdfs), "" (local)
    path: str  # local: an absolute path; remote: the key or path under netloc, no leading "/"


def parse(uri: str | os.PathLike[str]) -> Parsed:
    """Split a URI; a plain path is local (made absolute against the working directory)."""
    uri = os.fspath(uri)
    if "://" not in uri:
        if not uri:
            raise StorageError("''", "an empty path is not a location")
        return Parsed(LOCAL, "", os.path.abspath(uri))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(display(uri), f"unsupported scheme {scheme!r} (use a path, {', '.join(SCHEMES)})")
    if parts.username is not None or parts.password is not None:
        raise StorageError(
            display(uri),
            "credentials in a URI are refused (they would be logged): set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, or Google application-default credentials",
        )
    if parts.query or parts.fragment:
        raise StorageError(display(uri), "a URI with a query string or fragment is not supported")
    if scheme == LOCAL:
        if parts.netloc not in ("", "localhost"):
            raise StorageError(display(uri), "file:// URIs name a local path (file:///abs/path)")
        return Parsed(LOCAL, "", os.path.abspath(parts.path or "/"))
    if not parts.netloc:
        raise StorageError(display(uri), f"{scheme}:// needs a {'host' if scheme == 'hdfs' else 'bucket'}")
    return Parsed(scheme, parts.netloc, parts.path.strip("/"))


def is_local(uri: str | os.PathLike[str]) -> bool:
    return parse(uri).scheme == LOCAL


def display(uri: str | os.PathLike[str]) -> str:
    """The URI as it may be shown: user info and query string dropped (they can carry credentials)."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _refuse(root: str, field: str, value: str, reason: str) -> ConfinementError:
    return ConfinementError(display(root), f"{field} = {value!r} {reason}; names must stay inside it")


def check_name(root: str, name: str, field: str = "name") -> list[str]:
    """The segments of a relative name, or ConfinementError naming `field` and the value."""
    if not isinstance(name, str) or not name:
        raise _refuse(root, field, str(name), "is empty")
    if "\x00" in name or "\\" in name:
        raise _refuse(root, field, name, "holds a NUL or backslash")
    if name.startswith("/") or "://" in name or (len(name) > 1 and name[1] == ":"):
        raise _refuse(root, field, name, "is an absolute path")
    segments = name.split("/")
    if ".." in segments:
        raise _refuse(root, field, name, "climbs out with '..'")
    if any(s in ("", ".") for s in segments):
        raise _refuse(root, field, name, "has an empty or '.' segment")
    return segments


def join(uri: str | os.PathLike[str], *names: str, field: str = "name") -> str:
    """`uri/name/...`: each name confined to `uri` (module docstring). A plain path stays a plain path.

    On local disk the result's real path must also lie inside the parent's: a symbolic link that leads
    outside it is refused (links that stay inside are fine)."""
    root = os.fspath(uri)
    segments = [s for name in names for s in check_name(root, name, field)]
    if "://" not in root:
        joined = os.path.join(root, *segments)
    else:
        joined = root.rstrip("/") + "/" + "/".join(segments)
    if parse(root).scheme == LOCAL:
        base = os.path.realpath(parse(root).path)
        real = os.path.realpath(parse(joined).path)
        if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
            raise _refuse(root, field, "/".join(segments), f"is a link that leads outside ({real})")
    return joined


def name_of(uri: str | os.PathLike[str]) -> str:
    """The last segment of a URI (`s3://b/runs/x` -> `x`)."""
    return parse(uri).path.rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str | os.PathLike[str]) -> str:
    """The folder or prefix holding a URI (`s3://b/runs/x` -> `s3://b/runs`); a plain path stays plain.
    `join(parent(u), name_of(u))` names `u` again."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return os.path.dirname(os.path.abspath(uri))
    p = parse(uri)
    if p.scheme == LOCAL:
        return f"file://{os.path.dirname(p.path)}"
    head = p.path.rstrip("/").rpartition("/")[0]
    return f"{p.scheme}://{p.netloc}/{head}".rstrip("/")
