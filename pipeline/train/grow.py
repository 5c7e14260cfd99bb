"""Warm start into a model whose item table has grown: rows [0, N_old) and their optimizer state come from
the checkpoint bit for bit, rows [N_old, N_new) keep what the model already holds (the cold-start init of
pipeline/train/parallelize.py, and fresh optimizer state), the dense part loads as it is.

How: DCP loads *in place* into whatever tensors the state dict holds, and it refuses a tensor whose global
shape differs from the saved one. So every table tensor (the weight and each per-row optimizer state, e.g.
row-wise Adagrad's momentum1 [N] or Adam's/Adagrad's [N, D] moments) is handed to `dcp.load` as a *view of
its first N_old rows* with the old global shape:
  - a TorchRec ShardedTensor (row_wise, table_wise, column_wise): a new ShardedTensor of global shape
    [N_old, ...] whose local shards are views of this rank's local shards cut to the rows below N_old
    (a shard wholly above N_old is left out; a rank may end up with no shard, as under table_wise). The
    global metadata is the new tensor's, cut the same way on every rank, so no communication is needed.
    Fused row-wise Adagrad under column_wise keeps one [N] accumulator per column shard, end to end
    ([c * N]): each block of N rows is cut to its first N_old the same way;
  - a plain tensor (the data_parallel table, the unsharded model of serving/loading.py): t[:N_old].
DCP then reads just the old rows and reshards them from the saved layout (any world size, any sharding
type) straight into the live weights and optimizer buffers.
Why not load-then-copy: a temporary old-shape model, or old-shape tensors, would cost a second copy of
the table (and of its optimizer state) per rank, and, with the row boundaries moved by growth, a copy
across ranks; the views cost nothing and reuse DCP's resharding.

Everything else must match the checkpoint exactly (dense parameters, their AdamW state, scalars): a
missing entry or another shape is a one-line ValueError naming it, checked against the checkpoint's
metadata before anything is read.

The optimizer's state is loaded when `optimizer` is given (TrainConfig.init_optimizer): the state only;
hyperparameters come from the new run's config. A `final` or `best` checkpoint holds the model only, so
loading an optimizer from it is an error that says so. Per-parameter scalars such as AdamW's `step` of a
replicated table are the checkpoint's (one per tensor: new rows share it, their moments are zero).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from pipeline.train.checkpoint import load_state, read_dcp_metadata, resolve_checkpoint
from pipeline.train.parallelize import TABLE_KEY


def saved_shapes(path: str | Path) -> dict[str, tuple[int, ...] | None]:
    """Flat DCP key -> global shape of every entry of a checkpoint (None: not a tensor), from .metadata."""
    metadata = read_dcp_metadata(path)
    return {
        key: tuple(md.size) if isinstance(md, TensorStorageMetadata) else None
        for key, md in metadata.state_dict_metadata.items()
    }


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """DCP's flat keys: nested dict keys joined by dots (what .metadata records)."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _set(state: dict[str, Any], flat_key: str, value: Any) -> None:
    """Put a loaded non-tensor value back at its place in the nested state (keys may contain dots)."""
    node: Any = state
    rest = flat_key
    while rest not in node:
        key = next(k for k in node if rest.startswith(f"{k}.") and isinstance(node[k], dict))
        node, rest = node[key], rest[len(key) + 1 :]
    node[rest] = value


def table_rows(model: torch.nn.Module) -> int:
    """Rows of the model's item table (global: the ShardedTensor's size, not a shard's)."""
    return int(model.state_dict()[TABLE_KEY].size(0))


def first_rows(tensor: Any, old_rows: int, new_rows: int) -> Any:
    """A view of the first old_rows rows of each block of new_rows rows of a plain tensor or a
    ShardedTensor, with global shape [blocks * old_rows, ...]; writes into it land in `tensor`.

    One block is the common case: the weight and per-row state ([N, ...]). Several blocks: the per-row
    state of fused row-wise Adagrad under column_wise, one accumulator [N] per column shard laid end to
    end ([c * N]); every shard of it lies within one block."""
    if not isinstance(tensor, ShardedTensor):
        if tensor.shape[0] != new_rows:
            raise ValueError(f"a plain tensor of {tensor.shape[0]} rows cannot grow to {new_rows}")
        return tensor[:old_rows]
    md = tensor.metadata()
    blocks = md.size[0] // new_rows

    def cut(shard: ShardMetadata) -> ShardMetadata | None:
        block, start = divmod(shard.shard_offsets[0], new_rows)
        if start + shard.shard_sizes[0] > new_rows:
            raise ValueError(f"a shard at row {shard.shard_offsets[0]} straddles blocks of {new_rows} rows")
        keep = min(start + shard.shard_sizes[0], old_rows) - start
        if keep <= 0:
            return None
        offsets = [block * old_rows + start, *shard.shard_offsets[1:]]
        return ShardMetadata(offsets, [keep, *shard.shard_sizes[1:]], shard.placement)

    # the cut metadata, in the original order, and this rank's local shards cut the same way (non-empty
    # shards do not overlap, so their offsets name them)
    cuts = [(tuple(s.shard_offsets), cut(s)) for s in md.shards_metadata]
    kept = [m for _, m in cuts if m is not None]
    mine = {tuple(s.metadata.shard_offsets): s.tensor for s in tensor.local_shards()}
    local = [Shard(mine[at][: m.shard_sizes[0]], m) for at, m in cuts if m is not None and at in mine]
    global_md = ShardedTensorMetadata(
        kept, torch.Size([blocks * old_rows, *md.size[1:]]), md.tensor_properties
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, global_md, process_group=tensor._process_group
    )


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.size()) if isinstance(value, ShardedTensor | DTensor) else tuple(value.shape)


def load_targets(
    state: dict[str, Any], saved: dict[str, tuple[int, ...] | None], new_rows: int, path: str
) -> dict[str, Any]:
    """The flat dict handed to dcp.load: the state's own tensors, or views of their first N_old rows for
    the table's tensors. Raises the one-line errors (missing entry, shrinking table, other shape)."""
    table = saved.get(f"model.{TABLE_KEY}")
    if table is None:
        raise ValueError(f"{path}: the checkpoint has no model.{TABLE_KEY}")
    old_rows = table[0]
    if old_rows > new_rows:
        raise ValueError(f"checkpoint has {old_rows} item rows, the model {new_rows}: a table can only grow")
    targets: dict[str, Any] = {}
    for key, value in _flatten(state).items():
        if key not in saved:
            raise ValueError(f"{path}: the checkpoint has no {key} (saved with another model or optimizer?)")
        old = saved[key]
        if old is None or not isinstance(value, torch.Tensor):
            targets[key] = value
            continue
        new = _shape(value)
        # the table's tensors with one row (or one block of rows) per item grow; all else loads as it is
        blocks = new[0] // new_rows if TABLE_KEY in key and new and new[0] % new_rows == 0 else 0
        if blocks and old_rows != new_rows and old == (blocks * old_rows, *new[1:]):
            targets[key] = first_rows(value, old_rows, new_rows)
        elif old != new:
            raise ValueError(f"{path}: {key} has shape {list(old)} in the checkpoint, {list(new)} here")
        else:
            targets[key] = value
    return targets


def warm_start(
    model: torch.nn.Module,
    checkpoint: str | Path,
    optimizer: Any | None = None,
    init_optimizer_state: Callable[[], None] | None = None,
) -> str:
    """Load a checkpoint's model (and, with `optimizer`, its optimizer state) into `model`, growing the
    item table; `model` is a plain model in one process, or the DMP of a sharded one (every rank calls
    it). `init_optimizer_state` creates lazy optimizer state first (ParallelModel.init_optimizer_state).
    Returns the resolved checkpoint's URI."""
    path = resolve_checkpoint(checkpoint)
    saved = saved_shapes(path)
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        if not any(key.startswith("optim.") for key in saved):
            raise ValueError(
                f"{path} holds no optimizer state (final/best checkpoints hold the model only): warm start "
                "from a training checkpoint (step-*) or set init_optimizer=false"
            )
        if init_optimizer_state is not None:
            # creating AdamW's state takes a zero-gradient step, which weight decay would apply to a
            # replicated (plain) table; its new rows must stay the cold-start init, so keep a copy
            table = state["model"][TABLE_KEY]
            kept = table.clone() if not isinstance(table, ShardedTensor) else None
            init_optimizer_state()
            if kept is not None:
                with torch.no_grad():
                    table.copy_(kept)
        state["optim"] = optimizer.state_dict()
    targets = load_targets(state, saved, table_rows(model), path)
    load_state(targets, path)
    for key, value in targets.items():  # tensors were filled in place; other entries are replaced
        if not isinstance(value, torch.Tensor):
            _set(state, key, value)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return path
