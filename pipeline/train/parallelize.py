"""The parallelism plan, in one place: the item table sharded by TorchRec, the dense FuXi stack by FSDP2.

`parallelize` shards a model built on `meta` and nothing else (as torchtitan's parallelize): building it,
fusing the table's optimizer into its backward, initialising and the dense optimizer are
pipeline/train/builder.py's. It does, in order (shared/docs/stack-notes.md section 1, measured on this
stack):
  1. `DistributedModelParallel` with a plan from the TorchRec planner, restricted to the sharding types
     of `ParallelConfig`, and a no-op data-parallel wrapper (DMP would otherwise wrap the dense part in DDP),
  2. `fully_shard` every encoder block, then the model root with the table's parameters ignored (never
     the root without them: load_state_dict then fails with "mixed torch.Tensor and DTensor").

The other layout, `data_parallel`, keeps the whole table on every rank as a plain parameter, averages its
gradient over ranks and gives it to the AdamW: the official optimizer exactly. It is the default on CPU
(fbgemm's CPU TBE has no Adam) and the only layout when embedding_dim % 4 != 0 (the official D = 50:
fbgemm's TBE needs multiples of 4). DMP then gets an empty plan and no optimizer is fused.

Gradient scale: every reduction *averages* over ranks, as the libraries do by default: TorchRec's
all-to-all backward divides the embedding gradients by the world size (comm_ops GRADIENT_DIVISION), FSDP2's
reduce-scatter averages, and the hook of a replicated table averages too. Each rank therefore
backpropagates world_size * (sum of its position losses) / (global number of positions)
(pipeline/train/trainer.py), and the averaged gradients are those of the global mean loss in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from model.config import ModelConfig
from model.recommender import ITEM_TABLE, SequentialRecommender
from pipeline.train.config import ParallelConfig

TABLE_KEY = f"item_embedding.embeddings.{ITEM_TABLE}.weight"  # the table's FQN in dmp.state_dict()
MODEL_PARALLEL = ("row_wise", "table_wise", "column_wise")
DATA_PARALLEL = "data_parallel"


class NoDataParallel(DataParallelWrapper):
    """Leaves the dense part alone: FSDP2 owns it (DMP's default would wrap it in DDP)."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        pass


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel  # state_dict()/load_state_dict() with the model's FQNs
    model: SequentialRecommender  # dmp.module: sharded EC + FSDP2 modules; call it (and encode_last) directly
    plan: ShardingPlan  # empty: a replicated (data_parallel) table
    mesh: DeviceMesh


def table_sharding(plan: ShardingPlan) -> dict[str, Any]:
    """The planner's choice for the item table: sharding type, kernel, and where each shard lives."""
    if not plan.plan:
        return {"sharding_type": DATA_PARALLEL, "compute_kernel": "dense (replicated, AdamW)", "shards": []}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():  # type: ignore[union-attr]
            if name == ITEM_TABLE:
                specs = ps.sharding_spec.shards if ps.sharding_spec is not None else []  # type: ignore[union-attr]
                shards = [
                    {
                        "rank": s.placement.rank(),
                        "offsets": list(s.shard_offsets),
                        "sizes": list(s.shard_sizes),
                    }
                    for s in specs
                ]
                return {
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "shards": shards,
                }
    raise KeyError(f"{ITEM_TABLE} is not in the sharding plan")


def resolve_sharding_types(
    parallel: ParallelConfig, cfg: ModelConfig, device: torch.device
) -> tuple[str, ...]:
    """The sharding types offered to the planner: the configured ones (ParallelConfig checks them), or
    auto's choice for this device."""
    if parallel.sharding_types:
        return tuple(parallel.sharding_types)
    split = device.type == "cuda" and cfg.embedding_dim % 4 == 0
    return MODEL_PARALLEL if split else (DATA_PARALLEL,)


def plan_item_table(
    model: nn.Module,
    cfg: ModelConfig,
    sharding_types: tuple[str, ...],
    device: torch.device,
    pg: dist.ProcessGroup,
    batch_size: int,
) -> ShardingPlan:
    """One plan agreed by all ranks (`collective_plan`: rank 0 plans and broadcasts)."""
    world_size = dist.get_world_size(pg)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    # column-wise shards are multiples of 4 columns; offer ~D / world_size so the columns spread over
    # the ranks
    min_partition = max(4, cfg.embedding_dim // world_size // 4 * 4)
    constraints = {
        ITEM_TABLE: ParameterConstraints(
            sharding_types=list(sharding_types), compute_kernels=["fused"], min_partition=min_partition
        )
    }
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False
    )
    return planner.collective_plan(model, get_default_sharders(), pg)


def local_table_shards(table: Any) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]:
    """((row, col) offsets, (rows, cols), tensor) of the table parts this rank holds: the local shards of
    a ShardedTensor (model parallel), or the whole tensor (data parallel). Tensors are views of the
    weights."""
    if isinstance(table, ShardedTensor):
        return [
            (tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes), s.tensor)
            for s in table.local_shards()
        ]
    return [((0, 0), tuple(table.shape), table)]


def _average(grad: torch.Tensor, pg: dist.ProcessGroup, world_size: int) -> None:
    dist.all_reduce(grad, group=pg)
    grad.div_(world_size)


def parallelize(
    model: SequentialRecommender,
    sharding_types: tuple[str, ...],
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    batch_size: int = 128,
) -> ShardedModel:
    """Shard `model` (built on `meta`, the table's optimizer already fused if it is split) on an
    initialised process group (a world of one is fine): the table by TorchRec over `sharding_types`
    (`resolve_sharding_types`), the encoder blocks and the root by FSDP2. batch_size: per-rank batch, a
    hint for the planner's cost model. The weights are left for the caller to initialise."""
    pg = pg or dist.group.WORLD
    assert pg is not None, "parallelize needs an initialised process group (pipeline/train/distributed.py)"
    world_size = dist.get_world_size(pg)
    replicated = sharding_types == (DATA_PARALLEL,)
    # a replicated table stays an unsharded EmbeddingCollection: torchrec's own data_parallel sharding of
    # an EmbeddingCollection failed here on our two sequence features (split_with_sizes in its output
    # dist); the gradient hook below does what its DDP wrapper would
    if replicated:
        plan = ShardingPlan(plan={})
    else:
        plan = plan_item_table(model, model.cfg, sharding_types, device, pg, batch_size)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        data_parallel_wrapper=NoDataParallel(),
    )
    sharded: SequentialRecommender = dmp.module  # type: ignore[assignment]
    mesh = init_device_mesh(device.type, (world_size,))
    for block in sharded.encoder.blocks:
        fully_shard(block, mesh=mesh)
    table_params = set(sharded.item_embedding.parameters())
    fully_shard(sharded, mesh=mesh, ignored_params=table_params)
    register_fsdp_forward_method(sharded, "encode_last")
    if replicated and world_size > 1:
        for param in table_params:  # every rank's copy gets the mean of all ranks' gradients, like DDP
            param.register_post_accumulate_grad_hook(lambda p: _average(p.grad, pg, world_size))
    return ShardedModel(dmp=dmp, model=sharded, plan=plan, mesh=mesh)
