"""Count what the embedding table's all-to-alls move in each training step: `fuxi train` under torchrun,
with torch.distributed's all-to-all wrapped to add up the bytes each rank sends to the other ranks.

    torchrun --standalone --nproc_per_node 2 infra/box/a2a_bytes.py OUT.json train --preset tiny ...

Everything after OUT.json is `fuxi train`'s command line. Only the all-to-alls inside `Trainer.train_step`
count (forward and backward: the ids to the rows' owners, their embeddings back, the embeddings' gradients
to the owners); the evaluation's lookups do not. Rank 0 writes OUT.json: per rank the steps, the bytes sent
to other ranks, the calls, and the mean bytes a step. FSDP2's all-gathers and reduce-scatters (the encoder
blocks) are not all-to-alls and are not counted.
"""

import inspect
import json
import os
import runpy
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from pipeline.train.trainer import Trainer

counts = {"steps": 0, "bytes": 0, "calls": 0}
in_step = False


def _sent_to_peers(inp: torch.Tensor, input_split_sizes: list[int] | None, group) -> int:
    """Bytes of `inp` that leave this rank: all of it but the slice it keeps for itself."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    total = inp.numel() * inp.element_size()
    if total == 0:
        return 0
    row = total // inp.shape[0] if inp.dim() > 0 and inp.shape[0] else total
    own = input_split_sizes[rank] * row if input_split_sizes else total // world
    return total - own


def _counting(fn):
    """`fn` with the bytes its input sends to other ranks added up (inside a training step)."""
    sig = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        if in_step:
            bound = sig.bind(*args, **kwargs).arguments
            inp = bound.get("input", bound.get("self"))
            group = bound.get("group")
            group = group if isinstance(group, dist.ProcessGroup) else None
            counts["bytes"] += _sent_to_peers(inp, bound.get("input_split_sizes"), group)
            counts["calls"] += 1
        return fn(*args, **kwargs)

    return wrapped


dist.all_to_all_single = _counting(dist.all_to_all_single)
funcol.all_to_all_single = _counting(funcol.all_to_all_single)

_train_step = Trainer.train_step


def train_step(self, batch):
    global in_step
    in_step = True
    try:
        return _train_step(self, batch)
    finally:
        in_step = False
        counts["steps"] += 1


Trainer.train_step = train_step


def _report(out: str) -> None:
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"rank": dist.get_rank(), **counts})
    if dist.get_rank() == 0:
        for r in per_rank:
            r["bytes_per_step"] = r["bytes"] / max(r["steps"], 1)
        total = sum(r["bytes_per_step"] for r in per_rank)
        with open(out, "w") as f:
            json.dump({"ranks": per_rank, "bytes_per_step_all_ranks": total}, f, indent=1)


if __name__ == "__main__":
    out, sys.argv = sys.argv[1], ["fuxi", *sys.argv[2:]]
    # the trainer destroys the process group at its end: report just before, from inside it
    _destroy = dist.destroy_process_group

    def destroy(*args, **kwargs):
        if dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _report(out)
        return _destroy(*args, **kwargs)

    dist.destroy_process_group = destroy
    runpy.run_module("jobs.cli", run_name="__main__")
