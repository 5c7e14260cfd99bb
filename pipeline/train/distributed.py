"""Process group and device for one training process: torchrun's environment, or a world of one.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set) the default group is initialised from
the environment: nccl on CUDA, gloo on CPU. A plain `python -m jobs.cli train` gets a one-rank gloo
group on an in-memory store, so the single process runs the very same sharded code path (DMP + FSDP2 +
DCP) as N ranks. `teardown` destroys only a group this module created.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # True when init_distributed created the default group (teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def select_device(requested: str | torch.device, local_rank: int) -> torch.device:
    """'cpu', 'cuda' (this process's local GPU), or an explicit 'cuda:N'."""
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(requested_device: str | torch.device = "cpu", timeout_s: int = 600) -> DistContext:
    """Join (or create) the default process group and pick this rank's device. `timeout_s` bounds the
    group's set-up and every collective: a rank whose peer died fails after it (and torchrun restarts the
    job) instead of waiting forever."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if under_torchrun():
            timeout = datetime.timedelta(seconds=timeout_s)
            if device.type == "cuda":
                dist.init_process_group(backend=backend, device_id=device, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a world of one, no network: an in-process store
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        device=device,
        backend=dist.get_backend(),
        owns_group=owns,
    )


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the default group (a copy; identity in a world of one)."""
    x = x.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
