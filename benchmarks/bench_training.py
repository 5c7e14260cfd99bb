"""Whole training jobs, anchor recipe against ours: real `fuxi train` runs on the whole machine.

bench_throughput.py section 4 times single training steps on one thread. This benchmark times what a
user runs: `fuxi train` on MovieLens-100K (validated protocol, B=128, 128 per-position negatives), each
recipe using every core its own way, and reports training samples/s (users per epoch / training seconds
per epoch; evaluation excluded, as `seconds_per_epoch` in the run report):

  anchor        the official recipe: reference core, torch dropout, every batch padded to 211, negatives
                looked up as sampled, fp32; one process, torch's default intra-op threads (all cores), as
                the official code
  reference     the reference core and torch dropout on one group per batch (padded to the batch's
                longest row), fp32
  defaults      `fuxi train --preset ml-100k` with no overrides (fast core, 4 length groups, amp=auto:
                the precision its start-up probe chose is printed beside it)
  fast          the fast settings spelled out as overrides (model.kernel=fast, model.length_buckets=4), fp32
  ours          model.kernel=fast, 4 length groups, de-duplicated negatives + fused loss, amp=bf16;
                one process, all cores
  ours-ranks    the same on --nproc data-parallel ranks of one thread each (torchrun, gloo, FSDP2 blocks,
                replicated table), batch_size = 128 / nproc per rank so the global batch stays 128

Rounds alternate the recipes (anchor, ours, ours-ranks, anchor, ...) so the machine's drift hits all of
them; the figure is the median over rounds of each run's mean s/epoch.

    .venv/bin/python benchmarks/bench_training.py --data path/to/movielens-100k/ratings.parquet
    .venv/bin/python benchmarks/bench_training.py --data ... --epochs 3 --rounds 3 --nproc 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 128
COMMON = [
    "--preset",
    "ml-100k",
    "--set",
    "tracking.enabled=false",
    "--set",
    "data.protocol=validated",
    "--set",
    "progress=false",
]
ANCHOR = [
    "model.kernel=reference",
    "model.dropout_impl=torch",
    "model.length_buckets=1",
    "model.padding=fixed",
    "loss.dedup_negatives=false",
    "amp=none",
]
OURS = ["model.kernel=fast", "model.length_buckets=4", "amp=bf16"]


DEFAULTS: list[str] = []  # `fuxi train --preset ml-100k` as shipped: fast core, 4 length groups, amp=auto
# reference core and dropout, one group (fp32)
REFERENCE = ["model.kernel=reference", "model.dropout_impl=torch", "model.length_buckets=1", "amp=none"]
FAST = ["model.kernel=fast", "model.length_buckets=4", "amp=none"]  # the fast recipe in fp32


def recipes(nproc: int) -> dict[str, tuple[int, list[str]]]:
    """name -> (ranks, overrides)."""
    out = {
        "anchor": (1, ANCHOR),
        "reference": (1, REFERENCE),
        "defaults": (1, DEFAULTS),
        "fast": (1, FAST),
        "ours": (1, OURS),
    }
    if nproc > 1:
        if BATCH % nproc:
            raise SystemExit(f"--nproc must divide the batch of {BATCH}")
        out[f"ours-{nproc}ranks"] = (nproc, [*OURS, f"batch_size={BATCH // nproc}"])
    return out


def train_once(seq: Path, ranks: int, overrides: list[str], epochs: int, seed: int, work: Path) -> dict:
    report = work / "report.json"
    args = [
        *COMMON,
        "--data",
        str(seq),
        "--set",
        f"epochs={epochs}",
        "--set",
        f"output_dir={work / 'runs'}",
        "--report-json",
        str(report),
        "--set",
        f"seed={seed}",
    ]
    for o in overrides:
        args += ["--set", o]
    if ranks == 1:
        cmd = [sys.executable, "-m", "jobs.cli", "train", *args]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # all cores
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "jobs.cli",
            "train",
            *args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    r = json.loads(report.read_text())
    return {
        "seconds_per_epoch": r["seconds_per_epoch"],
        "users": r["users"]["train"],
        "wall_seconds": time.perf_counter() - t0,
        "test_ndcg_at_10": r["test"]["ndcg_at_10"],
        "amp": r.get("amp", {}),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="MovieLens-100K ratings (any layout `fuxi data prepare` reads)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=os.cpu_count() or 1, help="ranks of the data-parallel row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument(
        "--recipes",
        help="comma-separated subset of anchor,reference,defaults,fast,ours,ours-Nranks "
        "(the anchor always runs: every ratio is against it)",
    )
    args = p.parse_args(argv)

    from tqdm import tqdm

    from pipeline.data.readers import prepare_sequences

    todo = recipes(args.nproc)
    if args.recipes:
        keep = ["anchor", *(r for r in args.recipes.split(",") if r != "anchor")]
        todo = {name: todo[name] for name in keep}
    per_run: dict[str, list[dict]] = {name: [] for name in todo}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        work = Path(tmp)
        seq = work / "ml-100k.sequences.parquet"
        prepare_sequences(args.data, seq)
        bar = tqdm(total=args.rounds * len(todo), desc="training runs")
        for _ in range(args.rounds):
            for name, (ranks, overrides) in todo.items():
                bar.set_postfix_str(name)
                per_run[name].append(train_once(seq, ranks, overrides, args.epochs, args.seed, work))
                bar.update()
        bar.close()

    cores = os.cpu_count()
    print(
        f"\nMovieLens-100K, validated protocol, B={BATCH}, {args.epochs} epochs a run, {args.rounds} rounds, "
        f"{cores} cores; s/epoch excludes evaluation"
    )
    print(f"{'recipe':16s} {'ranks':>5s} {'s/epoch':>8s} {'samples/s':>10s} {'x anchor':>9s}  amp chosen")
    summary = {}
    for name, runs in per_run.items():
        spe = statistics.median(r["seconds_per_epoch"] for r in runs)
        summary[name] = {
            "ranks": todo[name][0],
            "seconds_per_epoch": spe,
            "samples_per_s": runs[0]["users"] / spe,
            "runs": runs,
        }
    for name, s in summary.items():
        ratio = summary["anchor"]["seconds_per_epoch"] / s["seconds_per_epoch"]
        s["x_anchor"] = ratio
        chosen = ", ".join(dict.fromkeys(r["amp"].get("resolved", "?") for r in s["runs"]))
        print(
            f"{name:16s} {s['ranks']:5d} {s['seconds_per_epoch']:8.2f} "
            f"{s['samples_per_s']:10.1f} {ratio:9.2f}  {chosen}"
        )
        for r in s["runs"]:
            if r["amp"].get("probe_fp32_ms") is not None:
                print(
                    f"{'':16s} probe: {r['amp']['reason']} ({r['amp']['probe_fp32_ms']:.1f} ms fp32, "
                    f"{r['amp']['probe_bf16_ms']:.1f} ms bf16 a step)"
                )
    report = {
        "epochs": args.epochs,
        "rounds": args.rounds,
        "cores": cores,
        "batch": BATCH,
        "recipes": summary,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
