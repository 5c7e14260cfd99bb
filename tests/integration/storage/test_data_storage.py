"""The data path through the storage layer, on a real S3 endpoint (SeaweedFS, conftest.py): a sequence
Parquet and a shard directory read from s3:// equal the same files on local disk, training on s3:// data
gives the losses of the same file on disk, a manifest naming a file outside its prefix is refused, and
`fuxi data build-sequences` / `append-day` on s3:// build what they build on disk, committed by a
conditional manifest write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import storage
from pipeline.data.build import (
    FORMAT,
    BuildConfig,
    _read_manifest,
    _write_manifest,
    append_day,
    build_sequences,
    read_manifest,
)
from pipeline.data.sequences import read_sequences, write_sequences
from pipeline.data.stream import Backend, ShardBatches
from pipeline.data.synth_logs import LogConfig, write_logs
from pipeline.data.synthetic import synthetic_sequences
from pipeline.data.vocab import read_vocabulary
from pipeline.train.presets import get_preset
from tests.helpers.shards import build_shards

REPO = Path(__file__).resolve().parents[3]


def s3_prefix(server: Any, name: str) -> str:
    return f"s3://{server.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shard directory (manifest, shards, vocabulary) built on local disk."""
    root = tmp_path_factory.mktemp("data-storage")
    logs = LogConfig(num_users=300, num_items=500, num_days=2, num_events=5000, seed=3, num_themes=5)
    return build_shards(root, logs, BuildConfig(max_length=30, num_partitions=2, row_group_rows=32))


@pytest.fixture
def ray_with_s3_env(s3_env: Any):
    """A local Ray started after the AWS_* variables are set: its workers inherit the driver's environment
    (how `fuxi` commands run), which is all they need to read s3:// themselves."""
    ray = pytest.importorskip("ray")
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield s3_env
    ray.shutdown()


def test_shard_directory_on_s3_reads_and_streams_as_on_disk(ray_with_s3_env: Any, local_shards: Path) -> None:
    s3_env = ray_with_s3_env
    remote = s3_prefix(s3_env, "shards")
    storage.copy_tree(str(local_shards), remote)

    here, there = read_sequences(local_shards), read_sequences(remote)
    assert there.table.equals(here.table) and there.num_items == here.num_items
    assert there.meta["source"] == remote and isinstance(there.vocab, str)
    assert there.vocab.startswith(remote + "/vocab-g")
    assert read_vocabulary(there.vocab).table.equals(read_vocabulary(here.vocab).table)

    args = dict(batch_size=16, max_sequence_length=12, drop_last_items=1, seed=5, window_units=2)
    reference = list(ShardBatches(local_shards, backend=Backend.PYARROW, **args).epoch(0))
    for backend in (Backend.PYARROW, Backend.RAY):  # the Ray workers read S3 themselves
        stream = ShardBatches(remote, backend=backend, **args)
        assert stream.units.files[0].startswith(remote + "/part-")
        batches = list(stream.epoch(0))
        assert len(batches) == len(reference) > 2
        for a, b in zip(batches, reference):
            assert torch.equal(a.user_ids, b.user_ids) and torch.equal(a.seq.values(), b.seq.values())


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("name", ["../../x.parquet", "/etc/x.parquet", "s3://other/x.parquet"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(
    where: str, name: str, local_shards: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    manifest = json.loads((local_shards / "manifest.json").read_text())
    manifest["shards"][1]["file"] = name
    if where == "local":
        root = str(tmp_path / "seq")
    else:
        root = s3_prefix(request.getfixturevalue("s3_env"), "escape")
    storage.copy_tree(str(local_shards), root)
    storage.write_bytes(storage.join(root, "manifest.json"), json.dumps(manifest).encode())
    for read in (read_sequences, lambda r: ShardBatches(r, 8, 12, backend=Backend.PYARROW)):
        with pytest.raises(storage.ConfinementError) as err:
            read(root)
        message = str(err.value)
        assert "\n" not in message
        assert f"manifest.json: shards[1].file = {name!r}" in message, message


def fuxi_train(data: str, run_dir: Path) -> dict[str, Any]:
    report = run_dir.with_suffix(".json")
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--preset", "tiny", "--data", data]
    cmd += ["--set", "tracking.enabled=false", "--set", "epochs=1", "--set", f"run_dir={run_dir}"]
    proc = subprocess.run(
        [*cmd, "--report-json", str(report)],
        capture_output=True,
        text=True,
        cwd=REPO,
        # one thread: the same inputs give bit-identical losses (conftest.py's `deterministic`)
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.slow
def test_training_on_a_sequence_file_on_s3_matches_the_same_file_on_disk(s3_env: Any, tmp_path: Path) -> None:
    local = tmp_path / "seq.parquet"
    write_sequences(synthetic_sequences(get_preset("tiny").data.synthetic), local)
    remote = s3_prefix(s3_env, "train") + "/seq.parquet"
    storage.copy_file(str(local), remote)

    on_disk = fuxi_train(str(local), tmp_path / "disk")
    on_s3 = fuxi_train(remote, tmp_path / "s3")
    losses = [h["train_loss"] for h in on_disk["history"]]
    assert losses and [h["train_loss"] for h in on_s3["history"]] == losses
    assert on_s3["steps"] == on_disk["steps"] > 0
    assert not (REPO / "s3:").exists()  # the URI was never taken as a local path


# ---------------------------------------------------------------------------------------------------
# the build on an object store: `fuxi data build-sequences` and `append-day` with s3:// logs and output


def fuxi_data(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "data", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_build_and_append_on_s3_equal_the_same_on_disk(ray_with_s3_env: Any, tmp_path: Path) -> None:
    logs = LogConfig(
        num_users=300,
        num_items=800,
        num_days=3,
        num_events=6000,
        seed=4,
        num_themes=5,
        rows_per_part=1000,
        bad_fraction=0.01,
    )
    write_logs(logs, tmp_path / "logs", progress=False)
    days = sorted(p.name[5:] for p in (tmp_path / "logs").glob("date=*"))
    remote_logs = s3_prefix(ray_with_s3_env, "logs")
    storage.copy_tree(str(tmp_path / "logs"), remote_logs)
    remote = s3_prefix(ray_with_s3_env, "build")

    cfg = BuildConfig(max_length=30, num_partitions=2, row_group_rows=32)
    build_sequences(tmp_path / "logs", tmp_path / "seq", cfg, dates=days[:2], progress=False)
    flags = ["--max-length", "30", "--partitions", "2", "--dates", ",".join(days[:2])]
    out = fuxi_data("build-sequences", "--logs", remote_logs, "--out", remote, *flags)
    assert "build" in out and not (REPO / "s3:").exists()  # the URIs were never taken as local paths

    for name in ("users", "interactions", "num_items", "days"):
        assert read_manifest(remote)[name] == read_manifest(tmp_path / "seq")[name]

    append_day(tmp_path / "logs", days[2], tmp_path / "seq", progress=False)
    report = append_day(remote_logs, days[2], remote, progress=False)  # the Ray workers read and write S3
    assert report.days == [days[2]] and report.out == remote
    here, there = read_manifest(tmp_path / "seq"), read_manifest(remote)
    for name in ("users", "interactions", "num_items", "days", "generation"):
        assert there[name] == here[name], name
    assert read_sequences(remote).table.equals(read_sequences(tmp_path / "seq").table)
    assert read_vocabulary(read_sequences(remote).vocab).table.equals(
        read_vocabulary(read_sequences(tmp_path / "seq").vocab).table
    )
    # the commit published exactly what it names: this generation's shards, vocabulary and quarantine
    quarantined = sorted(q for d in there["days"].values() for q in d["report"]["quarantine_files"])
    assert quarantined and quarantined == sorted(
        q for d in here["days"].values() for q in d["report"]["quarantine_files"]
    )
    named = sorted([s["file"] for s in there["shards"]] + [there["vocab"]["file"], "manifest.json"])
    assert sorted(storage.walk(remote)) == sorted(named + quarantined)

    again = append_day(remote_logs, days[2], remote, progress=False)
    assert again.days == [] and again.skipped_days == [days[2]]


def test_a_manifest_commit_over_a_version_it_did_not_read_is_refused(root_uri: str) -> None:
    manifest = {"format": FORMAT, "generation": 1}
    _write_manifest(root_uri, manifest, base=None)
    _, version = _read_manifest(root_uri)
    _write_manifest(root_uri, dict(manifest, generation=2), base=version)  # the writer that read it
    for stale in (None, version):  # a second writer that read no manifest, or the one before
        with pytest.raises(storage.CommitConflict, match="another writer committed first"):
            _write_manifest(root_uri, dict(manifest, generation=3), base=stale)
    assert read_manifest(root_uri)["generation"] == 2
