"""Checkpoints with torch.distributed.checkpoint (DCP): one checkpoint holds everything that moves.

Layout under `root`:
    step-000120/            a complete DCP checkpoint (.metadata + one .distcp file per rank)
    step-000120/train.json  the run config and trainer state, written by rank 0 before the commit
    latest                  a text file naming the newest complete checkpoint
Writes are atomic: DCP writes into `step-K.tmp`, which is renamed once every rank has finished, and only
then is `latest` replaced (itself via rename). A job killed mid-write leaves a `.tmp` folder that is never
loaded, and the previous `latest` stays intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f"step-{step:06d}.tmp"
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if _rank() == 0:
            (tmp / "train.json").write_text(json.dumps(meta or {}, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            pointer = self.root / (LATEST + ".tmp")
            pointer.write_text(final.name)
            pointer.replace(self.root / LATEST)
        _barrier()
        return final

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / ".metadata").exists() else None

    def load(self, state: dict[str, Any], path: str | Path | None = None) -> dict[str, Any]:
        """Load into `state` in place (DCP reshards to this world size); returns its train.json."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        dcp.load(state, checkpoint_id=str(path))
        return read_meta(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / "train.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a root whose `latest` names one."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    found = Checkpointer(path).latest()
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a folder with a complete 'latest' checkpoint")
    return found
