"""S3 against local disk, same run, same data: `build-sequences` events/s and streamed training tokens/s.

    .venv/bin/python benchmarks/bench_storage.py [--events 1000000] [--users 20000] [--epochs 2]
        [--streams pyarrow:0,pyarrow:1,pyarrow:2,ray] [--out benchmarks/results/bench_storage]

S3 is SeaweedFS on 127.0.0.1 (infra/seaweedfs.py), started and stopped by this script; the clients are the
project's own (storage/), configured from the AWS_* variables it sets.
  logs     synthetic logs (pipeline.data.synth_logs) on local disk, copied to s3://<bucket>/logs
  build    `build_sequences` (Ray Data scatter + gather tasks on a local Ray): logs -> shards, local -> local
           and s3 -> s3, alternated `--build-repeats` times after one untimed warm-up build (Ray worker
           start-up and imports); events/s of each, the best of the repeats
  stream   the trainer's input path: `ShardBatches` over the built shard directory (`--streams`: the pyarrow
           backend reading 0, 1, 2 segments ahead, and the Ray Data backend), consumed by
           `Trainer.train_epoch` of a small FuXi-alpha model (the tiny preset, CPU). A thin wrapper around
           the stream times each step's wait for its next batch (the time the loop spends in `next()`) and the
           step itself (the time between two batches). Steady state: every step after the first
           `--warmup-steps`. tokens/s = history tokens / (waits + steps). Local and S3 epochs alternate,
           with the same seed (the same batches, checked, and the same model); "same step times" counts
           each step's least disturbed time on both sides, so that the two differ only by their waits.
  read     every segment of one epoch read in turn with nothing ahead: how long a step would wait per
           segment without prefetch, against how long training on a segment takes.
Ratios are S3 / local measured in this run. Results: printed, and <out>/bench_storage.json and
<out>/bench_storage.png (benchmarks/results/ is gitignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # infra/ is a folder of the repo, not installed
from infra.seaweedfs import start as start_seaweedfs  # noqa: E402
from model.loss import NegativeSampler
from model.recommender import build_model
from pipeline.data.build import BuildConfig, build_sequences
from pipeline.data.schema import ITEM_FEATURE
from pipeline.data.stream import Backend, ShardBatches, ensure_ray, ray_session, read_segment
from pipeline.data.synth_logs import LogConfig, write_logs
from pipeline.train.presets import get_preset
from pipeline.train.trainer import Trainer

WHERE = ("local", "s3")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TimedStream:
    """The stream as the trainer sees it, timing the loop around it: `wait` is the time the trainer spends
    in `next()` (reading, decoding, collating whatever the prefetch has not), `step` the time between
    receiving a batch and asking for the next one (the training step)."""

    def __init__(self, stream: ShardBatches) -> None:
        self.stream = stream
        self.waits: list[float] = []
        self.steps: list[float] = []
        self.tokens: list[int] = []
        self.first_of_epoch: list[bool] = []
        self.digest = hashlib.sha256()  # of every batch's user ids, in order: the same data on both stores

    def __len__(self) -> int:
        return len(self.stream)

    def epoch(self, epoch: int = 0, start_batch: int | None = None):
        it = iter(self.stream.epoch(epoch, start_batch))
        first = True
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            t1 = time.perf_counter()
            self.waits.append(t1 - t0)
            self.tokens.append(int(batch.seq[ITEM_FEATURE].lengths().sum()))
            self.digest.update(batch.user_ids.numpy().tobytes())
            self.first_of_epoch.append(first)
            first = False
            yield batch
            self.steps.append(time.perf_counter() - t1)


def parse_stream(name: str) -> tuple[Backend, int]:
    """`pyarrow:N` (the pyarrow backend reading N segments ahead) or `ray` (Ray Data's own read-ahead)."""
    backend, _, depth = name.partition(":")
    return Backend(backend), int(depth or 0)


def trainer_over(
    shards: str, num_items: int, args: argparse.Namespace, name: str
) -> tuple[Trainer, TimedStream]:
    """The tiny preset's model and a `Trainer` reading `shards` through the timed stream."""
    cfg = get_preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, num_items=num_items)
    cfg.data.protocol = "anchor"
    cfg.epochs, cfg.progress, cfg.seed = args.epochs, False, 0
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.98))
    sampler = NegativeSampler(cfg.loss.num_negatives, cfg.loss.negatives, low=1, high=num_items)
    backend, prefetch = parse_stream(name)
    stream = ShardBatches(
        shards,
        cfg.batch_size,
        cfg.model.max_sequence_length,
        drop_last_items=1,
        shuffle=True,
        seed=0,
        backend=backend,
        window_units=args.window_units,
        prefetch=prefetch,
    )
    timed = TimedStream(stream)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        sampler=sampler,
        data=timed,  # type: ignore[arg-type]
        evaluate=lambda split: {},
        cfg=cfg,
    )
    return trainer, timed


def train_streams(shards: dict[str, str], num_items: int, args: argparse.Namespace, name: str) -> dict:
    """`args.epochs` epochs on each store, local and S3 epochs alternating (so that a change in the
    machine's load hits both); per-step waits and step times of each."""
    runs = {w: trainer_over(shards[w], num_items, args, name) for w in WHERE}
    losses: dict[str, list[float]] = {w: [] for w in WHERE}
    for e in range(args.epochs):
        for w in WHERE:
            losses[w].append(runs[w][0].train_epoch(e))
    out = {w: step_stats(runs[w][1], args.warmup_steps) | {"losses": losses[w]} for w in WHERE}
    # The same batches through the same model are the same work on both stores: step k's least disturbed
    # time, min over the two, is its compute. With it as both sides' step, tokens/s differ only by waits
    # (the shared machine's load moves step times by more than the store does).
    steps = np.minimum(*(np.array(runs[w][1].steps) for w in WHERE))[args.warmup_steps :]
    for w in WHERE:
        timed = runs[w][1]
        waits = np.array(timed.waits)[args.warmup_steps :]
        tokens = np.array(timed.tokens)[args.warmup_steps :]
        out[w]["tokens_per_s_same_steps"] = float(tokens.sum() / (steps.sum() + waits.sum()))
    return out


def step_stats(timed: TimedStream, warmup: int) -> dict:
    waits, steps, tokens = np.array(timed.waits), np.array(timed.steps), np.array(timed.tokens)
    first = np.array(timed.first_of_epoch)
    steady = slice(warmup, None)
    busy = waits[steady].sum() + steps[steady].sum()
    inner = ~first[steady]  # within an epoch: not the epoch's first batch
    return {
        "steps": len(waits),
        "steps_per_epoch": len(timed),
        "batches_digest": timed.digest.hexdigest(),
        "tokens_per_s": float(tokens[steady].sum() / busy),
        "tokens_per_s_within_epochs": float(
            tokens[steady][inner].sum() / (waits[steady][inner].sum() + steps[steady][inner].sum())
        ),
        "step_seconds": float(steps.sum()),
        # robust to the shared machine's preemptions: every step at this side's median step time
        "tokens_per_s_median_steps": float(
            tokens[steady].sum() / (len(steps[steady]) * np.median(steps[steady]) + waits[steady].sum())
        ),
        "wait_share": float(waits[steady].sum() / busy),
        "wait_ms_p50": float(np.percentile(waits[steady], 50) * 1e3),
        "wait_ms_p99": float(np.percentile(waits[steady], 99) * 1e3),
        "wait_ms_max": float(waits[steady].max() * 1e3),
        "epoch_start_wait_ms": [float(x * 1e3) for x in waits[first]],
        "step_ms_p50": float(np.percentile(steps[steady], 50) * 1e3),
        "waits_ms": [float(x * 1e3) for x in waits],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=3_000)
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--row-group-rows", type=int, default=2048, help="users per shard row group (build)")
    ap.add_argument("--build-repeats", type=int, default=3, help="timed builds per store, alternated")
    ap.add_argument(
        "--streams",
        default="pyarrow:0,pyarrow:1,pyarrow:2,ray",
        help="ShardBatches settings to run: pyarrow:N (N segments read ahead) and/or ray; '' for none",
    )
    ap.add_argument("--window-units", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=2, help="local Ray's CPUs")
    ap.add_argument("--out", default="benchmarks/results/bench_storage")
    args = ap.parse_args()
    streams = [s for s in args.streams.split(",") if s]  # "": the build only
    for name in streams:
        parse_stream(name)  # a bad name fails before anything starts
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    res: dict = {"config": vars(args), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}

    # ray_session: SIGTERM / SIGHUP end the run through `finally` too, so Ray and weed never outlive it
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp, ray_session():
        server = start_seaweedfs(Path(tmp) / "seaweedfs")
        try:
            os.environ.update(server.env())  # before Ray starts: its workers inherit the AWS_* variables
            log(f"seaweedfs: s3://{server.bucket} at {server.endpoint}, ready in {server.startup_s:.1f}s")
            ensure_ray(num_cpus=args.num_cpus)
            run(args, streams, Path(tmp), f"s3://{server.bucket}", res)
        finally:
            server.stop()
    res["total_seconds"] = time.perf_counter() - started
    (out / "bench_storage.json").write_text(json.dumps(res, indent=1))
    summary(args, res, out)
    plot(res, out / "bench_storage.png")


def run(args: argparse.Namespace, streams: list[str], tmp: Path, bucket: str, res: dict) -> None:
    logs = LogConfig(
        num_users=args.users,
        num_items=args.items,
        num_days=args.days,
        num_events=args.events,
        rows_per_part=max(args.events // (2 * args.days), 1),
    )
    t0 = time.perf_counter()
    write_logs(logs, tmp / "logs", progress=False)
    names = storage.copy_tree(str(tmp / "logs"), f"{bucket}/logs")
    size = sum(p.stat().st_size for p in (tmp / "logs").rglob("*") if p.is_file())
    log(
        f"logs: {args.events:,} events, {len(names)} files, {size / 2**20:.1f} MiB, copied to {bucket}/logs "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    cfg = BuildConfig(row_group_rows=args.row_group_rows)
    source = {"local": str(tmp / "logs"), "s3": f"{bucket}/logs"}
    shards = {"local": str(tmp / "seq"), "s3": f"{bucket}/seq"}
    t0 = time.perf_counter()
    build_sequences(source["local"], str(tmp / "warmup"), cfg, progress=False)
    log(f"build warm-up (Ray workers, imports): {time.perf_counter() - t0:.1f}s")
    seconds: dict[str, list[float]] = {w: [] for w in WHERE}
    for r in range(args.build_repeats):
        for where in WHERE:
            t0 = time.perf_counter()
            report = build_sequences(source[where], shards[where], cfg, progress=False)
            seconds[where].append(time.perf_counter() - t0)
            rate = report.ingest.rows_read / seconds[where][-1]
            log(
                f"build {r + 1}/{args.build_repeats} {where:5s}: {seconds[where][-1]:.1f}s, "
                f"{rate:,.0f} events/s ({report.users:,} users, {report.partitions} partitions)"
            )
    events = report.ingest.rows_read
    res["build"] = {w: {"seconds": seconds[w], "events_per_s": events / min(seconds[w])} for w in WHERE} | {
        "events": events,
        "users": report.users,
        "num_items": report.num_items,
    }

    res["stream"] = {}
    res["read"] = {w: read_only(shards[w]) for w in WHERE}
    for w in WHERE:
        r = res["read"][w]
        log(
            f"read only {w:5s}: {r['segments']} segments, {r['ms_per_segment']:.1f} ms each, "
            f"{r['mib_per_s']:.0f} MiB/s of Arrow data"
        )
    for name in streams:
        both = train_streams(shards, report.num_items, args, name)
        for where in WHERE:
            r = both[where]
            res["stream"][f"{where}/{name}"] = r
            log(
                f"stream {where:5s} {name}: {r['steps']} steps, "
                f"{r['tokens_per_s']:,.0f} tokens/s, wait {r['wait_share']:.1%} of the loop "
                f"(p50 {r['wait_ms_p50']:.2f} ms, p99 {r['wait_ms_p99']:.1f} ms, "
                f"max {r['wait_ms_max']:.1f} ms), step p50 {r['step_ms_p50']:.1f} ms"
            )
        if len({res["stream"][f"{w}/{name}"]["batches_digest"] for w in WHERE}) != 1:
            raise RuntimeError(f"{name}: the S3 and local streams yielded different batches")


def read_only(shards: str) -> dict:
    """Every segment of epoch 0 read in turn (`read_segment`, no prefetch, no training): what a step would
    wait for a segment if nothing were read ahead."""
    stream = ShardBatches(shards, 64, 50, drop_last_items=1, seed=0, backend=Backend.PYARROW)
    specs, _ = stream.segment_specs(0)
    t0 = time.perf_counter()
    nbytes = sum(read_segment(spec).nbytes for spec in specs)
    sec = time.perf_counter() - t0
    return {
        "segments": len(specs),
        "seconds": sec,
        "ms_per_segment": sec / len(specs) * 1e3,
        "mib_per_s": nbytes / 2**20 / sec,
        "users_per_segment": stream.num_rows() / len(specs),
    }


def summary(args: argparse.Namespace, res: dict, out: Path) -> None:
    b = res["build"]
    print(
        f"\n{b['events']:,} events -> {b['users']:,} users; {res['cpus']} CPUs, local Ray with "
        f"{args.num_cpus}; tiny preset, {args.epochs} epochs "
        f"({res['total_seconds']:.0f}s in all)"
    )
    print(f"{'':42s} {'local':>12s} {'s3':>12s} {'s3/local':>9s}")
    lb, sb = b["local"]["events_per_s"], b["s3"]["events_per_s"]
    print(f"{'build-sequences (events/s)':42s} {lb:12,.0f} {sb:12,.0f} {sb / lb:9.3f}")
    for key in [k.split("/", 1)[1] for k in res["stream"] if k.startswith("local/")]:
        loc, s3 = res["stream"][f"local/{key}"], res["stream"][f"s3/{key}"]
        name = f"stream + train, {key} (tokens/s)"
        print(
            f"{name:42s} {loc['tokens_per_s']:12,.0f} {s3['tokens_per_s']:12,.0f} "
            f"{s3['tokens_per_s'] / loc['tokens_per_s']:9.3f}"
        )
        name = "  same step times, own waits"
        a, c = loc["tokens_per_s_same_steps"], s3["tokens_per_s_same_steps"]
        print(f"{name:42s} {a:12,.0f} {c:12,.0f} {c / a:9.3f}")
        name = "  median step times, own waits"
        a, c = loc["tokens_per_s_median_steps"], s3["tokens_per_s_median_steps"]
        print(f"{name:42s} {a:12,.0f} {c:12,.0f} {c / a:9.3f}")
        name = "  within epochs (no epoch-start read)"
        a, c = loc["tokens_per_s_within_epochs"], s3["tokens_per_s_within_epochs"]
        print(f"{name:42s} {a:12,.0f} {c:12,.0f} {c / a:9.3f}")
        print(
            f"{'  share of the loop waiting on data':42s} {loc['wait_share']:12.1%} {s3['wait_share']:12.1%}"
        )
        print(f"{'  wait p99 (ms)':42s} {loc['wait_ms_p99']:12.2f} {s3['wait_ms_p99']:12.2f}")
        starts = [", ".join(f"{x:.0f}" for x in r["epoch_start_wait_ms"]) for r in (loc, s3)]
        print(f"{'  epoch-start waits (ms)':42s} {starts[0]:>12s} {starts[1]:>12s}")
    if not res["stream"]:
        print(f"results: {out / 'bench_storage.json'}, {out / 'bench_storage.png'}")
        return
    first = res["stream"][next(iter(res["stream"]))]
    train_ms = first["step_ms_p50"] * res["read"]["s3"]["users_per_segment"] / get_preset("tiny").batch_size
    read_ms = res["read"]["s3"]["ms_per_segment"]
    users = res["read"]["s3"]["users_per_segment"]
    print(
        f"\none segment ({users:,.0f} users): read {read_ms:.0f} ms from S3, "
        f"{res['read']['local']['ms_per_segment']:.0f} ms from disk (in turn, nothing ahead); trained on "
        f"in {train_ms:,.0f} ms: with a segment read ahead, reads could be {train_ms / read_ms:.0f}x "
        "slower before a step waits"
    )
    print(f"results: {out / 'bench_storage.json'}, {out / 'bench_storage.png'}")


def plot(res: dict, path: Path) -> None:
    """Left: S3 / local per stage (streams measured, and with the same step times). Right: each run's
    per-step waits, largest first (how many steps waited longer than a given time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.2, 2]})
    keys = [k.split("/", 1)[1] for k in res["stream"] if k.startswith("local/")]

    def ratio(key: str, field: str) -> float:
        return res["stream"][f"s3/{key}"][field] / res["stream"][f"local/{key}"][field]

    x = np.arange(len(keys) + 1)
    build = res["build"]["s3"]["events_per_s"] / res["build"]["local"]["events_per_s"]
    ax0.bar([0], [build], 0.6, color="#888", label="build events/s")
    ax0.bar(x[1:] - 0.17, [ratio(k, "tokens_per_s") for k in keys], 0.34, color="#4a7", label="tokens/s")
    ax0.bar(
        x[1:] + 0.17,
        [ratio(k, "tokens_per_s_same_steps") for k in keys],
        0.34,
        color="#9cd",
        label="tokens/s, same step times",
    )
    ax0.set_xticks(x, ["build"] + [f"stream\n{k}" for k in keys], fontsize=8)
    ax0.axhline(1.0, color="k", lw=0.8)
    ax0.axhline(0.9, color="r", lw=0.8, ls="--", label="target 0.9x (stream)")
    ax0.set_ylabel("S3 / local disk")
    ax0.set_title("S3 (SeaweedFS, 127.0.0.1) / local disk, same run")
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, ncol=2)
    for key, r in res["stream"].items():
        waits = np.sort(np.maximum(r["waits_ms"], 1e-3))[::-1]
        ax1.plot(
            np.arange(1, len(waits) + 1), waits, lw=1, label=key, ls="-" if key.startswith("s3") else ":"
        )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("steps (largest wait first)")
    ax1.set_ylabel("wait for the next batch (ms)")
    ax1.set_title("per-step waits of the training loop on its input")
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
