"""Checkpoints with torch.distributed.checkpoint (DCP): one checkpoint holds everything that moves.

`root` is a URI (storage/uri.py): a plain path (the default, a folder every rank can reach: a shared
filesystem on several nodes) or an object-store prefix (`s3://bucket/runs/x/checkpoints`). Each save is
a generation of a storage.CommitRoot, published by a pointer written last (docs/STORAGE.md):
    gen-<time>-<id>/            one save: .metadata + one .distcp file per rank (DCP through its fsspec
                                writer), train.json (run config, world size, the trainer state: loop
                                position, best metric, history, data stream position) and the `files`
    step-000120                 pointer: the training checkpoint of step 120
    latest                      pointer: the newest training checkpoint (what --resume loads)
    best                        pointer: model only, the best validation weights so far
    final                       pointer: the model the run reports (selected weights) + train.json with
                                the report
A save writes its whole generation (all ranks: DCP; rank 0: train.json and the files), then rank 0
commits the pointers (`step-N`, then `latest`). A job killed at any point before that leaves the pointers
naming the previous generations, on S3 exactly as on disk; the unnamed generation it left is never loaded
and `collect` removes it later. Replacing `best` / `final` deletes the generation it named; only the
newest `keep` step checkpoints keep their pointer and generation.

Model weights are TorchRec ShardedTensors (the item table) and FSDP2 DTensors (the dense part); DCP
stores them with their global shapes, so a checkpoint loads into any world size or sharding type.

Loading runs no code from the checkpoint (infra/README.md, "Trust model"): stock DCP unpickles `.metadata`
with `pickle.load` and every non-tensor entry with `torch.load(weights_only=False)`. Every load here goes
through `load_state` instead: `.metadata` is read through the storage layer by an unpickler that resolves
only DCP's own metadata classes (anything else is refused before it is constructed), its storage entries
must name `.distcp` files directly in the checkpoint's own folder or prefix, and non-tensor entries are read
with `torch.load(weights_only=True)` (plain data only). The trainer's state is JSON in train.json; a pointer
may name only a `gen-<time>-<id>` generation of its own root.

Roots written before pointers (`latest` a text file naming a `step-N` folder beside it; `best` / `final`
symbolic links onto `best.<id>` / `final.<id>` folders) still load, and a run resumed on one goes on in
this layout: the first commit replaces the text file or link, and the old folders are pruned or removed
the same way.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
import uuid
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

import storage
from pipeline.train.distributed import broadcast_object
from storage import CommitRoot, ConfinementError, Pointer, StorageError, display
from storage import dcp as storage_dcp
from storage.errors import NOT_FOUND
from storage.fs import fsspec_target

LATEST = "latest"
FINAL = "final"
BEST = "best"
TRAIN_JSON = "train.json"
_STEP = re.compile(r"^step-([0-9]+)$")  # ASCII digits only (\d also matches other scripts' digits)
MAX_METADATA_BYTES = 256 * 1024 * 1024  # DCP `.metadata`: a few KB per tensor and shard, read into memory
MAX_POINTER_BYTES = 64 * 1024  # `latest` / `best` / `final`: a step name or a pointer object


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: str | os.PathLike[str]) -> bool:
    """A DCP checkpoint folder or prefix whose `.metadata` (DCP's last write) is there."""
    return storage.is_file(storage.join(os.fspath(path), ".metadata", field="checkpoint"))


# ---------------------------------------------------------------------------------------------------
# loading that runs no code


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something that is not plain checkpoint data (it is refused, never executed)."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint's shards cannot be read (truncated, corrupted)."""


# What DCP's writers pickle into .metadata (torch 2.13): its metadata dataclasses, the storage index,
# torch.Size / dtypes / layouts, and the checkpoint id (a path from FileSystemWriter, a string from
# FsspecWriter). Nothing here runs code when built.
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


def read_dcp_metadata(path: str | os.PathLike[str]) -> Metadata:
    """A checkpoint's `.metadata`, read through the storage layer without running code and checked: every
    storage entry is a `.distcp` file directly in the checkpoint's folder or prefix."""
    uri = storage.join(os.fspath(path), ".metadata", field="checkpoint")
    source = display(uri)
    try:
        data = storage.read_bytes(uri, limit=MAX_METADATA_BYTES)
    except StorageError as e:
        if e.cause == NOT_FOUND:
            raise FileNotFoundError(f"{source}: no DCP metadata (not a complete checkpoint)") from None
        raise
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise UnsafeCheckpointError(f"{source}: not a DCP metadata file ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source}: holds a {type(metadata).__name__}, not DCP Metadata")
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel.endswith(".distcp") or "/" in rel or "\\" in rel or rel.startswith("."):
            raise UnsafeCheckpointError(
                f"{source}: storage entry {rel!r} is not a .distcp file in the folder"
            )
    return metadata


class _SafeReader(FsspecReader):
    """DCP's fsspec reader (any URI the storage layer opens) with `.metadata` read by read_dcp_metadata."""

    def __init__(self, uri: str) -> None:
        url, options = fsspec_target(uri)
        super().__init__(url, **options)
        self.uri = uri

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(self.uri)
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


def load_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """`dcp.load(state, path)` that runs no code from the checkpoint (module docstring): a refused
    checkpoint raises UnsafeCheckpointError on every rank, with one line naming the file and entry."""
    uri = os.fspath(path)
    read_dcp_metadata(uri)  # every rank: a refused .metadata fails here, before any collective
    try:
        dcp.load(state, storage_reader=_SafeReader(uri), planner=_SafePlanner(display(uri)))
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]
        for exc in failures:
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(exc)) from None
        # a shard that cannot be read (truncated, corrupted): DCP's message embeds every rank's traceback
        reason = " ".join(str(failures[0]).split()) if failures else str(e)
        raise UnreadableCheckpointError(f"{display(uri)}: cannot read the checkpoint ({reason})") from e


# ---------------------------------------------------------------------------------------------------
# writing: generations and pointers


class Checkpointer:
    """Checkpoints under a root URI (module docstring). `files`: name -> source file (a URI) copied into
    every checkpoint before its commit (e.g. the item vocabulary that maps the table's rows to raw ids, so
    a checkpoint is self-contained). `keep`: step checkpoints kept (the newest; 0 keeps all)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        files: dict[str, str | os.PathLike[str]] | None = None,
        keep: int = 0,
    ) -> None:
        self.root = os.fspath(root)
        self.commits = CommitRoot(self.root)
        self.files = {name: os.fspath(src) for name, src in (files or {}).items()}
        self.keep = keep

    def _child(self, name: str) -> str:
        return storage.join(self.root, name, field="checkpoint name")

    def _write(self, state: dict[str, Any], meta: dict[str, Any] | None) -> str:
        """All ranks: DCP into a fresh generation; then rank 0 adds train.json and the files. Returns the
        generation's URI (nothing names it yet)."""
        gen = str(broadcast_object(self.commits.new_generation() if _rank() == 0 else ""))
        dcp.save(state, storage_writer=storage_dcp.writer(gen))
        _barrier()
        if _rank() == 0:
            data = json.dumps(meta or {}, indent=1, default=str).encode()
            storage.write_bytes(storage.join(gen, TRAIN_JSON), data)
            for name, src in self.files.items():
                storage.copy_file(src, storage.join(gen, name, field="checkpoint file"))
        return gen

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """A training checkpoint: its generation, then the `step-N` pointer, then `latest` (the commit).
        Older ones beyond `keep` are removed after that. Returns the generation's URI."""
        gen = self._write(state, meta)
        if _rank() == 0:
            name = _step_name(step)
            legacy_latest = self._legacy_latest() is not None
            if not storage.is_file(self._child(name)) and storage.exists(self._child(name)):
                # a step-N folder of the layout before pointers, never named by `latest` once this commits
                storage.delete(self._child(name), recursive=True)
            # while `latest` is a text file (layout before pointers), collection (which reads every
            # pointer) waits: the commit below replaces it as it is
            self.commits.commit(name, gen, meta={"step": step}, collect=not legacy_latest)
            self.commits.commit(LATEST, gen, meta={"step": step}, collect=not legacy_latest)
            self._prune()
            self._collect()
        _barrier()
        return gen

    def _steps(self) -> list[tuple[int, str, bool]]:
        """(step, name, is a pointer) of every step checkpoint in the root, oldest first; `is a pointer`
        False: a step-N folder of the layout before pointers."""
        found = []
        for name in storage.listdir(self.root):
            if m := _STEP.match(name):
                found.append((int(m.group(1)), name, storage.is_file(self._child(name))))
        return sorted(found)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for _, name, is_pointer in self._steps()[: -self.keep]:
            if is_pointer:
                self.commits.retire(name)  # its generation goes unless `latest` (or another) names it
            else:
                storage.delete(self._child(name), recursive=True)

    def _collect(self) -> None:
        """Generations left by killed writers (older than the protocol's grace period)."""
        try:
            self.commits.collect()
        except StorageError as e:
            warnings.warn(f"{e}: generations left by killed writers were not collected", stacklevel=2)

    def save_named(self, name: str, state: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """`best` or `final`: a new generation, then the pointer `name` (readers see the old model or the
        new one, never none); the generation it named before is deleted. Returns the new generation."""
        gen = self._write(state, meta)
        if _rank() == 0:
            self._retire_legacy_folder(name)
            self.commits.commit(name, gen)
            self._remove_legacy_named(name)
            self._collect()
        _barrier()
        return gen

    def _read(self, name: str) -> Pointer | None:
        """The pointer `name`; one that names anything but a generation of this root is refused."""
        try:
            return self.commits.read(name)
        except ConfinementError as e:
            raise UnsafeCheckpointError(str(e)) from None
        except StorageError as e:
            if e.cause.startswith("not a pointer object"):
                raise UnsafeCheckpointError(str(e)) from None
            raise

    def latest(self) -> str | None:
        """The newest complete training checkpoint: the one `latest` names, else the highest complete
        step checkpoint (an unnamed generation is never a candidate)."""
        found = self._latest()
        return found[1] if found else None

    def _latest(self) -> tuple[str, str] | None:
        """(step name, URI) of what `latest` returns."""
        legacy = self._legacy_latest()
        if legacy is not None:
            if is_complete(self._child(legacy)):
                return legacy, self._child(legacy)
        elif (pointer := self._read(LATEST)) is not None and is_complete(pointer.uri):
            step = pointer.meta.get("step")
            return (_step_name(step) if isinstance(step, int) else pointer.generation), pointer.uri
        for _, name, is_pointer in reversed(self._steps()):
            step_pointer = self._read(name) if is_pointer else None
            uri = step_pointer.uri if step_pointer is not None else self._child(name)
            if is_complete(uri):
                return name, uri
        return None

    def named(self, name: str) -> str | None:
        """The complete checkpoint the pointer `name` (best, final, step-N) names, or None."""
        pointer = self._read(name)
        if pointer is not None:
            return pointer.uri if is_complete(pointer.uri) else None
        try:  # a link onto `name.<id>/` or a plain folder (layouts before pointers)
            legacy = self._child(name)
        except ConfinementError as e:  # a link that leads out of the root
            raise UnsafeCheckpointError(str(e)) from None
        return legacy if is_complete(legacy) else None

    def load(self, state: dict[str, Any], path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Load into `state` in place (DCP reshards to this world size); returns its train.json."""
        uri = os.fspath(path) if path is not None else self.latest()
        if uri is None:
            raise FileNotFoundError(f"no complete checkpoint under {display(self.root)}")
        load_state(state, uri)
        return read_meta(uri)

    # -- the layout before pointers (read-compat; local disk) ------------------------------------------

    def _legacy_latest(self) -> str | None:
        """The step-N name a text `latest` holds (the layout before pointers), or None when `latest` is a
        pointer object or absent. A text `latest` may name only a step-N checkpoint beside it."""
        uri = self._child(LATEST)
        if not storage.is_file(uri):
            return None
        data = storage.read_bytes(uri, limit=MAX_POINTER_BYTES)  # a name, or a small pointer object
        if data.lstrip().startswith(b"{"):
            return None
        name = data.decode(errors="replace").strip()
        if (
            not _STEP.match(name) or len(name) > 64
        ):  # a plain step-N name beside `latest`: no paths, absolute or relative
            raise UnsafeCheckpointError(
                f"{display(uri)}: names {name[:200]!r}; `latest` may only name a step-N checkpoint in "
                "its root"
            )
        return name

    def _retire_legacy_folder(self, name: str) -> None:
        """A plain `best` / `final` folder (before links): moved aside to `name.<id>` so the pointer can
        take its name (links are replaced by the pointer's own atomic write)."""
        uri = self._child(name)
        if not storage.is_local(uri):
            return
        path = storage.parse(uri).path
        if os.path.isdir(path) and not os.path.islink(path):
            os.rename(path, storage.parse(self._child(f"{name}.{uuid.uuid4().hex[:8]}")).path)

    def _remove_legacy_named(self, name: str) -> None:
        """The `name.<id>` folders the link used to name, and what a write of that layout cut off left."""
        legacy = re.compile(rf"^{re.escape(name)}\.([0-9a-f]{{8}}|tmp|link\.tmp)$")
        for entry in storage.listdir(self.root):
            if legacy.match(entry):
                storage.delete(self._child(entry), recursive=True)


# a train.json holds a config and the trainer's record (its history: a few hundred bytes an epoch)
MAX_TRAIN_JSON_BYTES = 16 * 1024 * 1024


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's train.json ({} when it has none); one over MAX_TRAIN_JSON_BYTES is refused unread."""
    uri = storage.join(os.fspath(path), TRAIN_JSON, field="checkpoint")
    if not storage.is_file(uri):
        return {}
    return json.loads(storage.read_bytes(uri, limit=MAX_TRAIN_JSON_BYTES))


def resolve_checkpoint(path: str | os.PathLike[str]) -> str:
    """A checkpoint folder; a pointer (`<root>/final`, `<root>/step-000120`): the checkpoint it names; or a
    root: its `final` model when the run finished, else its latest. Returns a URI."""
    uri = os.fspath(path)
    if is_complete(uri):
        return uri
    if storage.is_file(uri):  # a pointer object
        found = Checkpointer(storage.parent(uri)).named(storage.name_of(uri))
        if found is None:
            raise FileNotFoundError(f"{display(uri)}: the checkpoint this pointer names is not complete")
        return found
    ckpt = Checkpointer(uri)
    found = ckpt.named(FINAL) or ckpt.latest()
    if found is None:
        raise FileNotFoundError(
            f"{display(uri)} is neither a checkpoint nor a folder with a complete checkpoint"
        )
    return found


def _json_ready(state: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON types (numpy scalars in metrics become floats), so what train.json holds reads back
    equal."""
    return json.loads(json.dumps(state, default=float))


class RunCheckpoints:
    """A training run's checkpoints under a root URI; implements the Trainer's `Checkpoints` protocol
    (every rank calls every method).

    A training checkpoint holds {"model": dmp.state_dict() (ShardedTensor table + DTensor dense), "optim":
    the CombinedOptimizer's state (fused table state + AdamW)} in DCP, and the trainer's state (step,
    epoch, batch in the epoch, best metric, history, and the data stream's position with the plan it
    belongs to) as JSON in train.json, which every rank reads back as text. Randomness needs no saved
    state: it is a function of (seed, step, rank) (pipeline/train/trainer.py), and the seed is in the config.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        dmp: Any,
        optimizer: Any,
        init_optimizer_state: Any,
        meta: dict[str, Any] | None = None,
        files: dict[str, str | os.PathLike[str]] | None = None,
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

    def save(self, step: int, trainer_state: dict[str, Any]) -> str:
        """A training checkpoint at `step`; `latest` names it once it is complete."""
        return self.store.save(step, self._state(), self._meta(trainer_state))

    def resume(self) -> tuple[str, dict[str, Any]] | None:
        """Load the latest complete training checkpoint, if any, into model and optimizer; returns where
        it came from (`<root>/step-N`, a name resolve_checkpoint takes) and the trainer state it holds."""
        found = self.store._latest()
        if found is None:
            return None
        name, uri = found
        self.init_optimizer_state()
        state = self._state()
        load_state(state, uri)
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        return self.store._child(name), read_meta(uri)["trainer"]

    def save_best(self) -> None:
        self.store.save_named(BEST, {"model": self.dmp.state_dict()})

    def load_best(self) -> None:
        uri = self.store.named(BEST)
        if uri is None:
            raise FileNotFoundError(f"no complete '{BEST}' checkpoint under {display(self.store.root)}")
        state = {"model": self.dmp.state_dict()}
        load_state(state, uri)
        self.dmp.load_state_dict(state["model"])

    def save_final(self, trainer_state: dict[str, Any], report: dict[str, Any]) -> str:
        """The model the run reports (the selected weights), for `fuxi eval`, warm starts and the registry.
        Returns its generation's URI."""
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
