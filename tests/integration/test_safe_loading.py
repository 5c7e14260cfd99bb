"""Loading a checkpoint runs no code from it (pipeline/train/checkpoint.py, infra/README.md "Trust model").

Each crafted checkpoint carries a pickle whose reduction calls `open(marker, "w")`: if anything unpickles
it, the marker file appears. Stock `dcp.load` does (the first test shows the hazard is real); every path
the project loads through refuses it with one line naming the file and entry, and the marker never appears.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pipeline.train.checkpoint import (
    Checkpointer,
    UnsafeCheckpointError,
    load_state,
    read_dcp_metadata,
    resolve_checkpoint,
)


class Payload:
    """Unpickling this creates `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine training checkpoint (model + optimizer) of a one-epoch tiny run."""
    from pipeline.train.presets import tiny
    from pipeline.train.run import run

    cfg = tiny()
    cfg.epochs = 1
    cfg.tracking.enabled = False
    cfg.run_dir = str(tmp_path_factory.mktemp("run"))
    run(cfg)
    latest = Checkpointer(Path(cfg.run_dir) / "checkpoints").latest()
    assert latest is not None
    return Path(latest)


def crafted_entry(genuine: Path, dest: Path, marker: Path) -> str:
    """A copy of `genuine` whose position table is stored as a pickled Payload; returns the entry name."""
    metadata = read_dcp_metadata(genuine)
    state = {k: torch.zeros(tuple(v.size)) for k, v in metadata.state_dict_metadata.items()}
    load_state(state, genuine)
    victim = next(k for k in state if "position_embedding" in k)
    state[victim] = Payload(marker)
    dcp.save(state, checkpoint_id=str(dest), no_dist=True)
    shutil.copy(genuine / "train.json", dest / "train.json")
    return victim


def crafted_metadata(genuine: Path, dest: Path, marker: Path) -> None:
    shutil.copytree(genuine, dest)
    (dest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def test_stock_dcp_runs_the_payload_ours_refuses_it(trained: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    victim = crafted_entry(trained, tmp_path / "entry", marker)
    metadata = read_dcp_metadata(tmp_path / "entry")
    state = {k: torch.zeros(tuple(v.size)) for k, v in metadata.state_dict_metadata.items() if k != victim}
    state[victim] = torch.zeros(1)
    expect = rf"entry '{victim}' is not plain data.*names (builtins|io)\.open"
    with pytest.raises(UnsafeCheckpointError, match=expect):
        load_state(dict(state), tmp_path / "entry")
    assert not marker.exists()
    dcp.load(state, checkpoint_id=str(tmp_path / "entry"), no_dist=True)  # stock DCP unpickles it
    assert marker.exists()


@pytest.mark.parametrize("kind", ["metadata", "entry"])
def test_crafted_checkpoint_is_refused_by_eval_resume_and_warm_start(
    kind: str, trained: Path, tmp_path: Path
) -> None:
    from pipeline.train.presets import tiny
    from pipeline.train.run import run

    marker = tmp_path / "ran"
    crafted = tmp_path / "checkpoints" / "step-000004"
    crafted.parent.mkdir()
    if kind == "metadata":
        crafted_metadata(trained, crafted, marker)
        expect = r"\.metadata: refusing to load (builtins|io)\.open"
    else:
        crafted_entry(trained, crafted, marker)
        expect = r"entry 'model\..*position_embedding.weight' is not plain data"
    (crafted.parent / "latest").write_text(crafted.name)

    # fuxi eval: one line on stderr, non-zero exit, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "eval", "--checkpoint", str(crafted)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fuxi: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(crafted) in errors[0]
    assert __import__("re").search(expect, errors[0]), errors[0]

    # resume (train --resume on the run dir) and warm start (init_checkpoint) load through the same path
    cfg = tiny()
    cfg.tracking.enabled = False
    cfg.run_dir, cfg.resume = str(tmp_path), True
    with pytest.raises(UnsafeCheckpointError, match=expect):
        run(cfg)
    cfg = tiny()
    cfg.tracking.enabled = False
    cfg.run_dir, cfg.init_checkpoint, cfg.init_optimizer = str(tmp_path / "warm"), str(crafted), False
    with pytest.raises(UnsafeCheckpointError, match=expect):
        run(cfg)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["/etc", "../other/step-000004", "step-000004/../../x", "final"])
def test_latest_outside_its_root_is_refused(name: str, tmp_path: Path) -> None:
    store = Checkpointer(tmp_path / "root")
    store.save(4, {"w": torch.arange(3.0)})
    (tmp_path / "root" / "latest").write_text(name)
    with pytest.raises(UnsafeCheckpointError, match=r"latest: names .*may only name a step-N checkpoint"):
        store.latest()
    with pytest.raises(UnsafeCheckpointError):
        resolve_checkpoint(tmp_path / "root")


def test_metadata_naming_files_outside_the_folder_is_refused(trained: Path, tmp_path: Path) -> None:
    metadata = read_dcp_metadata(trained)
    for info in metadata.storage_data.values():
        info.relative_path = "../../secret.distcp"
    shutil.copytree(trained, tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match=r"storage entry '\.\./\.\./secret\.distcp' is not a"):
        read_dcp_metadata(tmp_path / "ckpt")


def test_truncated_shard_is_one_line_naming_the_folder(trained: Path, tmp_path: Path) -> None:
    """A shard cut short (a copy that stopped, a full disk): `fuxi eval` prints one line naming the folder
    and torch's reason, exit status 2; FUXI_DEBUG=1 adds the traceback before that line."""
    cut = tmp_path / "cut"
    shutil.copytree(trained, cut)
    (shard,) = cut.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(RuntimeError) as direct:  # the reason, as torch gives it reading the shard itself
        torch.load(shard, weights_only=True)
    reason = " ".join(str(direct.value).split())
    line = f"fuxi: error: {cut}: cannot read the checkpoint ({reason})"

    cmd = [sys.executable, "-m", "jobs.cli", "eval", "--checkpoint", str(cut)]
    env = {k: v for k, v in os.environ.items() if k != "FUXI_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [line])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "FUXI_DEBUG": "1"})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and lines[0] == "Traceback (most recent call last):" and lines[-1] == line
    assert any(f.startswith("pipeline.train.checkpoint.UnreadableCheckpointError: ") for f in lines), lines
