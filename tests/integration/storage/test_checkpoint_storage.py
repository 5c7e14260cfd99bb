"""Checkpoints through the storage layer (pipeline/train/checkpoint.py), on local disk and on a real S3
endpoint (SeaweedFS, conftest.py) with one code path: a save/resume round trip, a save killed by SIGKILL
before its pointer, safe loading of crafted checkpoints and pointers, the layout before pointers, and a
tiny training run writing to and resuming from s3://.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import storage
from pipeline.train.checkpoint import (
    Checkpointer,
    UnsafeCheckpointError,
    load_state,
    read_dcp_metadata,
    read_meta,
    resolve_checkpoint,
)
from storage import CommitRoot
from tests.helpers.unsafe_checkpoints import crafted_entry, crafted_metadata, metadata_escaping

REPO = Path(__file__).resolve().parents[3]


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and an AdamW that has taken two steps (tensor state and plain-data hyperparameters)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2 * (seed + 1))
    for _ in range(2):
        model(torch.arange(10)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def test_save_and_resume_round_trip(root_uri: str) -> None:
    model, optimizer = model_and_optimizer(0)
    store = Checkpointer(root_uri, keep=2)
    gens = [store.save(step, training_state(model, optimizer), {"step": step}) for step in (1, 2, 3)]
    assert store.latest() == gens[2] and storage.name_of(gens[2]).startswith("gen-")
    assert gens[2].startswith(root_uri)

    # a fresh model and optimizer (other values, other lr) take the checkpoint's state whole
    fresh_model, fresh_optimizer = model_and_optimizer(1)
    state = training_state(fresh_model, fresh_optimizer)
    assert store.load(state) == {"step": 3}
    fresh_model.load_state_dict(state["model"])
    fresh_optimizer.load_state_dict(state["optim"])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value), key
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]  # lr etc.: plain data, read weights_only
    for index, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(loaded["state"][index][name], value), (index, name)

    # pointers and generations: the newest two step checkpoints are kept, the rest went with their pointer
    names = storage.listdir(root_uri)
    assert [n for n in names if n.startswith("step-")] == ["step-000002", "step-000003"]
    assert CommitRoot(root_uri).generations() == sorted(storage.name_of(g) for g in gens[1:])
    assert not storage.exists(gens[0])

    # `best` replaced: the generation it named is deleted; a pointer URI resolves like a folder
    first = store.save_named("best", {"model": model.state_dict()})
    second = store.save_named("best", {"model": fresh_model.state_dict()})
    assert not storage.exists(first) and store.named("best") == second
    assert resolve_checkpoint(storage.join(root_uri, "best")) == second
    assert resolve_checkpoint(storage.join(root_uri, "step-000002")) == gens[1]
    assert resolve_checkpoint(root_uri) == gens[2]  # no `final` yet: the latest
    final = store.save_named("final", {"model": model.state_dict()}, {"report": {"ndcg": 0.5}})
    assert resolve_checkpoint(root_uri) == final and read_meta(final) == {"report": {"ndcg": 0.5}}


_KILLED_SAVE = r"""
import sys, time
import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from pipeline.train.checkpoint import Checkpointer

store = Checkpointer(sys.argv[1])
store.save(1, {"w": torch.arange(4.0), "big": torch.ones(1 << 20)}, meta={"step": 1})

def stalls(self, *args, **kwargs):  # every rank's .distcp file is written; .metadata and the pointers not
    print("distcp written", flush=True)
    time.sleep(300)

FsspecWriter.finish = stalls
store.save(2, {"w": torch.zeros(4), "big": torch.zeros(1 << 20)}, meta={"step": 2})
"""


def test_save_killed_before_its_pointer_leaves_the_previous_generation(root_uri: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, root_uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "distcp written", proc.stderr.read() if proc.stderr else ""
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    store = Checkpointer(root_uri)
    root = store.commits
    first = root.resolve("latest")
    assert first is not None and store.latest() == first == store.named("step-000001")
    assert store.named("step-000002") is None
    state = {"w": torch.zeros(4), "big": torch.zeros(1 << 20)}
    assert store.load(state) == {"step": 1}
    assert torch.equal(state["w"], torch.arange(4.0)) and torch.equal(state["big"], torch.ones(1 << 20))

    # what the killed save left: a generation with its data file and no .metadata, that nothing names
    (torn,) = [g for g in root.generations() if g != storage.name_of(first)]
    torn_uri = storage.join(root_uri, torn)
    assert any(n.endswith(".distcp") for n in storage.walk(torn_uri))
    assert not storage.exists(storage.join(torn_uri, ".metadata"))
    assert root.collect(grace_s=3600) == []  # a writer that may still be alive keeps its generation
    assert root.collect(grace_s=0) == [torn]

    # the retried save commits as usual
    second = store.save(2, {"w": torch.ones(4), "big": torch.zeros(1 << 20)}, meta={"step": 2})
    assert store.latest() == second != first


# ---------------------------------------------------------------------------------------------------
# safe loading: crafted checkpoints and pointers are refused in one line, on disk and on S3 alike


@pytest.fixture
def genuine(root_uri: str) -> str:
    """A genuine training checkpoint (model + optimizer) committed as `latest` under root_uri/genuine."""
    model, optimizer = model_and_optimizer(0)
    model.position_embedding = torch.nn.Embedding(5, 4)  # the entry the crafted checkpoints replace
    return Checkpointer(storage.join(root_uri, "genuine")).save(
        1, training_state(model, optimizer), {"config": {}}
    )


def committed(root: str, build: Any) -> str:
    """A generation of `root` built by build(uri), committed as `latest` (what resume and eval load)."""
    commits = CommitRoot(root)
    gen = commits.new_generation()
    build(gen)
    commits.commit("latest", gen, collect=False)
    return gen


def test_crafted_entry_is_refused(genuine: str, root_uri: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    root = storage.join(root_uri, "crafted")
    victim = ""

    def build(gen: str) -> None:
        nonlocal victim
        victim = crafted_entry(genuine, gen, marker, "position_embedding")

    gen = committed(root, build)
    assert victim == "model.position_embedding.weight"
    model, optimizer = model_and_optimizer(0)
    model.position_embedding = torch.nn.Embedding(5, 4)
    expect = (
        rf"^{re.escape(storage.display(gen))}: entry '{victim}' is not plain data.*names (builtins|io)\.open"
    )
    with pytest.raises(UnsafeCheckpointError, match=expect):
        Checkpointer(root).load(training_state(model, optimizer))
    with pytest.raises(UnsafeCheckpointError, match=expect):
        load_state(training_state(model, optimizer), resolve_checkpoint(root))
    assert not marker.exists()


def test_crafted_metadata_is_refused(genuine: str, root_uri: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    root = storage.join(root_uri, "crafted")
    gen = committed(root, lambda g: crafted_metadata(genuine, g, marker))
    assert Checkpointer(root).latest() == gen  # complete as far as files go
    expect = rf"^{re.escape(storage.display(gen))}/\.metadata: refusing to load (builtins|io)\.open"
    with pytest.raises(UnsafeCheckpointError, match=expect):
        Checkpointer(root).load({"w": torch.zeros(1)})
    with pytest.raises(UnsafeCheckpointError, match=expect):
        read_dcp_metadata(gen)
    assert not marker.exists()


@pytest.mark.parametrize("relative", ["../../secret.distcp", "../genuine/x.distcp", "sub/x.distcp"])
def test_metadata_naming_files_outside_its_prefix_is_refused(
    genuine: str, root_uri: str, relative: str
) -> None:
    root = storage.join(root_uri, "crafted")
    gen = committed(root, lambda g: metadata_escaping(genuine, g, relative))
    shown = re.escape(storage.display(gen))
    expect = (
        rf"^{shown}/\.metadata: storage entry '{re.escape(relative)}' is not a \.distcp file in the folder"
    )
    with pytest.raises(UnsafeCheckpointError, match=expect):
        Checkpointer(root).load({"w": torch.zeros(1)})


@pytest.mark.parametrize(
    "generation, why",
    [
        ("../x", "climbs out with '..'"),
        ("/etc", "is an absolute path"),
        ("s3://other-bucket/gen-20261207T115012Z-1a2b3c4d", "is an absolute path"),
        ("gen-20261207T115012Z-1a2b3c4d/../../x", "climbs out with '..'"),
        ("step-000001", "is not a generation of this root"),
        (["gen-20261207T115012Z-1a2b3c4d"], "is not a generation name"),
    ],
)
@pytest.mark.parametrize("pointer", ["latest", "final"])
def test_pointer_outside_its_root_is_refused(genuine: str, pointer: str, generation: Any, why: str) -> None:
    root = storage.parent(genuine)
    storage.write_bytes(storage.join(root, pointer), json.dumps({"generation": generation}).encode())
    store = Checkpointer(root)
    shown = re.escape(storage.display(storage.join(root, pointer)))
    expect = rf"^{shown}: field 'generation' = .*{re.escape(why)}"
    with pytest.raises(UnsafeCheckpointError, match=expect) as refused:
        store.latest() if pointer == "latest" else store.named(pointer)
    assert "\n" not in str(refused.value)
    with pytest.raises(UnsafeCheckpointError, match=expect):
        resolve_checkpoint(root)


def test_pointer_that_is_not_json_is_refused(genuine: str) -> None:
    root = storage.parent(genuine)
    storage.write_bytes(storage.join(root, "best"), pickle.dumps({"generation": "x"}))
    with pytest.raises(UnsafeCheckpointError, match=r"best: not a pointer object"):
        Checkpointer(root).named("best")


# ---------------------------------------------------------------------------------------------------
# the layout before pointers (local disk): `latest` a text file, best/final links onto <name>.<id>/


def old_layout(root: Path) -> None:
    """A checkpoint root as the checkpointer before pointers wrote it (FileSystemWriter folders)."""
    root.mkdir(parents=True)
    for step in (4, 8):
        dcp.save(
            {"w": torch.full((3,), float(step))}, checkpoint_id=str(root / f"step-{step:06d}"), no_dist=True
        )
        (root / f"step-{step:06d}" / "train.json").write_text(json.dumps({"trainer": {"step": step}}))
    (root / "latest").write_text("step-000008")
    for name, value in (("best", 5.0), ("final", 6.0)):
        folder = root / f"{name}.0123abcd"
        dcp.save({"w": torch.full((3,), value)}, checkpoint_id=str(folder), no_dist=True)
        (root / name).symlink_to(folder.name)
    (root / "step-000012.tmp").mkdir()  # a write cut off by the old code
    (root / "step-000012.tmp" / "__0_0.distcp").write_bytes(b"torn")


def test_old_layout_loads_and_a_resumed_run_goes_on_with_pointers(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    old_layout(root)
    store = Checkpointer(root, keep=2)
    assert store.latest() == str(root / "step-000008")
    state = {"w": torch.zeros(3)}
    assert store.load(state) == {"trainer": {"step": 8}} and torch.equal(state["w"], torch.full((3,), 8.0))
    assert store.named("best") == str(root / "best") and store.named("step-000004") == str(
        root / "step-000004"
    )
    assert resolve_checkpoint(root) == str(root / "final")
    store.load(state, store.named("best"))
    assert torch.equal(state["w"], torch.full((3,), 5.0))

    # a run resumed here: the first save replaces the text `latest`; old step folders count for `keep`
    gen = store.save(12, {"w": torch.full((3,), 12.0)}, {"trainer": {"step": 12}})
    assert store.latest() == gen and json.loads((root / "latest").read_text())["meta"] == {"step": 12}
    assert not (root / "step-000004").exists() and (root / "step-000008").is_dir()
    assert sorted(p.name for p in root.glob("step-*") if p.is_file()) == ["step-000012"]
    best = store.save_named("best", {"w": torch.full((3,), 9.0)})
    assert (root / "best").is_file() and not (root / "best.0123abcd").exists()
    assert store.named("best") == best and store.named("final") == str(root / "final")
    store.load(state, resolve_checkpoint(root / "best"))
    assert torch.equal(state["w"], torch.full((3,), 9.0))


@pytest.mark.parametrize("name", ["/etc", "../other/step-000004", "step-000004/../../x", "final"])
def test_old_text_latest_naming_anything_but_a_step_beside_it_is_refused(name: str, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    old_layout(root)
    (root / "latest").write_text(name)
    with pytest.raises(UnsafeCheckpointError, match=r"latest: names .*may only name a step-N checkpoint"):
        Checkpointer(root).latest()


def test_old_link_leading_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    old_layout(root)
    (root / "best").unlink()
    (root / "best").symlink_to(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"is a link that leads outside"):
        Checkpointer(root).named("best")


# ---------------------------------------------------------------------------------------------------
# a tiny training run with its run directory on S3


def fuxi_train(*args: str, report: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "train", "--preset", "tiny", "--report-json", str(report), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.slow
def test_tiny_training_run_checkpoints_to_s3_and_resumes(s3_env: Any, tmp_path: Path) -> None:
    run_dir = f"s3://{s3_env.bucket}/runs/tiny-{tmp_path.name}"
    common = [
        "--set",
        f"run_dir={run_dir}",
        "--set",
        "tracking.enabled=false",
        "--set",
        "checkpoint_every_epochs=1",
    ]
    first = fuxi_train(*common, "--set", "epochs=1", report=tmp_path / "first.json")
    ckpt_root = storage.join(run_dir, "checkpoints")
    store = Checkpointer(ckpt_root)
    step = first["steps"]
    assert first["run_dir"] == run_dir and first["checkpoint"] == store.named("final")
    assert store.latest() == store.named(f"step-{step:06d}")
    assert read_meta(store.latest())["trainer"]["step"] == step
    assert not (REPO / "s3:").exists()  # nothing went to a local folder named after the scheme

    second = fuxi_train(*common, "--set", "epochs=2", "--set", "resume=true", report=tmp_path / "second.json")
    assert second["resumed_from"] == storage.join(ckpt_root, f"step-{step:06d}")
    assert second["steps"] == 2 * step and [h["epoch"] for h in second["history"]] == [1, 2]
    assert store.latest() == store.named(f"step-{2 * step:06d}")
    assert second["checkpoint"] == store.named("final") != first["checkpoint"]
    assert not storage.exists(first["checkpoint"])  # the replaced `final` generation was deleted
