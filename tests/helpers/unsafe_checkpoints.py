"""Crafted checkpoints that would run code if unpickled (tests of pipeline/train/checkpoint.py safe loading).

Each carries a pickle whose reduction calls `open(marker, "w")`: if anything unpickles it, the marker file
appears. Checkpoints are crafted on local disk with stock DCP and copied to any URI through the storage
layer, so the same crafted files are tried on a folder and on an object store.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import storage
from pipeline.train.checkpoint import load_state, read_dcp_metadata


class Payload:
    """Unpickling this creates `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: str | os.PathLike[str]) -> None:
        self.marker = os.fspath(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def genuine_state(path: str) -> dict[str, Any]:
    """Every entry of a genuine checkpoint, loaded through the safe path (tensors and plain data)."""
    metadata = read_dcp_metadata(path)
    state: dict[str, Any] = {
        k: torch.zeros(tuple(v.size), dtype=v.properties.dtype) if isinstance(v, TensorStorageMetadata) else 0
        for k, v in metadata.state_dict_metadata.items()
    }
    load_state(state, path)
    return state


def crafted_entry(genuine: str, dest: str, marker: str | os.PathLike[str], victim: str) -> str:
    """A copy of the checkpoint `genuine` at `dest` (URIs) whose first entry with `victim` in its key is
    stored as a pickled Payload; returns that entry's key. train.json is copied along."""
    state = genuine_state(genuine)
    key = next(k for k in state if victim in k)
    state[key] = Payload(marker)
    with tempfile.TemporaryDirectory() as tmp:
        dcp.save(state, checkpoint_id=tmp, no_dist=True)
        storage.copy_tree(tmp, dest)
    train_json = storage.join(genuine, "train.json")
    if storage.is_file(train_json):
        storage.copy_file(train_json, storage.join(dest, "train.json"))
    return key


def crafted_metadata(genuine: str, dest: str, marker: str | os.PathLike[str]) -> None:
    """A copy of `genuine` at `dest` whose `.metadata` is a pickled Payload."""
    storage.copy_tree(genuine, dest)
    storage.write_bytes(storage.join(dest, ".metadata"), pickle.dumps(Payload(marker)))


def metadata_escaping(genuine: str, dest: str, relative_path: str) -> None:
    """A copy of `genuine` at `dest` whose `.metadata` (genuine DCP classes only) names `relative_path` as
    the file of every entry."""
    metadata = read_dcp_metadata(genuine)
    for info in metadata.storage_data.values():
        info.relative_path = relative_path
    storage.copy_tree(genuine, dest)
    storage.write_bytes(storage.join(dest, ".metadata"), pickle.dumps(metadata))
