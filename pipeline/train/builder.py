"""Build the training model: the model, its sharding, its initial weights and its optimizer.

1. build the model on `meta` (nothing is allocated: the table may exceed one rank's memory),
2. fuse the table's optimizer into its backward (`apply_optimizer_in_backward`, before sharding; fbgemm
   TBE Adam on CUDA, (row-wise) Adagrad on CPU, whose TBE has no Adam): its sparse gradient never
   materialises. Not for a replicated (data_parallel) table: the AdamW updates it,
3. shard it: pipeline/train/parallelize.py,
4. initialise: the table chunk by chunk from per-chunk seeds, the dense weights from a seeded template,
   so the values do not depend on the world size or on the sharding type,
5. one `CombinedOptimizer`: ("fused", the table's) + ("dense", AdamW over the FSDP2 DTensors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.optim import Adagrad, RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import Adam as FusedAdam

from model.config import ModelConfig
from model.recommender import SequentialRecommender, build_model
from pipeline.train.config import OptimConfig, ParallelConfig
from pipeline.train.parallelize import (
    DATA_PARALLEL,
    TABLE_KEY,
    local_table_shards,
    parallelize,
    resolve_sharding_types,
    table_sharding,
)

INIT_CHUNK_ROWS = 1 << 16  # the table is initialised in chunks of rows, each from its own seed


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
        weight = target[key]
        if isinstance(weight, DTensor):  # FSDP2-sharded: this rank's part (every rank has the same template)
            value = distribute_tensor(value, weight.device_mesh, weight.placements, src_data_rank=None)
        weight.copy_(value.to(weight.device))


def _deferred_init(weight: torch.Tensor) -> None:
    """Stands in for the table's init_fn while torchrec builds the shards (see parallelize)."""


def build_parallel_model(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    device: torch.device,
    seed: int,
    batch_size: int = 128,
    pg: dist.ProcessGroup | None = None,
    init_table: bool = True,
) -> ParallelModel:
    """Build, shard (`parallelize`), initialise and give an optimizer to the model, on an initialised
    process group (a world of one is fine).

    batch_size: per-rank batch, a hint for the planner's cost model. init_table=False keeps the kernel's
    own uniform init (benchmarks of huge tables, or weights that a checkpoint overwrites).
    """
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

    sharded = parallelize(model, sharding_types, device, pg, batch_size)

    if init_table:
        init_item_table(sharded.dmp, init_fn, cfg.num_items, cfg.embedding_dim, seed)
    init_dense(sharded.model, cfg, seed)
    # the AdamW covers the dense weights, and the table too when it is replicated
    table_params = set(sharded.model.item_embedding.parameters())
    dense_params = {
        n: p
        for n, p in sharded.dmp.named_parameters()
        if p.requires_grad and (replicated or p not in table_params)
    }
    dense_opt = KeyedOptimizerWrapper(
        dense_params,
        lambda params: torch.optim.AdamW(
            params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        ),
    )
    combined = CombinedOptimizer([("fused", sharded.dmp.fused_optimizer), ("dense", dense_opt)])
    return ParallelModel(
        dmp=sharded.dmp,
        model=sharded.model,
        optimizer=combined,
        dense_optimizer=dense_opt,
        plan=sharded.plan,
        mesh=sharded.mesh,
        embedding_optimizer=emb_opt,
    )
