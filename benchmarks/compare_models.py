"""FuXi-alpha, HSTU, SASRec and eSASRec (or any architecture) on one or more data sets, several seeds: a
table and a plot of test NDCG@10 at the validation-selected epoch, mean ± std over seeds.

    # each model's generic recipe (what `fuxi train --data X --set model.architecture=M` uses with no
    # preset), sized by each sequence Parquet file
    python benchmarks/compare_models.py --data a.parquet b.parquet --preset auto --seeds 0 1 2 \
        --out runs/compare/generic
    # each model's tuned preset ({model} is replaced by the architecture)
    python benchmarks/compare_models.py --data ml-100k.parquet --preset 'ml-100k-{model}' --seeds 0 1 2
    # a variant beside the default: its rows are "fuxi no-ts" in the table
    python benchmarks/compare_models.py --data a.parquet --models fuxi --set model.channels=pos,sem \
        --label no-ts --out runs/compare/no_ts
    # a global time split instead of leave-one-out: valid and test are the data's last two 14-day windows
    python benchmarks/compare_models.py --data ml-100k.parquet --protocol temporal \
        --set data.cut=end --set data.window_seconds=1209600 --out runs/compare/time_split
    # one table and plot from runs written earlier (OUT.json files)
    python benchmarks/compare_models.py --combine a.json b.json --out runs/compare/all

With `auto` every model gets its own generic recipe (pipeline/train/recipe.py `RECIPES`); with a plain preset
name every model gets that preset and `model.architecture=<model>`. `--users N`
trains on a seeded subsample of N users of each file (benchmarks/diagnose_fuxi.py). Every run is a
`fuxi train`-equivalent in this process (pipeline.train.run), tracking off, under `--protocol`: "validated"
(leave-one-out: select on each user's second-to-last item, report the last) or "temporal" (a global time
cut, `data.cut` / `data.window_seconds`: select on the window after the cut, report the next one). The wall
time to the selected epoch is its epochs times the run's mean seconds per epoch. Below the table, each
model's paired difference against the first model (same data, same seeds): mean ± standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import get_args

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnose_fuxi import subsample  # noqa: E402

from model.config import Architecture  # noqa: E402

MODELS = get_args(Architecture)  # every architecture the harness builds
DEFAULT_MODELS = ("fuxi", "hstu", "sasrec", "esasrec")


def make_config(
    preset: str, model: str, data: str, seed: int, overrides: list[str], work: Path, protocol="validated"
):
    from pipeline.train.config import apply_overrides, validate
    from pipeline.train.presets import AUTO, get_preset

    named = preset.format(model=model)
    cfg = get_preset(named, data, model if named == AUTO else None)  # auto: the model's own recipe
    cfg.data.protocol = protocol
    cfg.seed = seed
    cfg.tracking.enabled = False
    cfg.progress = False
    cfg.checkpoint_every_epochs = 0
    # one folder per model and seed: run folders are named by the second they start, and two short runs of
    # one preset (auto: every model's) could otherwise share one
    cfg.output_dir = str(work / "runs" / f"{model}-seed{seed}")
    arch = [] if "{model}" in preset else [f"model.architecture={model}"]
    return validate(apply_overrides(cfg, arch + overrides))


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    out = {}
    for key in dict.fromkeys((r["data"], r["model"]) for r in rows):
        runs = [r for r in rows if (r["data"], r["model"]) == key]
        test = np.array([r["test_ndcg_at_10"] for r in runs])
        hr = np.array([r["test_hr_at_10"] for r in runs])
        out[key] = {
            "n": len(runs),
            "test_mean": float(test.mean()),
            "test_std": float(test.std(ddof=1)) if len(runs) > 1 else 0.0,
            "valid_mean": float(np.mean([r["valid_ndcg_at_10"] for r in runs])),
            "hr_mean": float(hr.mean()),
            "hr_std": float(hr.std(ddof=1)) if len(runs) > 1 else 0.0,
            "per_seed": [float(v) for v in test],
            "selected": [r["selected_epoch"] for r in runs],
            "to_selected_s": float(np.mean([r["to_selected_s"] for r in runs])),
            "wall_s": float(np.mean([r["wall_s"] for r in runs])),
        }
    return out


def markdown(summary: dict[tuple[str, str], dict], title: str, rows: list[dict]) -> str:
    lines = [
        f"### {title}",
        "",
        "| data | model | test NDCG@10 per seed | test NDCG@10 | test HR@10 | valid NDCG@10 "
        "| selected epochs | s to selected | s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (data, model), s in summary.items():
        lines.append(
            f"| {data} | {model} | {', '.join(f'{v:.4f}' for v in s['per_seed'])} "
            f"| {s['test_mean']:.4f} ± {s['test_std']:.4f} | {s['hr_mean']:.4f} ± {s['hr_std']:.4f} "
            f"| {s['valid_mean']:.4f} "
            f"| {', '.join(map(str, s['selected']))} | {s['to_selected_s']:.0f} | {s['wall_s']:.0f} |"
        )
    return "\n".join(lines + paired_differences(rows) + side_by_side(summary)) + "\n"


def side_by_side(summary: dict[tuple[str, str], dict]) -> list[str]:
    """One row per data set, one column per model: test NDCG@10 and HR@10 as mean ± std; the best mean
    NDCG@10 of the row in bold."""
    models = list(dict.fromkeys(m for _, m in summary))
    if len(models) < 2:
        return []
    lines = ["", "Test NDCG@10 / HR@10, mean ± std over the seeds, side by side:", ""]
    lines += ["| data | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for data in dict.fromkeys(d for d, _ in summary):
        present = [m for m in models if (data, m) in summary]
        best = max(present, key=lambda m: summary[data, m]["test_mean"])
        cells = []
        for model in models:
            s = summary.get((data, model))
            if s is None:
                cells.append("-")
                continue
            ndcg = f"{s['test_mean']:.4f} ± {s['test_std']:.4f}"
            cells.append(
                f"{'**' + ndcg + '**' if model == best else ndcg} / {s['hr_mean']:.4f} ± {s['hr_std']:.4f}"
            )
        lines.append(f"| {data} | " + " | ".join(cells) + " |")
    return lines


def paired_differences(rows: list[dict]) -> list[str]:
    """Test NDCG@10 of the first model minus each other model's, paired by data and seed: mean ± standard
    error of the per-seed differences (the seed's users and initial state are shared, so pairing removes
    the part of the noise both runs see)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if len(models) < 2:
        return []
    first = models[0]
    by = {(r["data"], r["model"], r["seed"]): r["test_ndcg_at_10"] for r in rows}
    lines = ["", f"Paired by seed, test NDCG@10 of {first} minus each model's (mean ± standard error):", ""]
    lines += ["| data | model | differences per seed | mean ± s.e. | seeds where " + first + " leads |"]
    lines += ["|---|---|---|---|---|"]
    for data in dict.fromkeys(r["data"] for r in rows):
        for model in models[1:]:
            seeds = sorted({r["seed"] for r in rows if (r["data"], r["model"]) == (data, model)})
            paired = [s for s in seeds if (data, first, s) in by]
            diffs = np.array([by[data, first, s] - by[data, model, s] for s in paired])
            if len(diffs) == 0:
                continue
            se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
            lines.append(
                f"| {data} | {model} | {', '.join(f'{d:+.4f}' for d in diffs)} "
                f"| {diffs.mean():+.4f} ± {se:.4f} | {int((diffs > 0).sum())} of {len(diffs)} |"
            )
    return lines


def plot(summary: dict[tuple[str, str], dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(d for d, _ in summary))
    models = list(dict.fromkeys(m for _, m in summary))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(datasets) + 1.5), 3.8))
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(datasets))]
        cells = [summary.get((d, model)) for d in datasets]
        ax.bar(
            xs,
            [c["test_mean"] if c else 0.0 for c in cells],
            width,
            yerr=[c["test_std"] if c else 0.0 for c in cells],
            capsize=3,
            label=model,
        )
    ax.set_xticks(range(len(datasets)), datasets, fontsize=8)
    ax.set_ylabel("test NDCG@10 (mean ± std over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", help="sequence Parquet files")
    parser.add_argument(
        "--combine", nargs="+", metavar="JSON", help="no training: tabulate earlier OUT.json runs"
    )
    parser.add_argument("--preset", default="auto", help="a preset, 'auto', or a pattern with {model}")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--protocol",
        choices=["validated", "temporal"],
        default="validated",
        help="leave-one-out, or a global time cut (with --set data.cut=... data.window_seconds=...)",
    )
    parser.add_argument("--users", type=int, default=0, help="subsample N users of each file (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument(
        "--label", default="", help="appended to the model name in the table (a variant made with --set)"
    )
    parser.add_argument("--work", default="runs/compare")
    parser.add_argument("--out", default="runs/compare/compare", help="writes OUT.md, OUT.json, OUT.png")
    args = parser.parse_args(argv)
    if bool(args.data) == bool(args.combine):
        parser.error("pass --data (train) or --combine (earlier runs), not both")
    if args.combine:
        rows = [row for path in args.combine for row in json.loads(Path(path).read_text())]
        presets = ", ".join(dict.fromkeys(r["preset"] for r in rows))
        seeds = sorted({r["seed"] for r in rows})
        protocols = ", ".join(dict.fromkeys(r.get("protocol", "validated") for r in rows))
        write(rows, f"presets {presets}, seeds {seeds}, {protocols} protocol", Path(args.out))
        return
    missing = missing_presets(args.preset, args.models)
    if missing:  # before any training: a per-model preset pattern names every model's preset
        parser.error(f"--preset {args.preset!r}: no preset {', '.join(missing)} (leave it out with --models)")
    rows = train_all(args)
    write(rows, f"preset {args.preset}, seeds {args.seeds}, {args.protocol} protocol", Path(args.out))


def missing_presets(preset: str, models: list[str]) -> list[str]:
    from pipeline.train.presets import AUTO, PRESETS

    names = dict.fromkeys(preset.format(model=m) for m in models)
    return [n for n in names if n != AUTO and n not in PRESETS]


def train_all(args: argparse.Namespace) -> list[dict]:
    from pipeline.train.run import run

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    total = len(args.data) * len(args.models) * len(args.seeds)
    for path in args.data:
        data = subsample(path, args.users, 0, work)
        label = Path(data).stem + (" (time split)" if args.protocol == "temporal" else "")
        for model in args.models:
            for seed in args.seeds:
                cfg = make_config(args.preset, model, data, seed, args.set, work, args.protocol)
                t0 = time.perf_counter()
                report = run(cfg)
                wall = time.perf_counter() - t0
                row = {
                    "data": label,
                    "model": f"{model} {args.label}".strip(),
                    "preset": args.preset.format(model=model),
                    "overrides": list(args.set),
                    "protocol": args.protocol,
                    "seed": seed,
                    "epochs_run": report["epochs"],
                    "selected_epoch": report["selected_epoch"],
                    "steps": report["steps"],
                    "valid_ndcg_at_10": report["valid_ndcg_at_10"],
                    "test_ndcg_at_10": report["test"]["ndcg_at_10"],
                    "test_hr_at_10": report["test"]["hr_at_10"],
                    "seconds_per_epoch": report.get("seconds_per_epoch", 0.0),
                    "to_selected_s": report["selected_epoch"] * report.get("seconds_per_epoch", 0.0),
                    "wall_s": wall,
                }
                rows.append(row)
                print(f"[{len(rows)}/{total}] {json.dumps(row)}", flush=True)
    return rows


def write(rows: list[dict], title: str, out: Path) -> None:
    summary = summarise(rows)
    text = markdown(summary, title, rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(summary, title, out.with_suffix(".png"))
    print("\n" + text)
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
