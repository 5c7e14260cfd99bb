"""What TorchRec's managed-collision modules do with this stack on CPU (see docs/OPEN_WORLD.md).

Unsharded MCH (`MCHManagedCollisionModule` + `DistanceLFU_EvictionPolicy`) remaps any int64 raw id into
[0, slots) and evicts stale ids for frequent new ones. Its sharded path and ZCH training need fbgemm
kernels that the CPU build lacks; those failures are pinned so a stack upgrade that fixes them shows up here.
"""

import pytest
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


def test_mch_remaps_huge_and_negative_ids_into_slots():
    m = _mc_ec().train()
    emb, remapped = m(_kjt(RAW + RAW[:2]))
    rows = remapped["item"].values().tolist()
    assert all(0 <= r < SLOTS - 1 for r in rows)
    assert len(set(rows[:7])) == 7 and rows[7:] == rows[:2]  # distinct ids, distinct slots; repeats agree
    assert emb["item"].values().shape == (9, 4)
    _, again = m.eval()(_kjt(RAW))
    assert again["item"].values().tolist() == rows[:7]  # stable once admitted


def test_mch_evicts_stale_ids_for_frequent_new_ones():
    m = _mc_ec().train()
    m(_kjt(RAW))
    hot = (torch.arange(SLOTS - 1, dtype=torch.int64) - 3) * 2**60 + 99
    for _ in range(10):
        _, remapped = m(_kjt(hot.repeat(5)))
    assert sorted(remapped["item"].values()[: SLOTS - 1].tolist()) == list(range(SLOTS - 1))
    _, old = m.eval()(_kjt(RAW))
    assert old["item"].values().tolist() == [SLOTS - 1] * len(RAW)  # evicted: all on the miss slot


def test_zch_training_lookup_is_not_available_on_cpu():
    m = HashZchManagedCollisionModule(zch_size=16, device=CPU, total_num_buckets=1, name="t_items").train()
    features = {"item": JaggedTensor(values=torch.tensor(RAW), lengths=torch.tensor([len(RAW)]))}
    with pytest.raises(RuntimeError, match="Expected readonly to be true"):
        m(features)
    out = m.eval()(features)["item"].values()  # read-only: a hash fallback, ids are not inserted
    assert ((out >= 0) & (out < 16)).all()


@pytest.mark.parametrize(
    ("kernel", "error", "match"),
    [
        (
            "fused",
            NotImplementedError,
            "fbgemm::reset_weight_momentum' with arguments from the 'CPU' backend",
        ),
        ("dense", AttributeError, "has no attribute 'reset_embedding_weight_momentum'"),
    ],
)
def test_sharded_mch_fails_on_cpu_at_the_first_insert(kernel, error, match):
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Module()
        model.mc_ec = _mc_ec()
        fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
        sharder = ManagedCollisionEmbeddingCollectionSharder(
            fused_params=fused if kernel == "fused" else None
        )
        per_param = {"t_items": row_wise(compute_kernel=kernel)}
        plan = construct_module_sharding_plan(
            model.mc_ec,
            per_param_sharding=per_param,
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
        with pytest.raises(error, match=match):
            dmp.module.mc_ec(_kjt(RAW))  # admitting new ids resets their rows: the missing kernel
    finally:
        dist.destroy_process_group()
