"""URIs, confined names, local copies and the error line (storage/uri.py, fs.py, errors.py): no store."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

import storage
from storage import ConfinementError, StorageError
from storage.errors import NOT_FOUND, UNREACHABLE, with_retries
from storage.uri import parse


def test_parse_plain_path_is_local_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse("runs/x") == ("file", "", str(tmp_path / "runs" / "x"))
    assert parse("file:///data/logs") == ("file", "", "/data/logs")
    assert parse("s3://bucket/runs/x/") == ("s3", "bucket", "runs/x")
    assert parse("hdfs://namenode:8020/user/x") == ("hdfs", "namenode:8020", "user/x")
    assert storage.is_local("runs/x") and not storage.is_local("gs://b/x")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("ftp://host/x", "ftp://host/x: unsupported scheme 'ftp' (use a path, file, s3, gs, hdfs)"),
        ("s3:///x", "s3:///x: s3:// needs a bucket"),
        ("s3://b/x?versionId=3", "s3://b/x: a URI with a query string or fragment is not supported"),
        ("file://host/x", "file://host/x: file:// URIs name a local path (file:///abs/path)"),
    ],
)
def test_parse_refuses(uri: str, message: str) -> None:
    with pytest.raises(StorageError) as e:
        parse(uri)
    assert str(e.value) == message


def test_display_never_shows_credentials() -> None:
    assert storage.display("s3://AKIA:hunter2@bucket/x?X-Amz-Signature=abc") == "s3://bucket/x"
    assert storage.display("hdfs://user:pw@nn:8020/p") == "hdfs://nn:8020/p"
    assert storage.display("runs/x") == "runs/x"
    with pytest.raises(StorageError) as e:
        parse("s3://AKIA:hunter2@bucket/x")
    assert "hunter2" not in str(e.value) and "AKIA" not in str(e.value)


def test_join_keeps_the_form_of_its_root(tmp_path) -> None:
    assert storage.join("runs/x", "shards", "part-0.parquet") == os.path.join(
        "runs/x", "shards", "part-0.parquet"
    )
    assert storage.join("s3://b/runs/x/", "a/b.json") == "s3://b/runs/x/a/b.json"
    assert storage.join(f"file://{tmp_path}", "a") == f"file://{tmp_path}/a"
    assert storage.name_of("s3://b/runs/x/") == "x"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("../../x", "climbs out with '..'"),
        ("a/../../x", "climbs out with '..'"),
        ("/etc/passwd", "is an absolute path"),
        ("s3://other/x", "is an absolute path"),
        ("C:/x", "is an absolute path"),
        ("a//b", "has an empty or '.' segment"),
        ("./a", "has an empty or '.' segment"),
        ("", "is empty"),
        ("a\\..\\b", "holds a NUL or backslash"),
    ],
)
@pytest.mark.parametrize("root", ["runs/x", "s3://bucket/runs/x"])
def test_join_refuses_names_that_leave_their_root(root: str, name: str, reason: str) -> None:
    with pytest.raises(ConfinementError) as e:
        storage.join(root, name, field="manifest.json: files[3]")
    assert str(e.value) == f"{root}: manifest.json: files[3] = {name!r} {reason}; names must stay inside it"


def test_join_refuses_a_link_that_leads_outside(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "alias").symlink_to(root / "inner")
    with pytest.raises(ConfinementError) as e:
        storage.join(str(root), "escape/secret.txt", field="vocab")
    assert str(e.value) == (
        f"{root}: vocab = 'escape/secret.txt' is a link that leads outside ({outside / 'secret.txt'}); "
        "names must stay inside it"
    )
    assert storage.join(str(root), "alias/x") == str(root / "alias" / "x")  # a link that stays inside


def test_local_helpers(tmp_path: Path) -> None:
    root = str(tmp_path / "r")
    storage.write_bytes(storage.join(root, "a/b.txt"), b"hello")  # parents are created
    assert storage.read_bytes(storage.join(root, "a/b.txt")) == b"hello"
    assert storage.exists(root) and storage.is_file(storage.join(root, "a/b.txt"))
    assert storage.listdir(root) == ["a"] and storage.listdir(storage.join(root, "none")) == []
    with pytest.raises(StorageError, match="is a folder"):
        storage.delete(storage.join(root, "a"))
    storage.delete(storage.join(root, "a"), recursive=True)
    storage.delete(storage.join(root, "a"), recursive=True)  # nothing there: fine
    assert not storage.exists(storage.join(root, "a"))
    with pytest.raises(StorageError) as e:
        storage.read_bytes(storage.join(root, "missing.json"))
    assert str(e.value) == f"{storage.join(root, 'missing.json')}: {NOT_FOUND}"


def test_copy_tree_copies_files_and_never_follows_links(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"\x00" * 10)
    (src / "sub" / "b.txt").write_text("b")
    assert storage.copy_tree(str(src), str(dst)) == ["a.bin", "sub/b.txt"]
    assert (dst / "sub" / "b.txt").read_text() == "b" and (dst / "a.bin").read_bytes() == b"\x00" * 10

    (tmp_path / "secret").write_text("s")
    (src / "sub" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(StorageError) as e:
        storage.copy_tree(str(src), str(tmp_path / "dst2"))
    assert str(e.value) == f"{src / 'sub' / 'link'}: is a symbolic link; copies never follow links"
    assert not (tmp_path / "dst2").exists()  # refused before anything was copied


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transient_errors_are_retried_with_backoff_then_one_line() -> None:
    port, calls = _unused_port(), []

    def connect() -> None:
        calls.append(time.monotonic())
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # refused: nothing listens

    with pytest.raises(StorageError) as e:
        with_retries("s3://b/x", connect)
    assert str(e.value) == f"s3://b/x: {UNREACHABLE} (after 4 attempts)"
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) == 4 and all(g >= w for g, w in zip(gaps, (0.25, 0.5, 1.0))), gaps


def test_lasting_errors_fail_at_once_and_bugs_pass_through(tmp_path: Path) -> None:
    calls = []

    def read_missing() -> bytes:
        calls.append(1)
        return (tmp_path / "none").read_bytes()

    with pytest.raises(StorageError) as e:
        with_retries("s3://b/none", read_missing)
    assert str(e.value) == f"s3://b/none: {NOT_FOUND}" and len(calls) == 1
    with pytest.raises(TypeError):
        with_retries("s3://b/x", lambda: len(3))  # type: ignore[arg-type]
