"""Parity of the sharded trainer: 1 rank == 2 ranks (gloo, CPU), same global batch and seed.

For each way the item table can be split (row_wise, table_wise, column_wise: fused element-wise Adagrad;
data_parallel: replicated table + AdamW) the tiny preset trains 2 epochs (8 steps) with evaluation after
each epoch, once in this process (a world of one) and once under `torchrun --nproc_per_node 2`.
(Fused row-wise Adagrad is not used here: it keeps one accumulator per row *of each shard*, so
column_wise changes the optimizer itself; element-wise Adagrad is the same under every split.)

Why the runs can be equal: the global batch is the same rows (batch_size = 64 / world_size per rank);
negatives are the shared mode, one set of R ids drawn per step from a generator seeded by (seed, step),
so every rank scores the same negatives as the single process; dropout is off (its masks cannot match:
each rank draws masks for its own rows); each rank backpropagates sum(its losses) / global positions and
both gradient reductions sum over ranks, so the gradients are those of the global mean loss.

Adam and Adagrad are blind to a constant gradient scale, so equal losses alone would not catch a
gradient summed where it should be averaged: the first step's gradients are compared too (the norm of
every dense parameter's full gradient, of the replicated table's under data_parallel, and of a sharded
table's through its Adagrad accumulator, which holds the squared gradient after one step).

Tolerance: not bit-equality, because float32 sums run in another order on 2 ranks (the per-rank partial
loss sums, the reduce-scatter and all-to-all of gradients, matmuls of other shapes). Measured here: at
most 7e-7 relative on the 8 losses, metrics identical. rtol 1e-5 on losses and gradient norms leaves a
10x margin and is far below what a real mistake produces (a rank seeing other negatives or rows, a
dropped shard: > 1e-2 within two steps; a gradient off by the world size: a factor 2 on its norm).
Metrics are means of integer ranks: a score difference of 1e-7 changes a rank only on an exact
near-tie, so they may differ by at most one user's hit: atol = 1 / num_users.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.distributed import run_recorded, torchrun

GLOBAL_BATCH = 64
KINDS = ("data_parallel", "row_wise", "table_wise", "column_wise")


def parity_config(kind: str, world_size: int, run_dir: str, epochs: int = 2) -> Any:
    from pipeline.train.presets import tiny

    cfg = tiny()
    cfg.epochs = epochs
    cfg.batch_size = GLOBAL_BATCH // world_size
    cfg.eval_batch_size = GLOBAL_BATCH // world_size
    cfg.model.input_dropout = 0.0
    cfg.model.linear_dropout = 0.0
    cfg.loss.negatives = "shared"
    cfg.parallel.sharding_types = (kind,)
    cfg.parallel.embedding_optimizer = "adagrad"
    cfg.optim.lr, cfg.parallel.embedding_lr = 5e-3, 0.05  # large enough that the 8 steps visibly learn
    cfg.tracking.enabled = False
    cfg.tracking.log_every_steps = 1
    cfg.checkpoint_every_epochs = 0  # checkpoints are test_checkpoint.py's subject
    cfg.run_dir = run_dir
    return cfg


class GradProbe:
    """Stands in for the optimizer for one Trainer.train_step: records gradient norms, updates nothing."""

    def __init__(self, pm: Any) -> None:
        self.pm = pm
        self.norms: dict[str, float] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.pm.optimizer.zero_grad(set_to_none)

    def step(self) -> None:
        import torch
        import torch.distributed as dist

        for name, param in self.pm.dense_optimizer.params.items():  # dense weights (+ a replicated table)
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            self.norms[name] = float(grad.double().norm())
        # a sharded table's gradient never materialises (its optimizer ran inside backward); Adagrad's
        # accumulator after one step is the squared gradient, so its global sum is ||g||^2. One
        # all_reduce on every rank, also on a rank that holds no shard (table_wise).
        total = torch.zeros((), dtype=torch.float64)
        for key, state in self.pm.optimizer.state_dict()["state"].items():
            for value in state.values() if key.startswith("fused.") else ():
                total += sum(s.tensor.double().sum() for s in value.local_shards())
        dist.all_reduce(total)
        if self.pm.embedding_optimizer != "adamw":
            self.norms["fused table gradient"] = float(total.sqrt())


def first_step_grad_norms(cfg: Any) -> dict[str, float]:
    """The real train_step (loss scaling, reductions) on the first global batch; needs a process group."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from model.loss import NegativeSampler
    from pipeline.train.builder import build_parallel_model
    from pipeline.train.distributed import all_reduce_sum
    from pipeline.train.run import build_batches, load_data
    from pipeline.train.trainer import DistInfo, Trainer

    data = load_data(cfg)
    cfg.model = dataclasses.replace(cfg.model, num_items=data.num_items)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = build_batches(cfg, data, rank, world)["train"]
    pm = build_parallel_model(
        cfg.model, cfg.parallel, cfg.optim, torch.device("cpu"), cfg.seed, batch_size=cfg.batch_size
    )
    probe = GradProbe(pm)
    trainer = Trainer(
        model=pm.model,
        optimizer=probe,
        sampler=NegativeSampler(cfg.loss.num_negatives, "shared", 1, data.num_items),
        data=batches,
        evaluate=lambda split: {},
        cfg=cfg,
        dist=DistInfo(rank, world, "cpu", all_reduce_sum),
    )
    trainer.train_step(next(iter(batches.epoch(0))))
    return probe.norms


def plain_test_metrics(cfg: Any, checkpoint: str) -> dict[str, float]:
    """The reported model, loaded into an unsharded model and scored by the one-process `evaluate`."""
    import dataclasses

    from model.recommender import build_model
    from pipeline.train.evaluate import evaluate
    from pipeline.train.run import build_batches, load_data, load_model_weights

    data = load_data(cfg)
    model = build_model(dataclasses.replace(cfg.model, num_items=data.num_items))
    load_model_weights(model, checkpoint)
    return evaluate(model, build_batches(cfg, data)["test"].epoch())


def assert_same_run(one: dict[str, Any], many: dict[str, Any], what: str) -> None:
    assert len(one["losses"]) == len(many["losses"]) >= 8, what
    assert many["losses"] == pytest.approx(one["losses"], rel=1e-5), what
    assert set(many["grad_norms"]) == set(one["grad_norms"]), what
    assert many["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5), what
    users = one["test"]["num_users"]
    assert many["test"]["num_users"] == users, what
    for epoch_one, epoch_many in zip(one["history"], many["history"], strict=True):
        for key, value in epoch_one.items():
            if key.startswith("valid/") and key != "valid/num_users":
                assert epoch_many[key] == pytest.approx(value, abs=1.0 / users), f"{what} {key}"
    for key, value in one["test"].items():
        assert many["test"][key] == pytest.approx(value, abs=1.0 / users), f"{what} test {key}"


@pytest.mark.slow
def test_one_rank_equals_two_ranks_for_every_sharding_type(tmp_path: Path) -> None:
    out = tmp_path / "two_ranks.json"
    torchrun(2, [str(Path(__file__)), "--worker", str(out), str(tmp_path / "runs2")], tmp_path)
    two = json.loads(out.read_text())
    # at one rank every model-parallel type is one full shard with the same kernel: one reference for them
    one = {kind: measure(kind, 1, str(tmp_path / "runs1" / kind)) for kind in ("data_parallel", "row_wise")}

    for kind in KINDS:
        assert_same_run(one["data_parallel" if kind == "data_parallel" else "row_wise"], two[kind], kind)
    # and the sharded evaluation is the one-process evaluation (same weights, unsharded model, plain scoring)
    for kind, result in one.items():
        plain = plain_test_metrics(parity_config(kind, 1, ""), result["checkpoint"])
        assert plain == pytest.approx(result["test"], abs=1e-9), kind
    # the parity is between runs that learn (the epoch loss falls), not runs that stand still
    for kind in KINDS:
        assert two[kind]["history"][1]["train_loss"] < two[kind]["history"][0]["train_loss"] - 0.5, kind
    # and the 2-rank table really was split the way the test claims
    shards = {kind: two[kind]["sharding"]["shards"] for kind in KINDS}
    assert {s["rank"] for s in shards["row_wise"]} == {0, 1}
    assert all(s["offsets"][1] == 0 for s in shards["row_wise"])
    assert len(shards["table_wise"]) == 1
    assert {s["rank"] for s in shards["column_wise"]} == {0, 1}
    assert all(s["offsets"][0] == 0 for s in shards["column_wise"])
    assert two["data_parallel"]["sharding"]["sharding_type"] == "data_parallel"
    assert all(two[k]["sharding"]["sharding_type"] == k for k in KINDS)


def measure(kind: str, world_size: int, run_dir: str) -> dict[str, Any]:
    from pipeline.train.distributed import init_distributed, teardown

    ctx = init_distributed("cpu")  # a world of one in this process, or torchrun's group in a worker
    try:
        grads = first_step_grad_norms(parity_config(kind, world_size, run_dir))
    finally:
        teardown(ctx)
    return {**run_recorded(parity_config(kind, world_size, run_dir)), "grad_norms": grads}


def test_sharded_evaluation_scores_every_user_once_on_every_world_size() -> None:
    """Evaluation batches: every user exactly once; every rank gets a batch at every step (a rank left
    without rows in the last global batch evaluates one padding row, marked invalid)."""
    import numpy as np

    from pipeline.train.evaluate import _eval_rows
    from pipeline.train.presets import tiny
    from pipeline.train.run import build_batches, load_data

    cfg = tiny()
    data = load_data(cfg)
    for world in (1, 2, 3, 4):
        batches = build_batches(cfg, data)["test"]
        batches.batch_size = 5
        batches.rows = batches.rows[: 2 * 5 * world + 1]  # the last global batch: 1 row for `world` ranks
        per_rank = [list(_eval_rows(batches, rank, world)) for rank in range(world)]
        assert len({len(steps) for steps in per_rank}) == 1  # the same number of steps on every rank
        valid = np.concatenate([rows[:count] for steps in per_rank for rows, count in steps])
        assert sorted(valid.tolist()) == sorted(batches.rows.tolist())
        assert all(len(rows) >= 1 for steps in per_rank for rows, _ in steps)


def _worker(out: str, run_root: str) -> None:
    """torchrun entry: the 2-rank side of the parity test, every sharding type in one launch."""
    from pipeline.train.distributed import init_distributed, teardown

    ctx = init_distributed("cpu")  # the process group outlives the runs below (run() does not own it)
    results = {kind: measure(kind, ctx.world_size, f"{run_root}/{kind}") for kind in KINDS}
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(results))
    teardown(ctx)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
