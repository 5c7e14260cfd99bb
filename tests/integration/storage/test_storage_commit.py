"""The commit protocol (storage/commit.py) on local disk and on a real S3 endpoint, one code path: commit
and read, a writer killed mid-generation, two committers racing, collection, pointers confined to their
root, and DCP through its fsspec writer and reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

import storage
from storage import CommitConflict, CommitRoot, ConfinementError, StorageError
from storage import dcp as storage_dcp
from storage.commit import new_generation_name


def _write_generation(root: CommitRoot, files: dict[str, bytes]) -> str:
    gen = root.new_generation()
    for name, data in files.items():
        storage.write_bytes(storage.join(gen, name), data)
    return gen


def test_commit_then_read(root_uri: str) -> None:
    root = CommitRoot(root_uri)
    assert root.read("latest") is None and root.resolve("latest") is None

    gen1 = _write_generation(root, {"a.txt": b"one", "sub/b.txt": b"uno"})
    p1 = root.commit("latest", gen1, expect=None, meta={"step": 1})
    assert root.resolve("latest") == gen1
    assert root.read("latest") == p1 and p1.meta == {"step": 1}
    assert storage.read_bytes(storage.join(root.resolve("latest"), "sub/b.txt")) == b"uno"

    gen2 = _write_generation(root, {"a.txt": b"two"})
    root.commit("latest", gen2, expect=p1)
    assert storage.read_bytes(storage.join(root.resolve("latest"), "a.txt")) == b"two"
    # the replaced generation is collected at commit time; the root holds the new one and the pointer
    assert root.generations() == [storage.name_of(gen2)]
    assert sorted(n for n in storage.listdir(root_uri) if not n.startswith(".")) == sorted(
        [storage.name_of(gen2), "latest"]
    )


def test_generation_kept_while_another_pointer_names_it(root_uri: str) -> None:
    root = CommitRoot(root_uri)
    gen1 = _write_generation(root, {"w": b"1"})
    root.commit("latest", gen1, expect=None)
    root.commit("best", gen1, expect=None)
    gen2 = _write_generation(root, {"w": b"2"})
    root.commit("latest", gen2)  # `best` still names gen1: it stays
    assert root.resolve("best") == gen1 and storage.read_bytes(storage.join(gen1, "w")) == b"1"
    assert root.generations() == sorted([storage.name_of(gen1), storage.name_of(gen2)])


_KILLED_WRITER = r"""
import sys, time
import storage
from storage import CommitRoot
root = CommitRoot(sys.argv[1])
gen = root.new_generation()
storage.write_bytes(storage.join(gen, "a.txt"), b"partial")
out = storage.open_output(storage.join(gen, "big.bin"))
out.write(b"x" * (6 << 20))  # past S3's 5 MiB part size: a multipart upload is under way
out.flush()
print(gen, flush=True)
time.sleep(120)
root.commit("latest", gen)
"""


def test_writer_killed_mid_generation_leaves_previous_readable(root_uri: str) -> None:
    root = CommitRoot(root_uri)
    gen1 = _write_generation(root, {"a.txt": b"complete"})
    root.commit("latest", gen1, expect=None)

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, root_uri], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        partial = writer.stdout.readline().strip()  # the writer is mid-way through its second object
        assert partial.startswith(root_uri), partial
    finally:
        writer.kill()  # SIGKILL: no cleanup, no atexit
        writer.wait()
    assert writer.returncode == -9

    assert root.resolve("latest") == gen1
    assert storage.read_bytes(storage.join(root.resolve("latest"), "a.txt")) == b"complete"
    assert storage.read_bytes(storage.join(partial, "a.txt")) == b"partial"  # written, never named
    if root_uri.startswith("s3://"):  # an unfinished multipart upload is no object at all
        assert not storage.exists(storage.join(partial, "big.bin"))

    # within the grace period the orphan may still be a live writer's: it stays; past it, it goes
    assert root.collect(grace_s=3600) == []
    assert root.collect(grace_s=0) == [storage.name_of(partial)]
    assert root.generations() == [storage.name_of(gen1)]
    assert storage.read_bytes(storage.join(gen1, "a.txt")) == b"complete"


def test_two_committers_on_one_base_only_one_wins(root_uri: str) -> None:
    root = CommitRoot(root_uri)
    root.commit("latest", _write_generation(root, {"v": b"0"}), expect=None)
    base = root.read("latest")
    writers = 4
    gens = [_write_generation(root, {"v": str(i + 1).encode()}) for i in range(writers)]
    start = threading.Barrier(writers)
    results: list[object] = [None] * writers

    def commit(i: int) -> None:
        start.wait()
        try:
            results[i] = root.commit("latest", gens[i], expect=base, collect=False)
        except CommitConflict as e:
            results[i] = e

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if not isinstance(r, CommitConflict)]
    assert len(winners) == 1, results
    assert root.resolve("latest") == gens[winners[0]]
    for r in results:
        if isinstance(r, CommitConflict):
            assert str(r) == f"{storage.join(root_uri, 'latest')}: another writer committed first"
    # a fresh pointer: only one of two creators wins too
    first = root.commit("final", gens[0], expect=None, collect=False)
    with pytest.raises(CommitConflict):
        root.commit("final", gens[1], expect=None, collect=False)
    assert root.read("final") == first


def test_collect_removes_only_unnamed_generations(root_uri: str) -> None:
    root = CommitRoot(root_uri)
    named = _write_generation(root, {"x": b"1"})
    root.commit("latest", named, expect=None)
    orphans = sorted(storage.name_of(_write_generation(root, {"x": b"2"})) for _ in range(2))
    assert sorted(root.collect(grace_s=0)) == orphans
    assert root.generations() == [storage.name_of(named)]


def _write_pointer_object(root_uri: str, name: str, generation: object) -> None:
    storage.write_bytes(storage.join(root_uri, name), json.dumps({"generation": generation}).encode())


@pytest.mark.parametrize(
    "value, words",
    [
        ("../../x", "climbs out with '..'"),
        ("/etc", "is an absolute path"),
        ("s3://other-bucket/gen-x", "is an absolute path"),
        ("gen-1/../../x", "climbs out with '..'"),
        ("step-000010", "is not a generation of this root"),
    ],
)
def test_pointer_may_only_name_a_generation_of_its_root(root_uri: str, value: str, words: str) -> None:
    root = CommitRoot(root_uri)
    _write_pointer_object(root_uri, "latest", value)
    with pytest.raises(ConfinementError) as e:
        root.resolve("latest")
    pointer = storage.join(root_uri, "latest")
    assert str(e.value).startswith(f"{pointer}: field 'generation'")
    assert f"{value!r} {words}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfinementError):  # collection refuses to guess what a bad pointer names
        root.collect(grace_s=0)


def test_an_oversized_pointer_is_refused_after_reading_only_its_limit(root_uri: str) -> None:
    root = CommitRoot(root_uri)
    gen = _write_generation(root, {"x": b"1"})
    padding = "x" * (1 << 20)  # a 1 MiB "pointer": read no further than 64 KiB + 1 byte, then refused
    storage.write_bytes(
        storage.join(root_uri, "latest"),
        json.dumps({"generation": storage.name_of(gen), "pad": padding}).encode(),
    )
    with pytest.raises(StorageError) as e:
        root.resolve("latest")
    assert "larger than 65536 bytes" in str(e.value) and "\n" not in str(e.value)


def test_commit_refuses_a_generation_of_another_root(root_uri: str) -> None:
    root = CommitRoot(root_uri)
    elsewhere = CommitRoot(storage.join(root_uri, "elsewhere"))
    gen = _write_generation(elsewhere, {"x": b"1"})
    with pytest.raises(ConfinementError, match="is not a generation of"):
        root.commit("latest", gen)
    empty = root.new_generation()
    with pytest.raises(StorageError, match="nothing was written to this generation"):
        root.commit("latest", empty)
    assert root.read("latest") is None


def test_generation_names_sort_by_time() -> None:
    a, b = new_generation_name(1_700_000_000), new_generation_name(1_800_000_000)
    assert a < b and a.startswith("gen-20231114T")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_save_and_load_through_fsspec(root_uri: str) -> None:
    """A small state dict through DCP's FsspecWriter/FsspecReader into a generation, committed and loaded
    back through the pointer (no process group: DCP runs single-process)."""
    root = CommitRoot(root_uri)
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(4, 3), "b": torch.arange(5.0)}, "step": torch.tensor(7)}
    gen = root.new_generation()
    dcp.save(state, storage_writer=storage_dcp.writer(gen))
    root.commit("latest", gen, expect=None)
    assert ".metadata" in storage.listdir(gen) and not any(n.endswith(".tmp") for n in storage.listdir(gen))

    loaded = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(5)}, "step": torch.tensor(0)}
    dcp.load(loaded, storage_reader=storage_dcp.reader(root.resolve("latest")))
    torch.testing.assert_close(loaded, state, rtol=0, atol=0)


def test_storage_set_under_a_minute_budget(seaweedfs) -> None:
    """The fixture's start-up is part of the storage tests' ~60 s budget (measured, printed with -s)."""
    assert seaweedfs.startup_s < 30, seaweedfs.startup_s
