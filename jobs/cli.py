"""The `fuxi` command, the one module that builds its parser: `fuxi train | eval | presets`, `fuxi data ...`,
`fuxi sweep | tune | report | register | promote | nightly`; serving:
`fuxi recommend | index | serve | export`.

Imports stay inside the handlers so `fuxi --help` does not load torch, Ray or MLflow. Training and data
commands call the layers below (`pipeline.train`, `pipeline.data`); jobs call training only through this
command line or `pipeline.train.loading` (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

METRIC_ORDER = ("hr_at_10", "ndcg_at_10", "hr_at_50", "ndcg_at_50", "mrr")


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    print(title)
    for key in METRIC_ORDER:
        if key in metrics:
            print(f"  {key.replace('_at_', '@'):10s} {metrics[key]:.4f}")


# ---------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train.config import apply_overrides, validate
    from pipeline.train.presets import AUTO, get_preset
    from pipeline.train.run import run

    # no preset named: the generic recipe sized by the data given, else the embedded demo
    preset = args.preset or (AUTO if args.data else "cpu-demo")
    cfg = get_preset(preset, args.data)
    if preset == AUTO and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"fuxi: no preset named, the generic recipe for {args.data}: {cfg.epochs} epochs "
            f"(patience {cfg.patience}), history {cfg.model.max_sequence_length}, negatives "
            f"{cfg.loss.negatives}, lr {cfg.optim.lr:g} {cfg.optim.schedule} (docs/QUALITY.md)"
        )
    validate(apply_overrides(cfg, args.set or []))
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
        Path(args.report_json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.train.loading import evaluate_checkpoint, load_checkpoint_model

    loaded = load_checkpoint_model(args.checkpoint)
    metrics = evaluate_checkpoint(loaded, args.data, args.split)
    _print_metrics(f"{args.split} metrics of {loaded.path} ({int(metrics['num_users'])} users):", metrics)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from pipeline.train.config import apply_overrides, to_flat_dict
    from pipeline.train.presets import AUTO, PRESETS, get_preset

    if args.show:
        cfg = apply_overrides(get_preset(args.show, args.data), args.set or [])
        for key, value in to_flat_dict(cfg).items():
            print(f"{key} = {value!r}")
        return 0
    for name, fn in PRESETS.items():
        print(f"{name:16s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
    print(f"{AUTO:16s} The generic recipe sized by --data (what `fuxi train --data X` uses with no preset).")
    return 0


# --- data ------------------------------------------------------------------------------------------
def cmd_data_synth(args: argparse.Namespace) -> int:
    from pipeline.data.sequences import write_sequences
    from pipeline.data.synthetic import SyntheticConfig, synthetic_sequences

    cfg = SyntheticConfig(
        num_users=args.users,
        num_items=args.items,
        mean_length=args.mean_length,
        long_gap_days=args.long_gap_days,
        seed=args.seed,
    )
    data = synthetic_sequences(cfg)
    write_sequences(data, args.out)
    print(
        f"wrote {args.out}: {data.num_users} users, {data.num_interactions} interactions, "
        f"{cfg.num_items} items"
    )
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.readers import prepare_sequences

    data, report = prepare_sequences(
        args.input,
        args.out,
        layout=args.layout,
        min_length=args.min_length,
        identity_ids=args.identity_ids,
        min_count=args.min_count,
    )
    print(report.summary())
    print(
        f"wrote {args.out}: {data.num_users} users, {data.num_interactions} interactions, "
        f"num_items {data.num_items}"
    )
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from pipeline.data.download import download_movielens

    path = download_movielens(args.dataset, args.dest)
    print(f"ratings file: {path}")
    if args.out:
        args.input, args.layout, args.min_length = path, "auto", 2
        return cmd_data_prepare(args)
    return 0


def cmd_data_kuairand(args: argparse.Namespace) -> int:
    from pipeline.data.kuairand import preprocess_kuairand

    data, report = preprocess_kuairand(
        args.logs, args.out, positive=args.positive, min_length=args.min_length
    )
    print(report.summary())
    print(
        f"wrote {args.out}: {data.num_users} users, {data.num_interactions} interactions, "
        f"num_items {data.num_items}"
    )
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from pipeline.data.sequences import read_sequences

    data = read_sequences(args.path)
    lengths = data.lengths()
    print(
        json.dumps(
            {
                "users": data.num_users,
                "interactions": data.num_interactions,
                "num_items": data.num_items,
                "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
                "max_length": int(lengths.max()) if len(lengths) else 0,
                "meta": data.meta,
            },
            indent=1,
            default=str,
        )
    )
    return 0


def cmd_data_synth_logs(args: argparse.Namespace) -> int:
    from pipeline.data.synth_logs import LogConfig, write_logs

    cfg = LogConfig(
        num_users=args.users,
        num_items=args.items,
        num_days=args.days,
        num_events=args.events,
        seed=args.seed,
        bad_fraction=args.bad_fraction,
        rows_per_part=args.rows_per_part,
        new_items_per_day=args.items // 100 if args.new_items_per_day is None else args.new_items_per_day,
        new_item_share=args.new_item_share,
        new_item_days=args.new_item_days,
        item_ids=args.item_ids,
        user_ids=args.user_ids,
    )
    summary = write_logs(cfg, args.out, overwrite=args.overwrite)
    parts = sum(d["parts"] for d in summary["days"].values())
    print(
        f"wrote {args.out}: {cfg.num_events:,} events over {cfg.num_days} days ({parts} part files), "
        f"{cfg.num_users:,} users, catalogue of {summary['num_items']:,} items "
        f"({cfg.num_items:,} + {cfg.new_items_per_day:,} new per day; {cfg.item_ids} item ids, "
        f"{cfg.user_ids} user ids)"
    )
    return 0


def cmd_data_build_sequences(args: argparse.Namespace) -> int:
    from pipeline.data.build import BuildConfig, build_sequences
    from pipeline.data.ingest import IngestRules
    from pipeline.data.stream import ray_session

    if args.num_items is not None and not args.identity_ids:
        raise SystemExit("--num-items is a catalogue of item rows: it needs --identity-ids")
    cfg = BuildConfig(
        max_length=args.max_length,
        num_partitions=args.partitions,
        rules=IngestRules(
            num_items=args.num_items,
            identity_ids=args.identity_ids,
            event_types=args.event_types.split(",") if args.event_types else None,
        ),
        min_count=args.min_count,
    )
    dates = args.dates.split(",") if args.dates else None
    with ray_session():  # no Ray process outlives this command, also when it is stopped
        print(build_sequences(args.logs, args.out, cfg, dates=dates).summary())
    return 0


def cmd_data_append_day(args: argparse.Namespace) -> int:
    from pipeline.data.build import append_day
    from pipeline.data.stream import ray_session

    with ray_session():
        print(append_day(args.logs, args.date, args.sequences).summary())
    return 0


# --- jobs: sweeps, reports, registry, nightly -------------------------------------------------------
def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def cmd_sweep(args: argparse.Namespace) -> int:
    from jobs.report import build_report
    from jobs.sweep import mlflow_client, parse_grid, parse_scheduler_args, run_sweep

    _quiet_mlflow()
    grid = parse_grid(args.grid)
    result = run_sweep(
        args.preset,
        grid,
        args.set or [],
        name=args.name,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        sweep_dir=args.sweep_dir,
        scheduler=args.scheduler,
        scheduler_cfg=parse_scheduler_args(args.scheduler_args),
        parallel=args.parallel,
        data=args.data,
        cpu=args.cpu,
    )
    print(
        f"sweep parent run {result.parent_run_id}: {sum(j.state == 'SUCCEEDED' for j in result.jobs)}/"
        f"{len(result.jobs)} jobs succeeded in {result.seconds:.0f}s"
    )
    if not args.no_report:
        out = args.report_dir or f"{args.sweep_dir}/{args.name or result.parent_run_id}"
        report = build_report(
            mlflow_client(args.tracking_uri), result.parent_run_id, out, args.metric, name=args.report_name
        )
        print(report.markdown)
        print(f"report: {report.paths['plot']} {report.paths['leaderboard']}")
    return 0 if result.ok else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from jobs.sweep import parse_scheduler_args
    from jobs.tune import load_space, run_tune, write_study_report

    _quiet_mlflow()
    storage = args.storage or f"sqlite:///{Path(args.tune_dir) / args.study}.db"
    Path(args.tune_dir).mkdir(parents=True, exist_ok=True)
    result = run_tune(
        args.preset,
        load_space(args.space),
        study_name=args.study,
        storage=storage,
        n_trials=args.trials,
        overrides=args.set or [],
        seeds=args.seeds,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        tune_dir=args.tune_dir,
        scheduler=args.scheduler,
        scheduler_cfg=parse_scheduler_args(args.scheduler_args),
        data=args.data,
        cpu=args.cpu,
        sampler_seed=args.sampler_seed,
        pruner=args.pruner,
        startup_trials=args.startup_trials,
        warmup_evals=args.warmup_evals,
    )
    print(
        f"study {result.study_name}: {result.new_trials} new trials ({result.trials} in all) in "
        f"{result.seconds:.0f}s; parent run {result.parent_run_id}; storage {storage}"
    )
    markdown, paths = write_study_report(
        storage,
        args.study,
        args.report_dir or Path(args.tune_dir) / args.study,
        tracking_uri=args.tracking_uri,
    )
    print(markdown)
    print(f"report: {paths['table']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import build_nightly_report, build_report
    from jobs.sweep import mlflow_client

    _quiet_mlflow()
    if args.study:
        from jobs.tune import write_study_report

        if not args.storage:
            raise SystemExit("fuxi report --study: pass --storage (the study's Optuna storage URL)")
        name = args.name if args.name != "sweep_report" else None
        markdown, paths = write_study_report(
            args.storage, args.study, args.out, name, tracking_uri=args.tracking_uri
        )
        print(markdown)
        print(f"report: {paths['plot']} {paths['table']}")
        return 0
    if args.nightly:
        markdown, paths = build_nightly_report(
            mlflow_client(args.tracking_uri),
            args.experiment,
            args.model_name,
            args.out,
            args.name if args.name != "sweep_report" else "nightly_report",
        )
        print(markdown)
        print(f"report: {paths['plot']} {paths['table']}")
        return 0
    if not args.parent_run_id:
        raise SystemExit("fuxi report: pass --parent-run-id (a sweep), --study (a tuning study) or --nightly")
    report = build_report(
        mlflow_client(args.tracking_uri),
        args.parent_run_id,
        args.out,
        args.metric,
        log_to_parent=not args.no_log,
        name=args.name,
    )
    print(report.markdown)
    print(f"report: {report.paths['plot']} {report.paths['leaderboard']}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from jobs import registry
    from jobs.sweep import mlflow_client

    _quiet_mlflow()
    client = mlflow_client(args.tracking_uri)
    mv = registry.register(client, args.run_id, args.name, args.checkpoint, index=args.index)
    print(f"registered {args.name} v{mv.version} from run {args.run_id}")
    if args.promote:
        decision = registry.promote_if_better(client, args.name, mv.version, data=args.data)
        print(json.dumps(decision.as_dict(), indent=1))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from jobs import registry
    from jobs.sweep import mlflow_client

    _quiet_mlflow()
    decision = registry.promote_if_better(
        mlflow_client(args.tracking_uri), args.name, args.version, data=args.data, min_delta=args.min_delta
    )
    print(json.dumps(decision.as_dict(), indent=1))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from jobs.nightly import NightlyConfig, run_nightly
    from jobs.sweep import parse_scheduler_args

    cfg = NightlyConfig(
        date=args.date,
        workdir=args.workdir,
        preset=args.preset,
        overrides=args.set or [],
        model_name=args.name,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        scheduler=args.scheduler,
        scheduler_cfg=parse_scheduler_args(args.scheduler_args),
        logs_dir=args.logs,
        sequences=args.sequences,
        demo_data=not args.no_demo_data,
        demo_logs=parse_scheduler_args(args.demo_logs),
    )
    state = run_nightly(cfg, args.step, force=args.force)
    final = state["steps"].get("register_promote", {}).get("outputs")
    if final:
        print(
            f"nightly {args.date}: v{final['version']} promoted={final['decision']['promoted']} "
            f"({final['decision']['reason']})"
        )
    return 0


# --- serving: batch recommendations, item index, HTTP, export ----------------------------------------
def cmd_recommend(args: argparse.Namespace) -> int:
    from jobs.recommend import recommend, resolve_model

    _quiet_mlflow()
    model = resolve_model(args.model, args.tracking_uri, args.cache)
    report = recommend(
        model.checkpoint,
        args.sequences,
        args.out,
        args.k,
        version=model.version,
        workers=args.workers,
        batch_size=args.batch_size,
        use_index=args.use_index,
        ray_address=args.ray_address,
        threads_per_worker=args.threads_per_worker,
    )
    print(report.summary())
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from jobs.item_index import index_checkpoint
    from jobs.recommend import resolve_model
    from pipeline.train.loading import load_checkpoint_model

    _quiet_mlflow()
    model = resolve_model(args.model, args.tracking_uri, args.cache)
    path, meta = index_checkpoint(
        load_checkpoint_model(model.checkpoint), args.kind, args.m, args.ef_construction, args.nlist
    )
    print(f"wrote {path} ({meta['kind']}, {meta['rows']:,} rows, {meta['build_seconds']:.1f}s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from jobs.serving import serve

    _quiet_mlflow()
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    serve(args.model, args.host, args.port)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jobs.export import export_encoder
    from jobs.recommend import resolve_model

    _quiet_mlflow()
    model = resolve_model(args.model, args.tracking_uri, args.cache)
    report = export_encoder(model.checkpoint, args.out, args.batch, args.length)
    print(json.dumps(report, indent=1))
    return 0


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """fuxi recommend, index, serve, export."""

    def model(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            required=True,
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, or a checkpoint folder",
        )
        p.add_argument("--cache", help="where registered versions are downloaded (default runs/models)")
        p.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
        )

    p = sub.add_parser("recommend", help="top-k for every user of a sequence data set (Ray Data) -> Parquet")
    model(p)
    p.add_argument("--sequences", required=True, help="a sequence shard directory or a sequence Parquet")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each with the model loaded once")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads in each actor")
    p.add_argument("--batch-size", type=int, default=256, help="users per model call")
    p.add_argument(
        "--use-index", action="store_true", help="the checkpoint's faiss index, not the exact scan"
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: a local Ray, shut down after)")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("index", help="build the faiss item index of a model into its checkpoint folder")
    model(p)
    p.add_argument("--kind", choices=["hnsw", "ivf"], default="hnsw")
    p.add_argument("--m", type=int, default=32, help="HNSW: neighbours per node")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW: build-time beam")
    p.add_argument("--nlist", type=int, default=1024, help="IVF: k-means lists")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "serve", help="serve a registered model over HTTP (MLflow's scoring app, strict checks)"
    )
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model folder"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="torch.export the user encoder (fixed batch and history length)")
    model(p)
    p.add_argument("--out", required=True, help="output folder: encoder.pt2, item_vectors, manifest")
    p.add_argument("--batch", type=int, default=1, help="users per call of the exported program")
    p.add_argument("--length", type=int, help="history length (default the model's max_sequence_length)")
    p.set_defaults(func=cmd_export)


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """fuxi sweep, tune, report, register, promote, nightly."""

    def tracking(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
        )

    p = sub.add_parser("sweep", help="launch a grid of TorchX training jobs under one parent MLflow run")
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="one axis of the grid, any config field, e.g. --grid model.num_layers=1,2,4",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every point")
    p.add_argument("--data", help="sequence Parquet for every point (overrides data.source)")
    p.add_argument("--name", help="sweep (parent run) name; default sweep-<preset>-<time>")
    p.add_argument("--experiment", help="MLflow experiment (default: the preset's)")
    p.add_argument(
        "--scheduler", default="local_cwd", help="TorchX scheduler: local_cwd, kubernetes, slurm, ..."
    )
    p.add_argument("--scheduler-args", help="TorchX scheduler options, e.g. queue=default,namespace=recsys")
    p.add_argument("--parallel", type=int, default=1, help="jobs in flight at once")
    p.add_argument("--cpu", type=int, help="CPUs per job (default: cores / parallel)")
    p.add_argument("--sweep-dir", default="runs/sweeps", help="run dirs and TorchX logs (local schedulers)")
    p.add_argument("--report-dir", help="where the report goes (default <sweep-dir>/<name>)")
    p.add_argument(
        "--report-name", default="sweep_report", help="report file names: NAME.md, NAME.png, NAME.json"
    )
    p.add_argument("--metric", default="final_test/ndcg_at_10")
    p.add_argument("--no-report", action="store_true")
    tracking(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "tune", help="an Optuna study over config fields, one TorchX training job per trial and seed"
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--space", required=True, help="search space, YAML or JSON: field -> distribution")
    p.add_argument("--study", required=True, help="study name (also the parent MLflow run's name)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<tune-dir>/<study>.db)")
    p.add_argument("--trials", type=int, default=10, help="trials to run in this invocation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per trial (objective: mean)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every trial")
    p.add_argument("--data", help="sequence Parquet for every trial (overrides data.source)")
    p.add_argument("--experiment", help="MLflow experiment (default: the preset's)")
    p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler")
    p.add_argument("--scheduler-args", help="TorchX scheduler options")
    p.add_argument("--cpu", type=int, help="CPUs per job (default: all cores)")
    p.add_argument("--tune-dir", default="runs/tune", help="storage, run dirs and TorchX logs")
    p.add_argument("--report-dir", help="where the study report goes (default <tune-dir>/<study>)")
    p.add_argument("--sampler-seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--pruner", default="median", choices=["median", "none"])
    p.add_argument("--startup-trials", type=int, default=5, help="median pruner: trials before pruning")
    p.add_argument("--warmup-evals", type=int, default=2, help="median pruner: evaluations before pruning")
    tracking(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "report",
        help="a sweep's leaderboard + scaling curves, a tuning study (--study), or the nightly timeline",
    )
    p.add_argument("--parent-run-id", help="the sweep's parent run")
    p.add_argument("--study", help="an Optuna study (fuxi tune): best trials, importances, seed spread")
    p.add_argument("--storage", help="with --study: its Optuna storage URL")
    p.add_argument("--nightly", action="store_true", help="per-date next-day metrics of the nightly job")
    p.add_argument("--experiment", default="fuxi-nightly", help="with --nightly: the nightly experiment")
    p.add_argument("--model-name", default="fuxi-alpha", help="with --nightly: the registered model")
    p.add_argument("--out", default="runs/report")
    p.add_argument("--name", default="sweep_report", help="file names: NAME.md, NAME.png, NAME.json")
    p.add_argument("--metric", default="final_test/ndcg_at_10")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    tracking(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("register", help="register a finished run's checkpoint as an MLflow pyfunc model")
    p.add_argument("--run-id", required=True)
    p.add_argument("--name", default="fuxi-alpha", help="registered model name")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's latest)")
    p.add_argument(
        "--promote", action="store_true", help="then promote to @champion if it beats the champion"
    )
    p.add_argument("--data", help="validation data for the comparison (default: the candidate's)")
    p.add_argument("--index", action="store_true", help="also build the faiss item index into the model")
    tracking(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "promote", help="move @champion to a version only if it beats the champion on validation"
    )
    p.add_argument("--version", required=True)
    p.add_argument("--name", default="fuxi-alpha")
    p.add_argument("--data", help="validation data for the comparison (default: the candidate's)")
    p.add_argument("--min-delta", type=float, default=0.0)
    tracking(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "nightly", help="ingest -> sequences -> warm-start train -> evaluate -> register/promote"
    )
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument(
        "--step",
        action="append",
        choices=["ingest", "update_sequences", "train", "evaluate", "register_promote"],
        help="run only this step (repeatable); default: all steps not yet done",
    )
    p.add_argument("--force", action="store_true", help="re-run steps already done for this date")
    p.add_argument("--workdir", default="runs/nightly", help="state, logs, sequences and runs")
    p.add_argument("--logs", help="log root holding date=YYYY-MM-DD partitions (default <workdir>/logs)")
    p.add_argument("--sequences", help="sequence data updated by the job (default <workdir>/sequences)")
    p.add_argument("--no-demo-data", action="store_true", help="fail when the day's logs are missing")
    p.add_argument(
        "--demo-logs", help="synth-logs sizes of the demo window, e.g. users=300,items=200,events=21000"
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--name", default="fuxi-alpha", help="registered model name")
    p.add_argument("--experiment", default="fuxi-nightly")
    p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler of the train step")
    p.add_argument("--scheduler-args")
    tracking(p)
    p.set_defaults(func=cmd_nightly)


# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuxi", description="Train and evaluate FuXi-alpha and its baselines."
    )
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--report-json", help="also write the final report here")
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

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the embedded synthetic data set as sequence Parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--mean-length", type=float, default=40.0)
    p.add_argument("--long-gap-days", type=float, default=2.0, help="median gap between visits")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)

    p = data.add_parser(
        "prepare", help="MovieLens ratings.dat / u.data / ratings.csv or event Parquet -> sequences"
    )
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layout", default="auto", choices=["auto", "ml-dat", "ml-tsv", "ml-csv", "parquet"])
    p.add_argument("--min-length", type=int, default=2)
    p.add_argument("--identity-ids", action="store_true", help="item ids are already rows (no vocabulary)")
    p.add_argument("--min-count", type=int, default=1, help="events before an item gets a row (admission)")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("download", help="download MovieLens from the GroupLens site (needs internet)")
    p.add_argument("--dataset", required=True, choices=["ml-100k", "ml-1m", "ml-20m"])
    p.add_argument("--dest", default="data/raw")
    p.add_argument("--out", help="also prepare the sequence Parquet here")
    p.set_defaults(func=cmd_data_download)

    p = data.add_parser("kuairand", help="KuaiRand-1K / Pure logs -> sequences")
    p.add_argument("--logs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--positive", default="is_click")
    p.add_argument("--min-length", type=int, default=5)
    p.set_defaults(func=cmd_data_kuairand)

    p = data.add_parser("stats", help="summary of a sequence Parquet file")
    p.add_argument("path")
    p.set_defaults(func=cmd_data_stats)

    p = data.add_parser("synth-logs", help="write synthetic raw event logs (date-partitioned Parquet)")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=50_000, help="initial catalogue size (day 0)")
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--events", type=int, default=5_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-fraction", type=float, default=0.0, help="plant this fraction of invalid rows")
    p.add_argument("--rows-per-part", type=int, default=2_000_000)
    p.add_argument(
        "--new-items-per-day",
        type=int,
        default=None,
        help="items introduced on every day after the first (default items // 100; 0 = frozen catalogue)",
    )
    p.add_argument(
        "--new-item-share", type=float, default=0.1, help="share of each day's events on recent new items"
    )
    p.add_argument("--new-item-days", type=int, default=3, help="days an item counts as new")
    p.add_argument("--item-ids", choices=("dense", "hashed", "string"), default="dense")
    p.add_argument("--user-ids", choices=("dense", "hashed", "string"), default="dense")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_synth_logs)

    p = data.add_parser(
        "build-sequences", help="raw event logs -> sequence shards (Ray Data), with a manifest"
    )
    p.add_argument("--logs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-length", type=int, default=200, help="most recent events kept per user")
    p.add_argument("--partitions", type=int, help="hash partitions (default: about 4M events each)")
    p.add_argument(
        "--identity-ids",
        action="store_true",
        help="item ids are already table rows 1..N (no vocabulary; the older contract)",
    )
    p.add_argument(
        "--num-items",
        type=int,
        help="with --identity-ids: catalogue size (item ids 1..N); default: the logs' _logs.json",
    )
    p.add_argument("--min-count", type=int, default=1, help="events before an item gets a row (admission)")
    p.add_argument(
        "--event-types", help="comma-separated event types that count as interactions (default: all)"
    )
    p.add_argument("--dates", help="comma-separated YYYY-MM-DD subset of the log days (default: all)")
    p.set_defaults(func=cmd_data_build_sequences)

    p = data.add_parser("append-day", help="merge one day of logs into sequence shards (no-op if applied)")
    p.add_argument("--logs", required=True)
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--sequences", required=True)
    p.set_defaults(func=cmd_data_append_day)
    add_job_commands(sub)
    add_serving_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        print(f"fuxi: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser"]
