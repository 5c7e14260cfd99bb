"""Per-rank memory of a row-wise sharded item table, 1 rank vs 2 ranks, and the training step time per rank.

    python benchmarks/bench_sharding.py                      # 20M x 64 table, 1 and 2 ranks (gloo, CPU)
    python benchmarks/bench_sharding.py --rows 2000000 --steps 5

Each world size is one `torchrun` launch of this file. Each rank builds the model through
pipeline/train/parallelize.py (meta device -> DMP row_wise, fused row-wise Adagrad -> FSDP2 blocks; the
kernel's own uniform init, so that building a 5 GB table takes seconds), then trains `--steps` steps on
random sequences of ids drawn from the whole table with the real Trainer.train_step, and reports:
  table MB      bytes of this rank's table shard(s) (weights) + the fused optimizer's state
  RSS +MB       growth of the process's resident memory while the model was built
  step ms       median wall time of a training step on this rank (after 2 warm-up steps)
Expect the table per rank at 2 ranks to be half of 1 rank (20M x 64 x 4 B = 5.12 GB). Row-wise Adagrad
keeps one float per row (80 MB for 20M rows); fused Adam (CUDA) would add 2 x 5.12 GB of moments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class FixedBatches:
    """The Trainer's TrainData over a list of prepared batches (the timed loop calls train_step itself)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start_batch: int = 0):
        return iter(self.batches[start_batch:])

    def state_dict(self) -> dict:
        return {"epoch": 0, "batch": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def worker(args: argparse.Namespace) -> None:
    import psutil
    import torch
    from torchrec import KeyedJaggedTensor

    from model.loss import NegativeSampler
    from pipeline.data.collate import Batch
    from pipeline.train.builder import build_parallel_model
    from pipeline.train.config import TrainConfig
    from pipeline.train.distributed import all_reduce_sum, init_distributed, teardown
    from pipeline.train.presets import tiny
    from pipeline.train.trainer import DistInfo, Trainer

    ctx = init_distributed("cpu")
    cfg = tiny()
    cfg.model = dataclasses.replace(
        cfg.model,
        num_items=args.rows,
        embedding_dim=args.dim,
        dqk=args.dim,
        dv=args.dim,
        input_dropout=0.0,
        linear_dropout=0.0,
    )
    cfg.parallel.sharding_types = ("row_wise",)
    cfg.parallel.embedding_optimizer = "rowwise_adagrad"
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    pm = build_parallel_model(
        cfg.model, cfg.parallel, cfg.optim, ctx.device, cfg.seed, batch_size=args.batch, init_table=False
    )
    build_s = time.perf_counter() - t0
    rss1 = proc.memory_info().rss
    table = pm.dmp.state_dict()["item_embedding.embeddings.item_table.weight"]
    weight_bytes = sum(s.tensor.numel() * s.tensor.element_size() for s in table.local_shards())
    state = pm.optimizer.state_dict()["state"]["fused.item_embedding.embeddings.item_table.weight"]
    optim_bytes = sum(
        s.tensor.numel() * s.tensor.element_size() for v in state.values() for s in v.local_shards()
    )
    rows = [list(s["sizes"]) for s in pm.table_sharding()["shards"] if s["rank"] == ctx.rank]

    g = torch.Generator().manual_seed(1000 + ctx.rank)
    lengths = torch.randint(args.length // 2, args.length + 1, (args.batch,), generator=g)

    def batch() -> Batch:
        n = int(lengths.sum())
        items = torch.randint(1, args.rows, (n,), generator=g)
        times = torch.cumsum(torch.randint(1, 10**5, (n,), generator=g), 0) + 1_700_000_000
        seq = KeyedJaggedTensor.from_lengths_sync(
            ["item_id", "timestamp"], torch.cat([items, times]), torch.cat([lengths, lengths]).int()
        )
        return Batch(seq=seq, user_ids=torch.arange(args.batch))

    batches = [batch() for _ in range(args.steps + 2)]
    trainer = Trainer(
        model=pm.model,
        optimizer=pm.optimizer,
        sampler=NegativeSampler(args.negatives, "shared", 1, args.rows),
        data=FixedBatches(batches),
        evaluate=lambda split: {},
        cfg=TrainConfig(epochs=1, seed=0, progress=False),
        dist=DistInfo(ctx.rank, ctx.world_size, ctx.device, all_reduce_sum),
    )
    times = []
    for b in batches:
        t = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - t)
    result = {
        "world_size": ctx.world_size,
        "rank": ctx.rank,
        "shard_rows_cols": rows,
        "table_MB": weight_bytes / 1e6,
        "optim_MB": optim_bytes / 1e6,
        "rss_growth_MB": (rss1 - rss0) / 1e6,
        "build_s": build_s,
        "step_ms": 1000 * statistics.median(times[2:]),
    }
    Path(args.out, f"w{ctx.world_size}-r{ctx.rank}.json").write_text(json.dumps(result))
    teardown(ctx)


def launch(world_size: int, args: argparse.Namespace, out: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world_size),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        __file__,
        "--worker",
        "--out",
        out,
        "--rows",
        str(args.rows),
        "--dim",
        str(args.dim),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--negatives",
        str(args.negatives),
        "--steps",
        str(args.steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="users per rank per step")
    p.add_argument("--length", type=int, default=50, help="longest history (lengths uniform in [L/2, L])")
    p.add_argument("--negatives", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"item table {args.rows:,} x {args.dim} fp32 = {args.rows * args.dim * 4 / 1e6:,.0f} MB; "
        f"{args.batch} users/rank, histories <= {args.length}, {args.negatives} shared negatives, "
        f"{args.threads} thread(s)/rank, gloo on CPU"
    )
    print(
        f"{'ranks':>5} {'rank':>4} {'shard rows x cols':>20} {'table MB':>9} {'optim MB':>9} {'RSS +MB':>8} "
        f"{'build s':>8} {'step ms':>8}"
    )
    with tempfile.TemporaryDirectory() as out:
        for world in (int(w) for w in args.world_sizes.split(",")):
            launch(world, args, out)
            for rank in range(world):
                r = json.loads(Path(out, f"w{world}-r{rank}.json").read_text())
                shard = " + ".join(f"{a:,} x {b}" for a, b in r["shard_rows_cols"])
                print(
                    f"{world:>5} {rank:>4} {shard:>20} {r['table_MB']:>9,.0f} {r['optim_MB']:>9,.1f} "
                    f"{r['rss_growth_MB']:>8,.0f} {r['build_s']:>8.1f} {r['step_ms']:>8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
