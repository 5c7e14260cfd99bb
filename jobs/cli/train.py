"""`fuxi train | eval | presets`: train a model from a preset, evaluate a checkpoint, list presets."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

METRIC_ORDER = ("hr_at_10", "ndcg_at_10", "hr_at_50", "ndcg_at_50", "mrr")


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    print(title)
    for key in METRIC_ORDER:
        if key in metrics:
            print(f"  {key.replace('_at_', '@'):10s} {metrics[key]:.4f}")


def cmd_train(args: argparse.Namespace) -> int:
    import storage
    from pipeline.train.config import validate
    from pipeline.train.presets import AUTO, resolve_config
    from pipeline.train.run import run

    # no preset named: the generic recipe of the architecture (`--set model.architecture=A`, default
    # FuXi-alpha) sized by the data given, else the embedded demo
    preset = args.preset or (AUTO if args.data else "cpu-demo")
    if args.report_json:  # a path or a URI (storage layer); a malformed one fails before training
        storage.parse(args.report_json)
    cfg = validate(resolve_config(preset, args.data, args.set or []))
    if preset == AUTO and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"fuxi: no preset named, the generic {cfg.model.architecture} recipe for {args.data}: "
            f"{cfg.epochs} epochs (patience {cfg.patience}), {cfg.model.num_layers} blocks, dropout "
            f"{cfg.model.linear_dropout:g}, history {cfg.model.max_sequence_length}, negatives "
            f"{cfg.loss.negatives}, lr {cfg.optim.lr:g} {cfg.optim.schedule} (docs/QUALITY.md)"
        )
    report = run(cfg, device=args.device)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank returns the same report
        return 0
    print(
        f"\n== {cfg.name}: {cfg.model.architecture}, protocol {report['protocol']}, "
        f"{report['epochs']} epochs, {report.get('seconds_per_epoch', 0):.2f} s/epoch =="
    )
    _print_metrics(
        f"test metrics (epoch {report['selected_epoch']}, {int(report['test'].get('num_users', 0))} users):",
        report["test"],
    )
    print(f"checkpoint: {report['checkpoint']}")
    if report.get("run_id"):
        print(f"mlflow run: {report['run_id']}")
    if args.report_json:
        storage.write_bytes(args.report_json, json.dumps(report, indent=1, default=str).encode())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from serving.loading import evaluate_checkpoint, load_checkpoint_model

    loaded = load_checkpoint_model(args.checkpoint)
    metrics = evaluate_checkpoint(loaded, args.data, args.split)
    _print_metrics(f"{args.split} metrics of {loaded.path} ({int(metrics['num_users'])} users):", metrics)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from pipeline.train.config import to_flat_dict
    from pipeline.train.presets import AUTO, PRESETS, resolve_config

    if args.show:
        cfg = resolve_config(args.show, args.data, args.set or [])
        for key, value in to_flat_dict(cfg).items():
            print(f"{key} = {value!r}")
        return 0
    for name, fn in PRESETS.items():
        print(f"{name:16s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
    print(f"{AUTO:16s} The generic recipe sized by --data (what `fuxi train --data X` uses with no preset).")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """fuxi train, eval, presets."""
    p = sub.add_parser("train", help="train a model from a preset (+ overrides), evaluate, checkpoint, track")
    p.add_argument(
        "--preset",
        help="named config (see `fuxi presets`); default: auto (the generic recipe) with --data, else "
        "cpu-demo",
    )
    # --data picks the recipe as well as the source (no preset: the generic recipe sized by this file), so
    # it stays a flag; every config field is set with --set
    p.add_argument("--data", help="sequence Parquet file (sets data.source); default: the preset's")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set epochs=3 --set model.num_layers=4 --set "
        "tracking.enabled=false --set run_dir=runs/job --set resume=true (`fuxi presets --show NAME` "
        "lists them)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--report-json", help="also write the final report here (a path or a URI: s3://...)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="full-ranking evaluation of a checkpoint")
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder or a checkpoints root with 'latest'"
    )
    p.add_argument("--data", help="sequence Parquet (default: the data the run trained on)")
    p.add_argument("--split", default="test")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", help="list presets, or --show NAME to print a resolved config")
    p.add_argument("--show")
    p.add_argument("--data", help="--show auto: the sequence file the generic recipe is sized by")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_presets)
