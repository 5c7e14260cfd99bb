"""SASRec under FuXi-alpha's tuned ML-100K recipe, one lever at a time set back to SASRec's own recipe
(the official ML-1M levers, pipeline/train/recipe.py `RECIPES["sasrec"]`): which lever slows it?

Each variant is `--preset ml-100k-fuxi --set model.architecture=sasrec` plus its overrides, validated
protocol, a fixed number of epochs (no early stopping), fp32, one seed; it prints one JSON line per variant
with the validation NDCG@10 and training loss of every epoch (docs/QUALITY.md, "SASRec under FuXi-α's
recipe").

    python benchmarks/diagnose_sasrec.py --data path/to/ml-100k.sequences.parquet --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    # 3 blocks, dropout 0.49 / 0.46, lr 1.77e-3, 20 warm-up steps, decay 0.01, the exact softmax
    "fuxi-recipe": [],
    "dropout-0.2": ["model.input_dropout=0.2", "model.linear_dropout=0.2"],
    "lr-1e-3-no-warmup-wd0": ["optim.lr=0.001", "optim.warmup_steps=0", "optim.weight_decay=0"],
    "2-blocks": ["model.num_layers=2"],
    "sampled-128": ["loss.negatives=per_position"],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the ML-100K sequence Parquet file (`fuxi data prepare`)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", default="runs/diagnose_sasrec")
    args = p.parse_args(argv)

    from pipeline.train.config import apply_overrides, validate
    from pipeline.train.presets import get_preset
    from pipeline.train.run import run

    for name in args.variants:
        base = [
            "model.architecture=sasrec",
            f"epochs={args.epochs}",
            "patience=0",
            "amp=none",
            f"seed={args.seed}",
            "tracking.enabled=false",
            "progress=false",
            "checkpoint_every_epochs=0",
            f"output_dir={Path(args.work) / name}",
        ]
        cfg = validate(apply_overrides(get_preset("ml-100k-fuxi", args.data), base + VARIANTS[name]))
        t0 = time.perf_counter()
        report = run(cfg)
        row = {
            "variant": name,
            "selected": report["selected_epoch"],
            "valid": report["valid_ndcg_at_10"],
            "test": report["test"]["ndcg_at_10"],
            "valid_curve": [round(h.get("valid/ndcg_at_10", float("nan")), 4) for h in report["history"]],
            "loss": [round(h["train_loss"], 3) for h in report["history"]],
            "s": round(time.perf_counter() - t0),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
