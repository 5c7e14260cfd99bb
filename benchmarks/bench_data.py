"""One-run data pipeline benchmark: rates of each stage, printed as ratios.

    .venv/bin/python benchmarks/bench_data.py [--events 5000000] [--out benchmarks/results/bench_data]

Stages on the same synthetic logs / shards:
  raw scan    pyarrow read of every raw part file (rows/s)
  build       `build_sequences` (Ray Data scatter + gather tasks), events/s
  stream      one epoch as `Batch` (KJT): Ray Data backend vs the pyarrow reference
              (interactions/s, batches/s)
  trainer     `Trainer.train_step` of a small FuXi-alpha model on streamed batches (interactions/s)
Results: printed, and written to <out>/bench_data.json (benchmarks/results/ is gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from model.config import ModelConfig
from model.loss import NegativeSampler
from model.recommender import build_model
from pipeline.data.build import BuildConfig, build_sequences
from pipeline.data.schema import ITEM_FEATURE
from pipeline.data.stream import Backend, ShardBatches, ensure_ray
from pipeline.data.synth_logs import LogConfig, write_logs
from pipeline.train.config import DataConfig, TrainConfig
from pipeline.train.trainer import Trainer


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def stream_pass(seq: Path, backend: Backend, batch_size: int, max_len: int) -> dict:
    s = ShardBatches(seq, batch_size, max_len, drop_last_items=0, shuffle=True, seed=0, backend=backend)
    t0 = time.perf_counter()
    batches = inter = 0
    for b in s.epoch(0):
        batches += 1
        inter += int(b.seq[ITEM_FEATURE].lengths().sum())
    sec = time.perf_counter() - t0
    return {
        "seconds": sec,
        "batches": batches,
        "interactions": inter,
        "interactions_per_s": inter / sec,
        "batches_per_s": batches / sec,
        "sequences": s.num_rows(),
    }


def trainer_rate(seq: Path, num_items: int, batch_size: int, max_len: int, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_items=num_items,
        embedding_dim=50,
        num_layers=2,
        max_sequence_length=max_len,
        padded_length=max_len + 11,
    )
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    sampler = NegativeSampler(128, "shared", low=1, high=num_items)
    stream = ShardBatches(
        seq, batch_size, max_len, drop_last_items=1, shuffle=True, seed=0, backend=Backend.RAY
    )
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        sampler=sampler,
        data=stream,
        evaluate=lambda split: {},
        cfg=TrainConfig(data=DataConfig(protocol="anchor"), epochs=1, seed=0, progress=False),
    )
    it = stream.epoch(0)
    trainer.train_step(next(it))  # warm-up (allocations, first Ray task)
    inter, step_seconds = 0, 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        step_seconds += time.perf_counter() - t1
        inter += int(batch.seq[ITEM_FEATURE].lengths().sum())
    wall = time.perf_counter() - t0
    return {
        "steps": steps,
        "interactions": inter,
        "interactions_per_s": inter / wall,
        "train_step_interactions_per_s": inter / step_seconds,
        "wall_seconds": wall,
        "loader_share_of_wall": 1 - step_seconds / wall,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=50, help="history length of the streamed KJT batches")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results/bench_data")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs, seq = out / "logs", out / "seq"
    ensure_ray(num_cpus=os.cpu_count())
    res: dict = {"config": vars(args), "cpus": os.cpu_count()}

    cfg = LogConfig(num_users=args.users, num_items=args.items, num_days=args.days, num_events=args.events)
    _, sec = timed(lambda: write_logs(cfg, logs, progress=False))
    res["synth_logs"] = {"seconds": sec, "events_per_s": args.events / sec}

    files = sorted(logs.glob("date=*/*.parquet"))
    rows, sec = timed(
        lambda: sum(pq.read_table(f, columns=["user_id", "item_id", "timestamp"]).num_rows for f in files)
    )
    res["raw_scan"] = {"seconds": sec, "rows_per_s": rows / sec}

    report, sec = timed(lambda: build_sequences(logs, seq, BuildConfig(), progress=False))
    res["build"] = {
        "seconds": sec,
        "events_per_s": report.ingest.rows_read / sec,
        "users": report.users,
        "interactions": report.interactions,
        "partitions": report.partitions,
    }

    res["stream_pyarrow"] = stream_pass(seq, Backend.PYARROW, args.batch_size, args.max_len)
    stream_pass(seq, Backend.RAY, args.batch_size, args.max_len)  # warm Ray workers (imports) once
    res["stream_ray"] = stream_pass(seq, Backend.RAY, args.batch_size, args.max_len)
    res["trainer"] = trainer_rate(seq, report.num_items, args.batch_size, args.max_len, args.train_steps)
    (out / "bench_data.json").write_text(json.dumps(res, indent=1))
    shutil.rmtree(logs)
    shutil.rmtree(seq)

    scan = res["raw_scan"]["rows_per_s"]
    rows_out = [
        ("raw pyarrow scan (rows/s)", scan),
        ("synthetic log generation (events/s)", res["synth_logs"]["events_per_s"]),
        ("sequence build, Ray Data tasks (events/s)", res["build"]["events_per_s"]),
        ("stream -> KJT, pyarrow reference (interactions/s)", res["stream_pyarrow"]["interactions_per_s"]),
        ("stream -> KJT, Ray Data (interactions/s)", res["stream_ray"]["interactions_per_s"]),
        (
            "trainer consumption, train_step incl. loading (interactions/s)",
            res["trainer"]["interactions_per_s"],
        ),
    ]
    print(
        f"\n{args.events:,} events, {res['build']['users']:,} users, {os.cpu_count()} CPUs; "
        f"batches of {args.batch_size} users, history <= {args.max_len}"
    )
    print(f"{'stage':66s} {'rate':>12s} {'/ raw scan':>11s}")
    for name, rate in rows_out:
        print(f"{name:66s} {rate:12,.0f} {rate / scan:11.4f}")
    ray_vs_ref = res["stream_ray"]["interactions_per_s"] / res["stream_pyarrow"]["interactions_per_s"]
    print(f"\nRay Data stream / pyarrow reference:       {ray_vs_ref:.3f}")
    print(
        f"Ray Data stream / trainer consumption:     "
        f"{res['stream_ray']['interactions_per_s'] / res['trainer']['interactions_per_s']:.1f}x"
    )
    print(f"sequence build / raw scan:                 {res['build']['events_per_s'] / scan:.4f}")
    print(f"loader share of the training loop's wall:  {res['trainer']['loader_share_of_wall']:.1%}")
    print(f"results: {out / 'bench_data.json'}")


if __name__ == "__main__":
    main()
