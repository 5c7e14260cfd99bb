"""Commits that are atomic without rename: immutable generations plus a small pointer object written last.

Layout under a commit root (a folder or an S3 prefix that holds nothing else):
    gen-20261207T115012Z-1a2b3c4d/...   a generation: every object of one save or build, never changed
    latest                              a pointer: {"generation": "gen-...", "meta": {...}} (small JSON)
A writer puts every object of a new generation first, then writes the pointer (`commit`). One PUT of a
small object is atomic on every object store, so a reader that resolves the pointer sees the previous
generation or the new one, whole: a writer killed at any point before the pointer leaves the previous
generation readable, and its partial generation is never named. Delta Lake's and Iceberg's commit logs
work the same way.

Two writers must not both commit on the same base: the pointer write is conditional.
    S3       PUT with `If-None-Match: *` (no pointer yet) or `If-Match: <ETag read>` (botocore; pyarrow does
             not expose conditional writes). A store that ignores the headers degrades to last-writer-wins.
    local    under an exclusive flock on `.<name>.lock`: compare the pointer's digest, write a temporary
             file, fsync, os.replace (atomic on POSIX)
    gs, hdfs read-compare-write without a lock (last writer wins in a race); GCS's ifGenerationMatch needs
             a client this project does not ship yet
A writer that lost raises CommitConflict; its generation stays unreferenced and is collected.

Collection: `commit` deletes the generation the pointer named before, once no other pointer names it (it
was complete and is now retired). `collect(grace_s)` deletes every generation no pointer names that is
older than `grace_s` by the time in its name: what killed writers left behind. The grace period keeps a
writer that is still writing its generation safe (Iceberg's orphan-file removal keeps the same margin).

A pointer names only a generation of its own root: its `generation` field must be a `gen-<time>-<id>` name,
never a path; anything else is refused in one line naming the pointer, the field and the value.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from storage import fs
from storage.errors import CommitConflict, ConfinementError, StorageError, with_retries
from storage.uri import LOCAL, check_name, display, join, parse

_GENERATION = re.compile(r"^gen-(\d{8}T\d{6}Z)-[0-9a-f]{8}$")
_POINTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_MAX_POINTER_BYTES = 64 << 10


@dataclass(frozen=True)
class Pointer:
    name: str  # the pointer's name in its root (`latest`)
    generation: str  # the generation it names (`gen-...`)
    uri: str  # that generation's URI
    version: str  # what the store calls this pointer's content (S3 ETag, else a digest): a commit's base
    meta: dict[str, Any] = field(default_factory=dict)


class _Current:
    """`expect=CURRENT`: compare against whatever the pointer holds just before the write."""


CURRENT = _Current()


def new_generation_name(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return f"gen-{stamp:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def generation_age_s(name: str, now: float | None = None) -> float:
    m = _GENERATION.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a generation name")
    born = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
    return (time.time() if now is None else now) - born


# ---------------------------------------------------------------------------------------------------
# pointer objects: read with a version, write conditionally


def read_versioned(uri: str | os.PathLike[str]) -> tuple[bytes, str] | None:
    """(content, version) of one object that is replaced only by `write_conditional`, or None when there is
    none: for a commit object with its own layout (the data build's manifest.json names its generation's
    files itself). The version is the S3 ETag, or a digest of the content."""
    return _read_raw(os.fspath(uri), limit=None)


def write_conditional(
    uri: str | os.PathLike[str], data: bytes, expect: str | None | _Current = CURRENT
) -> str:
    """Write the object last and conditionally, as `CommitRoot.commit` writes a pointer: only while its
    version is still `expect` (None: while there is none); CommitConflict otherwise. Returns the new
    version."""
    return _write_pointer(os.fspath(uri), data, expect)


@lru_cache(maxsize=8)
def _s3_client(settings: fs.S3Settings, _credentials: str) -> Any:
    import botocore.session
    from botocore.config import Config

    config = Config(
        connect_timeout=fs.CONNECT_TIMEOUT_S,
        read_timeout=fs.REQUEST_TIMEOUT_S,
        retries={"total_max_attempts": 1, "mode": "standard"},  # errors.with_retries owns retries
        s3={"addressing_style": "path"} if settings.endpoint else None,
    )
    return botocore.session.Session().create_client(
        "s3", region_name=settings.region, endpoint_url=settings.endpoint, config=config
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _read_raw(uri: str, limit: int | None = _MAX_POINTER_BYTES) -> tuple[bytes, str] | None:
    """(content, version) of a pointer object, or None when there is none; at most `limit` + 1 bytes are
    read (a pointer longer than `limit` is refused by its reader)."""
    p = parse(uri)
    if p.scheme == "s3":
        client = _s3_client(fs.s3_settings(), fs._credentials_fingerprint())

        def get() -> tuple[bytes, str] | None:
            try:
                r = client.get_object(Bucket=p.netloc, Key=p.path)
            except Exception as e:
                if _error_code(e) in ("NoSuchKey", "404"):
                    return None
                raise
            return r["Body"].read(None if limit is None else limit + 1), r["ETag"]

        return with_retries(display(uri), get)
    if not fs.is_file(uri):
        return None
    filesystem, path = fs.resolve(uri)

    def head() -> bytes:
        with filesystem.open_input_stream(path) as f:
            return f.read() if limit is None else f.read(limit + 1)

    data = fs._call(uri, head)
    return data, _digest(data)


def _write_s3(uri: str, data: bytes, expected: str | None) -> str:
    p = parse(uri)
    client = _s3_client(fs.s3_settings(), fs._credentials_fingerprint())
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}

    def put() -> str:
        try:
            return client.put_object(Bucket=p.netloc, Key=p.path, Body=data, **condition)["ETag"]
        except Exception as e:
            # 412: the condition did not hold; 409: a concurrent conditional write to the same key won
            if _error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise CommitConflict(display(uri), "another writer committed first") from None
            raise

    return with_retries(display(uri), put)


@contextlib.contextmanager
def _local_lock(path: str):
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_local(uri: str, data: bytes, expected: str | None | _Current) -> str:
    path = parse(uri).path
    with _local_lock(path):
        current = _read_raw(uri)
        if not isinstance(expected, _Current) and (current[1] if current else None) != expected:
            raise CommitConflict(display(uri), "another writer committed first")
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return _digest(data)


def _write_pointer(uri: str, data: bytes, expected: str | None | _Current) -> str:
    scheme = parse(uri).scheme
    if scheme == LOCAL:
        return _write_local(uri, data, expected)
    if isinstance(expected, _Current):
        current = _read_raw(uri)
        expected = current[1] if current else None
    if scheme == "s3":
        return _write_s3(uri, data, expected)
    current = _read_raw(uri)  # gs, hdfs: not atomic (module docstring)
    if (current[1] if current else None) != expected:
        raise CommitConflict(display(uri), "another writer committed first")
    fs.write_bytes(uri, data)
    return _digest(data)


# ---------------------------------------------------------------------------------------------------


class CommitRoot:
    """A folder or prefix of generations and the pointers that name them (module docstring).

    root = CommitRoot("s3://bucket/runs/x/checkpoints")
    base = root.read("latest")                  # the pointer this save builds on (None: first save)
    gen = root.new_generation()                 # a URI: write every object of the save under it
    ...
    root.commit("latest", gen, expect=base)     # CommitConflict if another writer committed meanwhile
    root.resolve("latest")                      # -> gen
    """

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        self.uri = os.fspath(uri)
        parse(self.uri)  # refuses a bad URI now

    def __repr__(self) -> str:
        return f"CommitRoot({display(self.uri)!r})"

    def new_generation(self) -> str:
        """The URI of a fresh generation (nothing is written until the caller writes under it)."""
        return join(self.uri, new_generation_name(), field="generation")

    def _pointer_uri(self, name: str) -> str:
        if not _POINTER_NAME.match(name) or name.startswith("gen-"):
            raise ConfinementError(
                display(self.uri), f"pointer name {name!r} is not a plain name (letters, digits, _.-)"
            )
        return join(self.uri, name, field="pointer")

    def _generation_uri(self, source: str, value: Any) -> str:
        """A pointer's `generation` field, confined to this root: only a gen-<time>-<id> name in it."""
        if not isinstance(value, str):
            raise ConfinementError(
                display(source), f"field 'generation' = {value!r} is not a generation name"
            )
        check_name(source, value, field="field 'generation'")
        if not _GENERATION.match(value):
            raise ConfinementError(
                display(source),
                f"field 'generation' = {value!r} is not a generation of this root (gen-<time>-<id>)",
            )
        return join(self.uri, value, field=f"field 'generation' of {display(source)}")

    def read(self, name: str) -> Pointer | None:
        """The pointer `name`, or None when it was never committed."""
        uri = self._pointer_uri(name)
        raw = _read_raw(uri)
        if raw is None:
            return None
        data, version = raw
        try:
            if len(data) > _MAX_POINTER_BYTES:
                raise ValueError(f"larger than {_MAX_POINTER_BYTES} bytes")
            doc = json.loads(data)
            if not isinstance(doc, dict) or "generation" not in doc:
                raise ValueError("no 'generation' field")
        except ValueError as e:
            raise StorageError(display(uri), f"not a pointer object ({e})") from None
        gen_uri = self._generation_uri(uri, doc["generation"])
        meta = doc.get("meta") or {}
        return Pointer(name, doc["generation"], gen_uri, version, meta if isinstance(meta, dict) else {})

    def resolve(self, name: str) -> str | None:
        """The URI of the generation `name` points to (what readers load), or None."""
        pointer = self.read(name)
        return pointer.uri if pointer else None

    def commit(
        self,
        name: str,
        generation: str,
        expect: Pointer | None | _Current = CURRENT,
        meta: dict[str, Any] | None = None,
        collect: bool = True,
    ) -> Pointer:
        """Point `name` at `generation` (a URI from new_generation, fully written), the last write of a save.

        `expect`: the pointer this commit replaces, as read before the generation was written (None: there
        must be none yet); the write fails with CommitConflict if the pointer changed since. CURRENT
        compares with the pointer as it is just before the write (one writer per root). With `collect`, the
        generation replaced is deleted once no other pointer names it."""
        gen_name = generation.rstrip("/").rsplit("/", 1)[-1]
        gen_uri = self._generation_uri(self.uri, gen_name)
        if gen_uri.rstrip("/") != generation.rstrip("/"):
            raise ConfinementError(display(generation), f"is not a generation of {display(self.uri)}")
        if not fs.exists(gen_uri):
            raise StorageError(
                display(gen_uri), "nothing was written to this generation; refusing to commit it"
            )
        uri = self._pointer_uri(name)
        previous = self.read(name) if collect else None
        data = json.dumps({"generation": gen_name, "meta": meta or {}}, sort_keys=True).encode()
        base = expect.version if isinstance(expect, Pointer) else expect
        version = _write_pointer(uri, data, base)
        if isinstance(expect, Pointer):
            previous = expect
        if collect and previous is not None and previous.generation != gen_name:
            named = {p.generation for p in self.pointers().values()}
            if previous.generation not in named:
                fs.delete(previous.uri, recursive=True)
        return Pointer(name, gen_name, gen_uri, version, dict(meta or {}))

    def retire(self, name: str) -> Pointer | None:
        """Delete the pointer `name`, then the generation it named once no other pointer names it (a
        writer killed in between leaves an unnamed generation: `collect` removes it). Returns the pointer
        retired, or None when there was none."""
        pointer = self.read(name)
        if pointer is None:
            return None
        uri = self._pointer_uri(name)
        fs.delete(uri)
        if parse(uri).scheme == LOCAL:  # its lock file goes with it (one writer per root: nobody waits on it)
            path = parse(uri).path
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"))
        if pointer.generation not in {p.generation for p in self.pointers().values()}:
            fs.delete(pointer.uri, recursive=True)
        return pointer

    def generations(self) -> list[str]:
        """Names of the generations under the root, oldest first."""
        return [n for n in fs.listdir(self.uri) if _GENERATION.match(n)]

    def pointers(self) -> dict[str, Pointer]:
        """Every pointer in the root. Anything else at the top (but dotfiles: locks, temporaries) must be a
        pointer: the root holds only generations and pointers, so collection never guesses."""
        out = {}
        for n in fs.listdir(self.uri):
            if n.startswith(".") or _GENERATION.match(n):
                continue
            pointer = self.read(n)
            if pointer is not None:
                out[n] = pointer
        return out

    def collect(self, grace_s: float = 3600.0) -> list[str]:
        """Delete generations that no pointer names and that are older than `grace_s`; returns their names."""
        named = {p.generation for p in self.pointers().values()}
        removed = []
        for gen in self.generations():
            if gen not in named and generation_age_s(gen) >= grace_s:
                fs.delete(join(self.uri, gen, field="generation"), recursive=True)
                removed.append(gen)
        return removed
