"""Checkpoints with torch.distributed.checkpoint (DCP): one checkpoint holds everything that moves.

Layout under `root` (a folder every rank can reach: a shared filesystem on several nodes):
    step-000120/            a complete training checkpoint: .metadata + one .distcp file per rank
    step-000120/train.json  run config, world size and the trainer state (loop position, best metric, history,
                            data stream position), written by rank 0 before the commit
    latest                  a text file naming the newest complete training checkpoint (what --resume loads)
    best -> best.<id>/      model only: the best validation weights so far (validated protocol)
    final -> final.<id>/    the model the run reports (selected weights) + train.json with the report
Every write is atomic: DCP writes into `<name>.tmp`; once all ranks have finished, rank 0 renames it, and
only then replaces `latest` (itself via rename). A job killed mid-write leaves a `.tmp` folder that is
never loaded; `latest` keeps naming the previous complete checkpoint. `best` and `final` are symbolic
links swapped in one rename onto a new `<name>.<id>` folder, so they always name a complete model (the
old folder is removed after the swap). Only the newest `keep` step checkpoints stay on disk.

Model weights are TorchRec ShardedTensors (the item table) and FSDP2 DTensors (the dense part); DCP
stores them with their global shapes, so a checkpoint loads into any world size or sharding type.

Loading runs no code from the checkpoint (infra/README.md, "Trust model"): stock DCP unpickles `.metadata`
with `pickle.load` and every non-tensor entry with `torch.load(weights_only=False)`. Every load here goes
through `load_state` instead: `.metadata` is read by an unpickler that resolves only DCP's own metadata
classes (anything else is refused before it is constructed), its storage entries must name `.distcp` files
inside the checkpoint folder, and non-tensor entries are read with `torch.load(weights_only=True)` (plain
data only). The trainer's state is JSON in train.json; `latest` may name only a `step-N` folder beside it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from pipeline.train.distributed import broadcast_object

LATEST = "latest"
FINAL = "final"
BEST = "best"
_STEP = re.compile(r"^step-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (path / ".metadata").exists()


# ---------------------------------------------------------------------------------------------------
# loading that runs no code


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something that is not plain checkpoint data (it is refused, never executed)."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint's shards cannot be read (truncated, corrupted)."""


# What DCP's FileSystemWriter pickles into .metadata (torch 2.13): its metadata dataclasses, the storage
# index, torch.Size / dtypes / layouts, and the checkpoint id as a path. Nothing here runs code when built.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load {module}.{name}: DCP metadata may name only checkpoint "
            "metadata classes (this file was not written by torch.distributed.checkpoint)"
        )


def read_dcp_metadata(path: str | Path) -> Metadata:
    """A checkpoint's `.metadata`, read without running code and checked: every storage entry is a
    `.distcp` file inside the checkpoint folder."""
    source = Path(path) / ".metadata"
    try:
        with open(source, "rb") as f:
            metadata = _MetadataUnpickler(f, str(source)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise UnsafeCheckpointError(f"{source}: not a DCP metadata file ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source}: holds a {type(metadata).__name__}, not DCP Metadata")
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel.endswith(".distcp") or os.path.basename(rel) != rel or rel.startswith("."):
            raise UnsafeCheckpointError(
                f"{source}: storage entry {rel!r} is not a .distcp file in the folder"
            )
    return metadata


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(str(self.path))
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters, anything not a tensor) as plain data only."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            detail = f"it names {found.group(1)}" if found else str(e).strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f"{self.source}: entry {fqn!r} is not plain data; refusing to unpickle it ({detail})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load_state(state: dict[str, Any], path: str | Path) -> None:
    """`dcp.load(state, path)` that runs no code from the checkpoint (module docstring): a refused
    checkpoint raises UnsafeCheckpointError on every rank, with one line naming the file and entry."""
    path = str(path)
    read_dcp_metadata(path)  # every rank: a refused .metadata fails here, before any collective
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner(path))
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]
        for exc in failures:
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(exc)) from None
        # a shard that cannot be read (truncated, corrupted): DCP's message embeds every rank's traceback
        reason = " ".join(str(failures[0]).split()) if failures else str(e)
        raise UnreadableCheckpointError(f"{path}: cannot read the checkpoint ({reason})") from e


class Checkpointer:
    """`files`: name -> source file copied into every checkpoint folder before its commit (e.g. the item
    vocabulary that maps the table's rows to raw ids, so a checkpoint is self-contained). `keep`: step
    checkpoints kept (the newest; 0 keeps all)."""

    def __init__(self, root: str | Path, files: dict[str, Path] | None = None, keep: int = 0) -> None:
        self.root = Path(root)
        self.files = {name: Path(src) for name, src in (files or {}).items()}
        self.keep = keep

    def _write(self, name: str, state: dict[str, Any], meta: dict[str, Any] | None, folder: str = "") -> Path:
        """All ranks: DCP into name.tmp, then rank 0 writes train.json and renames it to `folder` (default
        `name`): the commit."""
        final = self.root / (folder or name)
        tmp = self.root / f"{name}.tmp"
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # a write cut off earlier
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if _rank() == 0:
            (tmp / "train.json").write_text(json.dumps(meta or {}, indent=1, default=str))
            for name, src in self.files.items():
                shutil.copyfile(src, tmp / name)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        return final

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        """A training checkpoint; `latest` names it once it is complete. Older ones beyond `keep` are removed
        after that."""
        final = self._write(f"step-{step:06d}", state, meta)
        if _rank() == 0:
            pointer = self.root / (LATEST + ".tmp")
            pointer.write_text(final.name)
            pointer.replace(self.root / LATEST)
            self._prune(final)
        _barrier()
        return final

    def _prune(self, newest: Path) -> None:
        if self.keep <= 0:
            return
        steps = sorted(
            (int(m.group(1)), p)
            for p in self.root.glob("step-*")
            if (m := _STEP.match(p.name)) and p.is_dir()
        )
        for _, path in steps[: -self.keep]:
            if path != newest:
                shutil.rmtree(path, ignore_errors=True)

    def save_named(self, name: str, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        """`best` or `final`: a new `<name>.<id>` folder, then the `name` link swapped onto it in one rename
        (readers see the old model or the new one, never none); never named by `latest`."""
        folder = f"{name}.{uuid.uuid4().hex[:8]}" if _rank() == 0 else ""
        folder = str(broadcast_object(folder))
        self._write(name, state, meta, folder)
        link = self.root / name
        if _rank() == 0:
            tmp_link = self.root / f"{name}.link.tmp"
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(folder)
            if link.exists() and not link.is_symlink():  # a plain folder from an older layout
                link.rename(self.root / f"{name}.{uuid.uuid4().hex[:8]}")
            tmp_link.replace(link)
            # the folder the link named before, and any left by a job killed between swap and cleanup
            for stale in self.root.glob(f"{name}.*"):
                if stale.name not in (folder, f"{name}.tmp") and stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        return link

    def latest(self) -> Path | None:
        """The newest complete training checkpoint: the one `latest` names, else the highest complete
        step-* folder (a `.tmp` folder is never a candidate)."""
        pointer = self.root / LATEST
        if pointer.exists():
            name = pointer.read_text().strip()
            if not _STEP.match(name):  # a plain step-N name beside `latest`: no paths, absolute or relative
                raise UnsafeCheckpointError(
                    f"{pointer}: names {name[:200]!r}; `latest` may only name a step-N checkpoint in its root"
                )
            path = self.root / name
            if is_complete(path):
                return path
        steps = sorted(
            (int(m.group(1)), p)
            for p in self.root.glob("step-*")
            if (m := _STEP.match(p.name)) and is_complete(p)
        )
        return steps[-1][1] if steps else None

    def named(self, name: str) -> Path | None:
        path = self.root / name
        return path if is_complete(path) else None

    def load(self, state: dict[str, Any], path: str | Path | None = None) -> dict[str, Any]:
        """Load into `state` in place (DCP reshards to this world size); returns its train.json."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        load_state(state, path)
        return read_meta(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / "train.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder; or a root: its `final` model when the run finished, else its latest."""
    path = Path(path)
    if is_complete(path):
        return path
    ckpt = Checkpointer(path)
    found = ckpt.named(FINAL) or ckpt.latest()
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a folder with a complete checkpoint")
    return found


def _json_ready(state: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON types (numpy scalars in metrics become floats), so what train.json holds reads back
    equal."""
    return json.loads(json.dumps(state, default=float))


class RunCheckpoints:
    """A training run's checkpoints on disk; implements the Trainer's `Checkpoints` protocol (every rank
    calls every method).

    A training checkpoint holds {"model": dmp.state_dict() (ShardedTensor table + DTensor dense), "optim":
    the CombinedOptimizer's state (fused table state + AdamW)} in DCP, and the trainer's state (step,
    epoch, batch in the epoch, best metric, history, and the data stream's position with the plan it
    belongs to) as JSON in train.json, which every rank reads back as text. Randomness needs no saved
    state: it is a function of (seed, step, rank) (pipeline/train/trainer.py), and the seed is in the config.
    """

    def __init__(
        self,
        root: Path,
        dmp: Any,
        optimizer: Any,
        init_optimizer_state: Any,
        meta: dict[str, Any] | None = None,
        files: dict[str, Path] | None = None,
        keep: int = 0,
    ) -> None:
        self.store = Checkpointer(root, files, keep)
        self.dmp = dmp
        self.optimizer = optimizer
        self.init_optimizer_state = init_optimizer_state
        self.meta = dict(meta or {})

    def _state(self) -> dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    def _meta(self, trainer_state: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {**self.meta, "trainer": _json_ready(trainer_state), **extra}

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """A training checkpoint at `step`; `latest` names it once it is complete."""
        return self.store.save(step, self._state(), self._meta(trainer_state))

    def resume(self) -> tuple[str, dict[str, Any]] | None:
        """Load the latest complete training checkpoint, if any, into model and optimizer; returns its
        path and the trainer state it holds."""
        path = self.store.latest()
        if path is None:
            return None
        self.init_optimizer_state()
        state = self._state()
        load_state(state, path)
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        return str(path), read_meta(path)["trainer"]

    def save_best(self) -> None:
        self.store.save_named(BEST, {"model": self.dmp.state_dict()})

    def load_best(self) -> None:
        path = self.store.named(BEST)
        if path is None:
            raise FileNotFoundError(f"no complete '{BEST}' checkpoint under {self.store.root}")
        state = {"model": self.dmp.state_dict()}
        load_state(state, path)
        self.dmp.load_state_dict(state["model"])

    def save_final(self, trainer_state: dict[str, Any], report: dict[str, Any]) -> Path:
        """The model the run reports (the selected weights), for `fuxi eval`, warm starts and the registry."""
        return self.store.save_named(
            FINAL, {"model": self.dmp.state_dict()}, self._meta(trainer_state, report=report)
        )


class MemoryCheckpoints:
    """The Trainer's `Checkpoints` protocol in memory (one process): tests, benchmarks, and the default
    that keeps the best weights of a validated run. Copies are taken, so later steps do not change them."""

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.model = model
        self.optimizer = optimizer
        self.saved: dict[
            int, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
        ] = {}  # step -> (model, optim, trainer)
        self.best: dict[str, Any] | None = None

    def save(self, step: int, trainer_state: dict[str, Any]) -> int:
        self.saved[step] = copy.deepcopy(
            (self.model.state_dict(), self.optimizer.state_dict(), trainer_state)
        )
        return step

    def resume(self) -> tuple[str, dict[str, Any]] | None:
        if not self.saved:
            return None
        step = max(self.saved)
        model, optim, trainer_state = copy.deepcopy(self.saved[step])
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(optim)
        return f"memory:step-{step:06d}", trainer_state

    def save_best(self) -> None:
        self.best = copy.deepcopy(self.model.state_dict())

    def load_best(self) -> None:
        if self.best is not None:
            self.model.load_state_dict(self.best)
