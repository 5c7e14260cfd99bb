"""Reproduction on MovieLens-100K with the ML-1M settings: FuXi-alpha, HSTU, SASRec, eSASRec, LLaMa-style.

Grid: models x protocols (anchor, validated) x negative modes (per_position, shared) x seeds. Each cell
trains from scratch, times seconds per training epoch, and records HR@10/50, NDCG@10/50 and MRR. Results
are appended to a JSONL file as they finish (a rerun skips finished cells), then aggregated as mean ± std
over seeds into a Markdown table and a plot.

    python benchmarks/reproduce_ml100k.py --data path/to/ml-100k/ratings.parquet \
        --epochs 50 --seeds 0 1 2 --out benchmarks/results/ml100k

The ratings file may be any layout `fuxi data prepare` reads (u.data, ratings.parquet, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pipeline.data.readers import prepare_sequences
from pipeline.train.config import apply_overrides
from pipeline.train.presets import ml_100k
from pipeline.train.run import run

MODELS = {
    "FuXi-α": {"architecture": "fuxi"},
    "HSTU": {"architecture": "hstu"},
    "SASRec": {"architecture": "sasrec"},
    "eSASRec": {"architecture": "esasrec"},
    "LLaMa": {"architecture": "llama"},
}
METRICS = ("ndcg_at_10", "ndcg_at_50", "hr_at_10", "hr_at_50", "mrr")


def cell_key(model: str, protocol: str, negatives: str, seed: int) -> str:
    return f"{model}|{protocol}|{negatives}|{seed}"


def run_cell(
    seq_path: Path,
    model: str,
    protocol: str,
    negatives: str,
    seed: int,
    epochs: int,
    num_negatives: int,
    extra: list[str],
) -> dict:
    cfg = ml_100k()
    cfg.data.source = str(seq_path)
    cfg.data.protocol = protocol
    cfg.loss.negatives = negatives
    cfg.loss.num_negatives = num_negatives
    cfg.epochs = epochs
    cfg.seed = seed
    cfg.progress = False
    cfg.tracking.enabled = False
    cfg.output_dir = str(seq_path.parent / "runs")
    for key, value in MODELS[model].items():
        setattr(cfg.model, key, value)
    # the official code's MFFN stage-2 init (the project default is 0.0, docs/QUALITY.md); --set
    # model.ffn_out_init_scale=0.0 runs the project's recipe instead
    cfg.model.ffn_out_init_scale = 1.0
    apply_overrides(cfg, extra)
    t0 = time.perf_counter()
    report = run(cfg)
    return {
        "model": model,
        "protocol": protocol,
        "negatives": negatives,
        "seed": seed,
        "epochs": epochs,
        "num_negatives": num_negatives,
        "seconds_per_epoch": report["seconds_per_epoch"],
        "wall_seconds": time.perf_counter() - t0,
        "selected_epoch": report["selected_epoch"],
        "test": {k: report["test"][k] for k in METRICS},
        "curve": [
            {k: v for k, v in h.items() if k in ("epoch", "train_loss") or k.endswith("ndcg_at_10")}
            for h in report["history"]
        ],
    }


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["protocol"], r["negatives"]), []).append(r)
    out = []
    for (model, protocol, negatives), rs in groups.items():
        agg = {
            "model": model,
            "protocol": protocol,
            "negatives": negatives,
            "seeds": len(rs),
            "s_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in rs),
        }
        for m in METRICS:
            vals = [r["test"][m] for r in rs]
            agg[m] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(agg)
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(out, key=lambda a: (a["protocol"], a["negatives"], order[a["model"]]))


def to_markdown(aggs: list[dict]) -> str:
    head = "| protocol | negatives | model | seeds | NDCG@10 | NDCG@50 | HR@10 | HR@50 | MRR | s/epoch |"
    lines = [head, "|" + "---|" * 10]
    for a in aggs:
        cells = " | ".join(f"{a[m][0]:.4f} ± {a[m][1]:.4f}" for m in METRICS)
        lines.append(
            f"| {a['protocol']} | {a['negatives']} | {a['model']} | {a['seeds']} | {cells} | "
            f"{a['s_per_epoch']:.2f} |"
        )
    return "\n".join(lines)


def plot(aggs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(a["protocol"], a["negatives"]) for a in aggs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(settings), 1)
    for k, (protocol, negatives) in enumerate(settings):
        sub = {a["model"]: a for a in aggs if (a["protocol"], a["negatives"]) == (protocol, negatives)}
        xs = [i + k * width for i, m in enumerate(MODELS) if m in sub]
        models = [m for m in MODELS if m in sub]
        axes[0].bar(
            xs,
            [sub[m]["ndcg_at_10"][0] for m in models],
            width,
            yerr=[sub[m]["ndcg_at_10"][1] for m in models],
            label=f"{protocol}/{negatives}",
            capsize=3,
        )
        axes[1].bar(xs, [sub[m]["s_per_epoch"] for m in models], width, label=f"{protocol}/{negatives}")
    for ax, title in zip(axes, ("test NDCG@10 (mean ± std over seeds)", "seconds per training epoch")):
        ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(MODELS))], list(MODELS))
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("MovieLens-100K, ML-1M settings")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ML-100K ratings (u.data, ratings.parquet, ...)")
    p.add_argument("--out", default="benchmarks/results/ml100k")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--protocols", nargs="+", default=["anchor", "validated"])
    p.add_argument("--negative-modes", nargs="+", default=["per_position", "shared"])
    p.add_argument("--num-negatives", type=int, default=128)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seq_path = out / "ml-100k.sequences.parquet"
    if not seq_path.exists():
        _, report = prepare_sequences(args.data, seq_path)
        print(report.summary())
    results_path = out / "results.jsonl"
    rows = (
        [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    )
    done = {
        cell_key(r["model"], r["protocol"], r["negatives"], r["seed"])
        for r in rows
        if r["epochs"] == args.epochs and r["num_negatives"] == args.num_negatives
    }
    cells = [
        (m, pr, n, s)
        for pr in args.protocols
        for n in args.negative_modes
        for s in args.seeds
        for m in args.models
    ]
    from tqdm.auto import tqdm

    for model, protocol, negatives, seed in tqdm(cells, desc="cells"):
        if cell_key(model, protocol, negatives, seed) in done:
            continue
        row = run_cell(seq_path, model, protocol, negatives, seed, args.epochs, args.num_negatives, args.set)
        rows.append(row)
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(
            f"{model:7s} {protocol:9s} {negatives:12s} seed {seed}: ndcg@10 {row['test']['ndcg_at_10']:.4f} "
            f"hr@10 {row['test']['hr_at_10']:.4f}  {row['seconds_per_epoch']:.2f} s/epoch"
        )
    rows = [r for r in rows if r["epochs"] == args.epochs and r["num_negatives"] == args.num_negatives]
    aggs = aggregate(rows)
    table = to_markdown(aggs)
    (out / "table.md").write_text(
        f"MovieLens-100K, ML-1M settings, {args.epochs} epochs, {args.num_negatives} negatives"
        f"{', overrides: ' + ' '.join(args.set) if args.set else ''}; mean ± std over seeds; "
        "s/epoch = training seconds per epoch (evaluation excluded)\n\n"
        f"{table}\n"
    )
    plot(aggs, out / "table.png")
    print(table)
    print(f"wrote {out / 'table.md'} and {out / 'table.png'}")


if __name__ == "__main__":
    main()
