"""The parallelism plan, in one place: the item table sharded by TorchRec, the dense FuXi stack by FSDP2.

Order (shared/docs/stack-notes.md section 1, measured on this stack):
  1. build the model on `meta` (nothing is allocated: the table may exceed one rank's memory),
  2. fuse the table's optimizer into its backward (`apply_optimizer_in_backward`; fbgemm TBE Adam on
     CUDA, (row-wise) Adagrad on CPU, whose TBE has no Adam): its sparse gradient never materialises,
  3. `DistributedModelParallel` with a plan from the TorchRec planner, restricted to the sharding types
     of `ParallelConfig`, and a no-op data-parallel wrapper (DMP would otherwise wrap the dense part in DDP),
  4. initialise: the table chunk by chunk from per-chunk seeds, the dense weights from a seeded template,
     so the values do not depend on the world size or on the sharding type,
  5. `fully_shard` every encoder block, then the model root with the table's parameters ignored (never
     the root without them: load_state_dict then fails with "mixed torch.Tensor and DTensor"),
  6. one `CombinedOptimizer`: ("fused", the table's) + ("dense", AdamW over the FSDP2 DTensors).

The other layout, `data_parallel`, keeps the whole table on every rank as a plain parameter, averages its
gradient over ranks and gives it to the AdamW: the official optimizer exactly. It is the default on CPU
(fbgemm's CPU TBE has no Adam) and the only layout when embedding_dim % 4 != 0 (the official D = 50:
fbgemm's TBE needs multiples of 4). Steps 2 and 3 are then skipped (DMP gets an empty plan).

Gradient scale: every reduction *averages* over ranks, as the libraries do by default: TorchRec's
all-to-all backward divides the embedding gradients by the world size (comm_ops GRADIENT_DIVISION), FSDP2's
reduce-scatter averages, and the hook of a replicated table averages too. Each rank therefore
backpropagates world_size * (sum of its position losses) / (global number of positions)
(pipeline/train/trainer.py), and the averaged gradients are those of the global mean loss in one process.
"""

from __future__ import annotations

import dataclasses
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
from torchrec.optim import Adagrad, RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import Adam as FusedAdam

from model.config import ModelConfig
from model.recommender import ITEM_TABLE, SequentialRecommender, build_model
from pipeline.train.config import OptimConfig, ParallelConfig

TABLE_KEY = f"item_embedding.embeddings.{ITEM_TABLE}.weight"  # the table's FQN in dmp.state_dict()
MODEL_PARALLEL = ("row_wise", "table_wise", "column_wise")
DATA_PARALLEL = "data_parallel"
INIT_CHUNK_ROWS = 1 << 16  # the table is initialised in chunks of rows, each from its own seed


class NoDataParallel(DataParallelWrapper):
    """Leaves the dense part alone: FSDP2 owns it (DMP's default would wrap it in DDP)."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        pass


@dataclass
class ParallelModel:
    dmp: DistributedModelParallel  # state_dict()/load_state_dict() with the model's FQNs
    model: SequentialRecommender  # dmp.module: sharded EC + FSDP2 modules; call it (and encode_last) directly
    optimizer: CombinedOptimizer  # ("fused", the table's) + ("dense", AdamW)
    dense_optimizer: KeyedOptimizerWrapper
    plan: ShardingPlan
    mesh: DeviceMesh
    embedding_optimizer: str  # resolved: adam | rowwise_adagrad (fused), or adamw (data_parallel table)

    def table_sharding(self) -> dict[str, Any]:
        return table_sharding(self.plan)

    def num_parameters(self) -> int:
        """Global count: the whole table plus the dense weights (DTensor numel is global)."""
        cfg = self.model.cfg
        dense = sum(p.numel() for n, p in self.dmp.named_parameters() if not n.startswith("item_embedding."))
        return cfg.num_items * cfg.embedding_dim + dense

    def init_optimizer_state(self) -> None:
        """AdamW's state is lazy; create it (a zero-gradient step leaves the weights unchanged when
        weight_decay is 0, and they are overwritten by the checkpoint anyway) so DCP can load in place."""
        if not self.dense_optimizer.state:
            self.dense_optimizer.init_state()
            self.dense_optimizer.zero_grad()


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


def resolve_embedding_optimizer(name: str, device: torch.device) -> str:
    if name == "auto":
        return "adam" if device.type == "cuda" else "rowwise_adagrad"
    if name not in ("adam", "rowwise_adagrad", "adagrad"):
        raise ValueError(
            f"unknown embedding optimizer {name!r}; choose auto, adam, rowwise_adagrad or adagrad"
        )
    if name == "adam" and device.type != "cuda":
        raise ValueError(
            "fbgemm's CPU TBE has no fused Adam: use parallel.embedding_optimizer=rowwise_adagrad on CPU"
        )
    return name


def fused_optimizer(name: str, parallel: ParallelConfig, optim: OptimConfig) -> tuple[type, dict[str, Any]]:
    lr = parallel.embedding_lr if parallel.embedding_lr is not None else optim.lr
    if (
        name == "adam"
    ):  # fbgemm spells the betas beta1/beta2; torchrec's Adam is a placeholder that forwards them
        beta1, beta2 = optim.betas
        kwargs = {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "eps": optim.eps,
            "weight_decay": optim.weight_decay,
        }
        return FusedAdam, kwargs
    if name == "adagrad":
        return Adagrad, {"lr": lr, "eps": optim.eps, "weight_decay": optim.weight_decay}
    return RowWiseAdagrad, {"lr": lr, "eps": optim.eps, "weight_decay": optim.weight_decay}


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


@torch.no_grad()
def init_item_table(dmp: nn.Module, init_fn: Any, num_rows: int, dim: int, seed: int) -> None:
    """Give this rank's shard(s) exactly the rows one process would have: chunk c (INIT_CHUNK_ROWS rows)
    is drawn by the table's own init_fn under seed (seed, c); each shard copies its rows and columns.
    `dmp`: a DistributedModelParallel, or a plain model (its table is one whole "shard")."""
    for (r0, c0), (nr, nc), weight in local_table_shards(dmp.state_dict()[TABLE_KEY]):
        if nr == 0:
            continue
        for chunk in range(r0 // INIT_CHUNK_ROWS, (r0 + nr - 1) // INIT_CHUNK_ROWS + 1):
            lo, hi = chunk * INIT_CHUNK_ROWS, min((chunk + 1) * INIT_CHUNK_ROWS, num_rows)
            values = torch.empty(hi - lo, dim)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + chunk)
                init_fn(values)
            a, b = max(lo, r0), min(hi, r0 + nr)
            weight[a - r0 : b - r0].copy_(values[a - lo : b - lo, c0 : c0 + nc])


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


@torch.no_grad()
def init_dense(model: SequentialRecommender, cfg: ModelConfig, seed: int) -> None:
    """Dense weights from a template seeded with `seed` and built with a 2-row table: the values depend on
    the seed and the architecture only, not on num_items, the world size or the sharding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        template = build_model(dataclasses.replace(cfg, num_items=2), device="cpu")
    source = {k: v for k, v in template.state_dict().items() if not k.startswith("item_embedding.")}
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("item_embedding.")}
    if set(source) != set(target):
        raise RuntimeError(f"dense state mismatch: {sorted(set(source) ^ set(target))}")
    for key, value in source.items():
        target[key].copy_(value)


def _deferred_init(weight: torch.Tensor) -> None:
    """Stands in for the table's init_fn while torchrec builds the shards (see parallelize)."""


def _average(grad: torch.Tensor, pg: dist.ProcessGroup, world_size: int) -> None:
    dist.all_reduce(grad, group=pg)
    grad.div_(world_size)


def parallelize(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    device: torch.device,
    seed: int,
    batch_size: int = 128,
    pg: dist.ProcessGroup | None = None,
    init_table: bool = True,
) -> ParallelModel:
    """Build, shard and initialise the model on an initialised process group (a world of one is fine).

    batch_size: per-rank batch, a hint for the planner's cost model. init_table=False keeps the kernel's
    own uniform init (benchmarks of huge tables, or weights that a checkpoint overwrites).
    """
    pg = pg or dist.group.WORLD
    assert pg is not None, "parallelize needs an initialised process group (pipeline/train/distributed.py)"
    world_size = dist.get_world_size(pg)
    sharding_types = resolve_sharding_types(parallel, cfg, device)
    replicated = sharding_types == (DATA_PARALLEL,)
    model = build_model(cfg, device="meta")
    table_cfg = model.item_embedding.embedding_configs()[0]
    # torchrec would run init_fn on each whole shard with the rank's own RNG (trunc_normal_ on a 5 GB
    # shard peaks at ~3x its size); init_item_table runs it in chunks with world-size-invariant seeds
    init_fn, table_cfg.init_fn = table_cfg.init_fn, _deferred_init
    if replicated:
        emb_opt = "adamw"
    else:
        emb_opt = resolve_embedding_optimizer(parallel.embedding_optimizer, device)
        opt_cls, opt_kwargs = fused_optimizer(emb_opt, parallel, optim)
        apply_optimizer_in_backward(opt_cls, model.item_embedding.parameters(), opt_kwargs)
    # a replicated table stays an unsharded EmbeddingCollection: torchrec's own data_parallel sharding of
    # an EmbeddingCollection failed here on our two sequence features (split_with_sizes in its output
    # dist); the gradient hook below does what its DDP wrapper would
    if replicated:
        plan = ShardingPlan(plan={})
    else:
        plan = plan_item_table(model, cfg, sharding_types, device, pg, batch_size)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        data_parallel_wrapper=NoDataParallel(),
    )
    sharded: SequentialRecommender = dmp.module  # type: ignore[assignment]
    if init_table:
        init_item_table(dmp, init_fn, cfg.num_items, cfg.embedding_dim, seed)
    init_dense(sharded, cfg, seed)

    mesh = init_device_mesh(device.type, (world_size,))
    for block in sharded.encoder.blocks:
        fully_shard(block, mesh=mesh)
    table_params = set(sharded.item_embedding.parameters())
    fully_shard(sharded, mesh=mesh, ignored_params=table_params)
    register_fsdp_forward_method(sharded, "encode_last")
    if replicated and world_size > 1:
        for param in table_params:  # every rank's copy gets the mean of all ranks' gradients, like DDP
            param.register_post_accumulate_grad_hook(lambda p: _average(p.grad, pg, world_size))

    # the AdamW covers the dense weights, and the table too when it is replicated
    dense_params = {
        n: p for n, p in dmp.named_parameters() if p.requires_grad and (replicated or p not in table_params)
    }
    dense_opt = KeyedOptimizerWrapper(
        dense_params,
        lambda params: torch.optim.AdamW(
            params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        ),
    )
    combined = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense_opt)])
    return ParallelModel(
        dmp=dmp,
        model=sharded,
        optimizer=combined,
        dense_optimizer=dense_opt,
        plan=plan,
        mesh=mesh,
        embedding_optimizer=emb_opt,
    )
