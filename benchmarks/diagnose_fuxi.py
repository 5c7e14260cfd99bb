"""Why FuXi-alpha trails HSTU on small data: residual-branch norms, gradients and ablation curves.

    python benchmarks/diagnose_fuxi.py norms --data path/to/ml-100k.parquet --users 300
    python benchmarks/diagnose_fuxi.py ablate --data path/to/ml-100k.parquet --users 300 --epochs 30 \
        --seeds 0 1 --variants official single_stage zero_w2 hstu
    python benchmarks/diagnose_fuxi.py buckets --data path/to/seq.parquet --preset auto \
        --set data.cut=2028-01-01 --set data.window_seconds=63072000

`norms` builds the model exactly as training does (the seeded dense template of
init_dense in pipeline/train/builder.py, the table's truncated normal) and, on a fixed batch in eval mode,
prints per block the RMS of: the block input x, the AMS output h, the MFFN stage-1 branch Linear(h), the
stage-1 sum o = x + Linear(h), the stage-2 branch SwiGLU(RMSNorm(o)) and the block output; and the
gradient norm of each weight group. It does this at init and after each of --steps optimizer steps
(the Trainer's own train_step). `ablate` trains whole `fuxi train`-equivalent runs (pipeline.train.run)
on the subsample for each variant and seed and prints the validation NDCG@10 curve and the test metric
at the validation-selected epoch. `buckets` counts, under a time split, the (target, history event) pairs
of the training, validation and test windows by time-gap bucket (model.layers.time_buckets, the keys a
target's prediction attends to: its last max_sequence_length events): pairs in buckets that training never
saw meet a temporal weight still at its init.

`--users N` writes a seeded subsample of N users of --data (same item rows, so the catalogue is
unchanged) under --work and trains on it; the split is the `validated` protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# named override sets; the base is the ml-100k preset (the official ML-1M recipe) on --data
VARIANTS: dict[str, list[str]] = {
    "official": ["model.ffn_out_init_scale=1.0"],  # the official code's stage-2 init
    "single_stage": ["model.ffn_single_stage=true"],  # the paper's "w/o MFFN"
    "zero_w2": ["model.ffn_out_init_scale=0.0"],  # the project default: stage 2 starts as identity
    "small_w2": ["model.ffn_out_init_scale=0.1"],
    "no_ts": ["model.channels=pos,sem", "model.ffn_out_init_scale=1.0"],
    "no_ts_zero_w2": ["model.channels=pos,sem", "model.ffn_out_init_scale=0.0"],
    "warmup": ["optim.warmup_steps=50", "model.ffn_out_init_scale=1.0"],
    "zero_w2_full": ["model.ffn_out_init_scale=0.0", "loss.negatives=full"],
    "zero_w2_cosine": ["model.ffn_out_init_scale=0.0", "optim.warmup_steps=20", "optim.schedule=cosine"],
    "hstu": ["model.architecture=hstu"],
    "sasrec": ["model.architecture=sasrec"],
    "esasrec": ["model.architecture=esasrec", "loss.negatives=per_position"],
}


def subsample(data_path: str, users: int, seed: int, work: Path) -> str:
    """A seeded subset of `users` rows of a sequence Parquet file (a path or URI), written under the local
    folder `work` (same metadata, same item rows: only users are dropped)."""
    import storage
    from pipeline.data.sequences import SequenceData, read_sequences, write_sequences

    data = read_sequences(data_path)
    if users <= 0 or users >= data.num_users:
        return data_path
    rows = np.sort(np.random.default_rng(seed).choice(data.num_users, users, replace=False))
    stem = Path(storage.name_of(data_path)).stem
    out = Path(storage.join(str(work), f"{stem}-{users}u-s{seed}.parquet", field="--data file name"))
    if not out.exists():
        sub = SequenceData(data.table.take(rows), data.num_items, dict(data.meta, subsample=[users, seed]))
        if data.vocab is not None:  # the metadata names a sidecar vocabulary file: put a copy beside out
            vocab = os.fspath(data.vocab)  # a local path, or a URI when --data is on a store
            name = storage.name_of(vocab)
            storage.copy_file(vocab, storage.join(str(work), name, field="fuxi.meta: vocab"))
        write_sequences(sub, out)
    return str(out)


def make_config(args: argparse.Namespace, data: str, overrides: list[str], seed: int):
    from pipeline.train.config import apply_overrides
    from pipeline.train.presets import get_preset

    cfg = get_preset(args.preset, data)
    cfg.data.protocol = "validated"
    cfg.seed = seed
    cfg.tracking.enabled = False
    cfg.progress = False
    cfg.output_dir = str(Path(args.work) / "runs")
    return apply_overrides(cfg, list(args.set or []) + overrides)


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


# ---------------------------------------------------------------------------------------------------
def cmd_norms(args: argparse.Namespace) -> None:
    from model.loss import NegativeSampler
    from model.recommender import build_model
    from pipeline.data.batches import SequenceBatches
    from pipeline.data.sequences import PROTOCOLS, read_sequences
    from pipeline.train.builder import init_dense
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import Trainer

    data_path = subsample(args.data, args.users, args.subsample_seed, Path(args.work))
    for variant in args.variants:
        cfg = make_config(args, data_path, VARIANTS[variant], args.seeds[0])
        data = read_sequences(cfg.data.source)
        cfg.model = dataclasses.replace(cfg.model, num_items=data.num_items)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        init_dense(model, cfg.model, cfg.seed)
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        drop = PROTOCOLS["validated"]["train"]
        train = SequenceBatches(data, drop, cfg.batch_size, cfg.model.max_sequence_length, True, cfg.seed)
        probe = next(iter(train.epoch(0)))  # a fixed batch for every measurement
        sampler = NegativeSampler(cfg.loss.num_negatives, cfg.loss.negatives, 1, data.num_items)
        trainer = Trainer(
            model,
            opt,
            sampler,
            train,
            lambda split: {},
            # the loop's defaults (validated, seed 0, constant lr) with this variant's loss
            TrainConfig(loss=cfg.loss, epochs=1, seed=0, progress=False),
        )
        print(f"\n## {variant} ({' '.join(VARIANTS[variant]) or 'official recipe'}), {data.num_users} users")
        block = model.encoder.blocks[0]
        if not hasattr(block, "ams"):  # HSTU: one attention branch per block, no AMS, no MFFN
            print(f"{type(block).__name__} has no AMS or MFFN: only x and out are measured, the rest is n/a")
        print(
            "| step | block | x | AMS h | stage-1 Linear(h) | o = x + Linear(h) | stage-2 SwiGLU | out "
            "| stage2/o | loss |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        steps_done, loss = 0, float("nan")
        grad_rows = []
        batches = iter(train.epoch(0))
        epoch = 0
        for target in [0, *args.steps]:
            while steps_done < target:
                try:
                    batch = next(batches)
                except StopIteration:
                    epoch += 1
                    batches = iter(train.epoch(epoch))
                    batch = next(batches)
                loss = trainer.train_step(batch)
                steps_done += 1
            stats = block_stats(model, probe)
            for i, s in enumerate(stats):
                ratio = s["stage2"] / s["o"] if s.get("stage2") is not None else None
                print(
                    f"| {target} | {i} | {s['x']:.3f} | {fmt(s.get('h'))} | {fmt(s.get('stage1'))} "
                    f"| {fmt(s.get('o'))} | {fmt(s.get('stage2'))} | {s['out']:.3f} | {fmt(ratio, 2)} "
                    f"| {loss:.3f} |"
                )
            grad_rows.append((target, grad_norms(model, trainer, probe)))
        print("\ngradient norms on the probe batch (per weight group, summed over blocks):")
        keys = list(grad_rows[0][1])
        print("| step | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for target, g in grad_rows:
            print(f"| {target} | " + " | ".join(fmt(g[k], 3, "g") for k in keys) + " |")


def fmt(v: float | None, digits: int = 3, kind: str = "f") -> str:
    """A measured value, or n/a where the model has no such channel or weight group."""
    return "n/a" if v is None else f"{v:.{digits}{kind}}"


def block_stats(model, batch) -> list[dict[str, float]]:
    """RMS of each residual-branch quantity of every block on `batch`, eval mode (no dropout): x and out of
    every block; h, stage1, o and stage2 only where the block is a FuXi block (and stage2 only with MFFN
    stage 2)."""
    blocks = model.encoder.blocks
    found: list[dict[str, torch.Tensor]] = [{} for _ in blocks]
    hooks = []
    for i, block in enumerate(blocks):
        rec = found[i]
        hooks.append(block.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("x", a[0])))
        hooks.append(block.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("out", o)))
        if hasattr(block, "ams"):
            hooks.append(block.ams.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("h", o)))
            mffn = block.mffn
            hooks.append(mffn.proj.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("s1", o)))
            if mffn.swiglu is not None:
                hooks.append(
                    mffn.swiglu.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("s2", o))
                )
    was = model.training
    model.eval()
    with torch.no_grad():
        model(batch.seq, None)
    model.train(was)
    for h in hooks:
        h.remove()
    out = []
    for rec in found:
        row = {"x": rms(rec["x"]), "out": rms(rec["out"])}
        if "s1" in rec:
            row.update(h=rms(rec["h"]), stage1=rms(rec["s1"]), o=rms(rec["s1"] + rec["x"]))
            row["stage2"] = rms(rec["s2"]) if "s2" in rec else None
        out.append(row)
    return out


def grad_norms(model, trainer, batch) -> dict[str, float | None]:
    """Gradient norm of each weight group for the loss on `batch` (dropout on, as in training); None for a
    group the model has no weight of (HSTU: no MFFN)."""
    from model.loss import sampled_softmax_loss

    model.train()
    model.zero_grad(set_to_none=True)
    trainer._reseed()
    negatives = trainer.sampler.sample(batch.history_lengths(), trainer.generator)
    out = model(batch.seq, negatives.lookup)
    sampled_softmax_loss(out, negatives, trainer.cfg.loss.temperature).backward()
    groups = {
        "item table": ["item_embedding"],
        "positions": ["position_embedding"],
        "uvqk (AMS, HSTU)": ["uvqk"],
        "pos/ts weights": ["pos_weights", "time_weights"],
        "stage-1 Linear": ["mffn.proj"],
        "stage-2 W1,W3": ["swiglu.w1", "swiglu.w3"],
        "stage-2 W2": ["swiglu.w2"],
    }
    sums: dict[str, float | None] = dict.fromkeys(groups)
    for name, p in model.named_parameters():
        for g, keys in groups.items():
            if any(k in name for k in keys):
                grad = 0.0 if p.grad is None else float(p.grad.float().pow(2).sum())
                sums[g] = (sums[g] or 0.0) + grad
    model.zero_grad(set_to_none=True)
    return {k: None if v is None else v**0.5 for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------
def cmd_ablate(args: argparse.Namespace) -> None:
    from pipeline.train.run import run

    data_path = subsample(args.data, args.users, args.subsample_seed, Path(args.work))
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            cfg = make_config(args, data_path, VARIANTS[variant] + [f"epochs={args.epochs}"], seed)
            t0 = time.perf_counter()
            report = run(cfg)
            wall = time.perf_counter() - t0
            curve = [h.get("valid/ndcg_at_10") for h in report["history"]]
            losses = [h["train_loss"] for h in report["history"]]
            row = {
                "variant": variant,
                "seed": seed,
                "valid_curve": curve,
                "loss_curve": losses,
                "selected_epoch": report["selected_epoch"],
                "valid_ndcg_at_10": report["valid_ndcg_at_10"],
                "test_ndcg_at_10": report["test"]["ndcg_at_10"],
                "test_hr_at_10": report["test"]["hr_at_10"],
                "steps": report["steps"],
                "wall_s": wall,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    marks = [e for e in (1, 2, 5, 10, 20, 30, 50, 75, 100, 150) if e <= args.epochs]
    print(f"\n{len(results)} runs on {data_path}, {args.epochs} epochs, validated protocol")
    print(
        "| variant | seed | "
        + " | ".join(f"valid@{e}" for e in marks)
        + " | loss@last | selected | valid NDCG@10 | test NDCG@10 | wall s |"
    )
    print("|---|---|" + "---|" * (len(marks) + 5))
    for r in results:
        curve = r["valid_curve"]  # shorter than --epochs when early stopping (patience) ended the run
        cells = [f"{curve[e - 1]:.4f}" if e <= len(curve) else "-" for e in marks]
        print(
            f"| {r['variant']} | {r['seed']} | "
            + " | ".join(cells)
            + f" | {r['loss_curve'][-1]:.3f} | {r['selected_epoch']} | {r['valid_ndcg_at_10']:.4f} "
            f"| {r['test_ndcg_at_10']:.4f} | {r['wall_s']:.0f} |"
        )
    print("\nmean ± std over seeds (test NDCG@10 at the validation-selected epoch):")
    for variant in args.variants:
        vals = np.array([r["test_ndcg_at_10"] for r in results if r["variant"] == variant])
        vv = np.array([r["valid_ndcg_at_10"] for r in results if r["variant"] == variant])
        sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
        print(f"  {variant:16s} test {vals.mean():.4f} ± {sd:.4f}  valid {vv.mean():.4f}  (n={len(vals)})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------------------------------------------
def bucket_coverage(
    data, cut: int, window: int, max_len: int, num_buckets: int, divisor: float
) -> dict[str, np.ndarray]:
    """Per window ("train": targets before `cut`, "valid": [cut, cut + window), "test": the next window),
    the count of (target, key) pairs in each time-gap bucket [num_buckets + 1]: every event with an
    earlier one is a target, its keys the last `max_len` events before it (dt = t_target - t_key, the
    official "next" delta of a prediction's row). A training row holds the last max_sequence_length events
    before the cut, so its earlier targets see fewer keys: the training counts are an upper bound."""
    from model.layers import time_buckets

    counts = {split: np.zeros(num_buckets + 1, dtype=np.int64) for split in ("train", "valid", "test")}
    bounds = [
        ("train", -(2**62), cut),
        ("valid", cut, cut + window),
        ("test", cut + window, cut + 2 * window),
    ]
    for ts in data.table.column("timestamps").to_pylist():
        ts = np.asarray(ts, dtype=np.int64)
        for k in range(1, len(ts)):
            split = next((name for name, lo, hi in bounds if lo <= ts[k] < hi), None)
            if split is None:
                continue
            dt = torch.from_numpy(ts[k] - ts[max(0, k - max_len) : k])
            counts[split] += np.bincount(
                time_buckets(dt, num_buckets, divisor).numpy(), minlength=num_buckets + 1
            )
    return counts


def cmd_buckets(args: argparse.Namespace) -> None:
    from pipeline.data.sequences import read_sequences
    from pipeline.data.temporal import resolve_cut
    from pipeline.train.config import apply_overrides
    from pipeline.train.presets import get_preset

    cfg = apply_overrides(get_preset(args.preset, args.data), list(args.set or []))
    if cfg.data.cut is None:
        raise SystemExit("buckets: pass the time split's cut (--set data.cut=YYYY-MM-DD or end)")
    data = read_sequences(args.data)
    window = cfg.data.window_seconds
    cut = resolve_cut(data, cfg.data.cut, window)
    m = cfg.model
    counts = bucket_coverage(
        data, cut, window, m.max_sequence_length, m.num_time_buckets, m.time_bucket_divisor
    )
    trained = np.flatnonzero(counts["train"])
    print(f"cut {cfg.data.cut} ({cut}), windows of {window} s, last {m.max_sequence_length} events as keys")
    print(
        "| window | pairs | buckets | in buckets training never saw | in buckets with < 100 training pairs |"
    )
    print("|---|---|---|---|---|")
    for split, c in counts.items():
        seen = np.flatnonzero(c)
        total = max(int(c.sum()), 1)
        unseen = c[counts["train"] == 0].sum() / total
        rare = c[counts["train"] < 100].sum() / total
        span = f"{seen.min()}-{seen.max()}" if len(seen) else "-"
        print(f"| {split} | {int(c.sum()):,} | {span} | {unseen:.1%} | {rare:.1%} |")
    if len(trained):
        print(f"largest bucket training saw: {trained.max()} ({counts['train'][trained.max()]} pairs)")
    common = np.flatnonzero(counts["train"] >= 100)
    if len(common) and common.max() < m.num_time_buckets:
        # clamping there gives every longer gap a weight that trained (docs/QUALITY.md, long gaps)
        print(
            f"largest bucket with >= 100 training pairs: {common.max()} "
            f"(--set model.num_time_buckets={common.max()})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["norms", "ablate", "buckets"])
    parser.add_argument("--data", required=True, help="sequence Parquet (fuxi data prepare)")
    parser.add_argument("--preset", default="ml-100k")
    parser.add_argument("--users", type=int, default=300, help="subsample this many users (0: all)")
    parser.add_argument("--subsample-seed", type=int, default=0)
    parser.add_argument("--work", default="runs/diagnose", help="subsample files and run dirs")
    parser.add_argument("--variants", nargs="+", default=["official", "single_stage", "zero_w2", "hstu"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--steps", nargs="+", type=int, default=[10, 50, 150], help="norms: after these steps"
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--out", help="ablate: also write the runs as JSON here")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"norms": cmd_norms, "ablate": cmd_ablate, "buckets": cmd_buckets}[args.command](args)


if __name__ == "__main__":
    main()
