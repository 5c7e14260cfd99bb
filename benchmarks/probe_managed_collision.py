"""What TorchRec's managed-collision modules do with this stack on CPU (see docs/OPEN_WORLD.md).

No trainer code uses managed collision; this probe records what the installed torchrec offers before a
switch is worth building. Unsharded MCH (`MCHManagedCollisionModule` + `DistanceLFU_EvictionPolicy`)
remaps any int64 raw id into [0, slots) and evicts stale ids for frequent new ones. Its sharded path and
ZCH training need fbgemm kernels that the CPU build lacks; each probe prints what happened, so a stack
upgrade that fixes them shows up here.

    python benchmarks/probe_managed_collision.py
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.hash_mc_modules import HashZchManagedCollisionModule
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

SLOTS = 8  # the last slot is where ids without a slot land
CPU = torch.device("cpu")
RAW = [2**62, -5, -(2**63) + 1, 7, 2**62 + 1, 11, 123456789012345]


def _mc_ec() -> ManagedCollisionEmbeddingCollection:
    cfg = EmbeddingConfig(name="t_items", embedding_dim=4, num_embeddings=SLOTS, feature_names=["item"])
    mcm = MCHManagedCollisionModule(
        zch_size=SLOTS, device=CPU, eviction_policy=DistanceLFU_EvictionPolicy(), eviction_interval=1
    )
    ec = EmbeddingCollection(tables=[cfg], device=CPU)
    return ManagedCollisionEmbeddingCollection(
        ec, ManagedCollisionCollection({"t_items": mcm}, [cfg]), return_remapped_features=True
    )


def _kjt(ids: list[int] | torch.Tensor) -> KeyedJaggedTensor:
    values = torch.as_tensor(ids, dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item"], values=values, lengths=torch.tensor([len(values)])
    )


def mch_remap() -> str:
    """Huge and negative ids land in distinct slots, repeats agree, and the map holds in eval."""
    m = _mc_ec().train()
    emb, remapped = m(_kjt(RAW + RAW[:2]))
    rows = remapped["item"].values().tolist()
    _, again = m.eval()(_kjt(RAW))
    ok = (
        all(0 <= r < SLOTS - 1 for r in rows)
        and len(set(rows[:7])) == 7
        and rows[7:] == rows[:2]
        and emb["item"].values().shape == (9, 4)
        and again["item"].values().tolist() == rows[:7]
    )
    return f"{'works' if ok else 'CHANGED'}: slots {rows}"


def mch_eviction() -> str:
    """Frequent new ids take every slot; the evicted old ids all read the miss slot."""
    m = _mc_ec().train()
    m(_kjt(RAW))
    hot = (torch.arange(SLOTS - 1, dtype=torch.int64) - 3) * 2**60 + 99
    for _ in range(10):
        _, remapped = m(_kjt(hot.repeat(5)))
    _, old = m.eval()(_kjt(RAW))
    ok = sorted(remapped["item"].values()[: SLOTS - 1].tolist()) == list(range(SLOTS - 1))
    ok = ok and old["item"].values().tolist() == [SLOTS - 1] * len(RAW)
    return f"{'works' if ok else 'CHANGED'}: old ids now read slots {old['item'].values().tolist()}"


def zch_training() -> str:
    """ZCH inserts ids only in training mode; eval is a read-only hash fallback."""
    m = HashZchManagedCollisionModule(zch_size=16, device=CPU, total_num_buckets=1, name="t_items").train()
    features = {"item": JaggedTensor(values=torch.tensor(RAW), lengths=torch.tensor([len(RAW)]))}
    try:
        m(features)
        train = "training lookup works"
    except RuntimeError as e:
        train = f"training lookup fails: {str(e).splitlines()[0]}"
    out = m.eval()(features)["item"].values()
    return f"{train}; eval read-only ids in [0, 16): {bool(((out >= 0) & (out < 16)).all())}"


def sharded_mch(kernel: str) -> str:
    """MCH under DistributedModelParallel, row-wise, one gloo rank: admitting new ids resets their rows."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Module()
        model.mc_ec = _mc_ec()
        fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
        sharder = ManagedCollisionEmbeddingCollectionSharder(
            fused_params=fused if kernel == "fused" else None
        )
        plan = construct_module_sharding_plan(
            model.mc_ec,
            per_param_sharding={"t_items": row_wise(compute_kernel=kernel)},
            local_size=1,
            world_size=1,
            device_type="cpu",
            sharder=sharder,
        )
        dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=CPU,
            plan=ShardingPlan({"mc_ec": plan}),
            sharders=[sharder],
        )
        try:
            dmp.module.mc_ec(_kjt(RAW))
            return "works"
        except (NotImplementedError, AttributeError, RuntimeError) as e:
            return f"fails at the first insert: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        dist.destroy_process_group()


def main() -> None:
    for name, probe in [
        ("MCH remap", mch_remap),
        ("MCH eviction", mch_eviction),
        ("ZCH training", zch_training),
        ("sharded MCH, fused kernel", lambda: sharded_mch("fused")),
        ("sharded MCH, dense kernel", lambda: sharded_mch("dense")),
    ]:
        print(f"{name:28s} {probe()}")


if __name__ == "__main__":
    main()
