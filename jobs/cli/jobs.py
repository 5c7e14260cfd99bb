"""`fuxi sweep | tune | report | register | promote | nightly`: jobs that launch training (TorchX) and
read MLflow."""

from __future__ import annotations

import argparse
import json

from jobs.cli.common import quiet_mlflow


def cmd_sweep(args: argparse.Namespace) -> int:
    from jobs.launch import parse_scheduler_args
    from jobs.report import build_report
    from jobs.sweep import parse_grid, run_sweep
    from pipeline.train.tracking import mlflow_client

    quiet_mlflow()
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
        import storage

        out = args.report_dir or storage.join(
            args.sweep_dir, args.name or result.parent_run_id, field="--name"
        )
        report = build_report(
            mlflow_client(args.tracking_uri), result.parent_run_id, out, args.metric, name=args.report_name
        )
        print(report.markdown)
        print(f"report: {report.paths['plot']} {report.paths['leaderboard']}")
    return 0 if result.ok else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from jobs.launch import parse_scheduler_args
    from jobs.tune import check_study_storage, load_space, run_tune, write_study_report

    quiet_mlflow()
    import storage

    if args.storage:
        study_storage = check_study_storage(args.storage)
    elif storage.is_local(args.tune_dir):
        # the study name becomes a file name: confined to --tune-dir (no '..', no absolute path)
        study_db = storage.join(args.tune_dir, f"{args.study}.db", field="--study")
        local_db = storage.parse(study_db).path if "://" in study_db else study_db  # file:// -> its path
        study_storage = f"sqlite:///{local_db}"
    else:  # SQLite needs a local file
        raise SystemExit(
            f"--tune-dir {storage.display(args.tune_dir)}: the study's default SQLite file cannot live on "
            "an object store; pass --storage sqlite:///<a local file>.db or a database URL (postgresql://...)"
        )
    space = load_space(args.space)  # checked before anything is written
    result = run_tune(
        args.preset,
        space,
        study_name=args.study,
        storage=study_storage,
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
        f"{result.seconds:.0f}s; parent run {result.parent_run_id}; storage {storage.display(study_storage)}"
    )
    markdown, paths = write_study_report(
        study_storage,
        args.study,
        args.report_dir or storage.join(args.tune_dir, args.study, field="--study"),
        tracking_uri=args.tracking_uri,
    )
    print(markdown)
    print(f"report: {paths['table']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import build_nightly_report, build_report, report_files
    from pipeline.train.tracking import mlflow_client

    quiet_mlflow()
    name = args.name
    if name == "sweep_report" and (args.study or args.nightly):  # the other reports' default names
        name = f"tune_{args.study}" if args.study else "nightly_report"
    report_files(args.out, name, {"md": "md"})  # refused before MLflow or the study is opened
    if args.study:
        from jobs.tune import write_study_report

        if not args.storage:
            raise SystemExit("fuxi report --study: pass --storage (the study's Optuna storage URL)")
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
            name,
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
    from pipeline.train.tracking import mlflow_client
    from serving import registry

    quiet_mlflow()
    client = mlflow_client(args.tracking_uri)
    mv = registry.register(client, args.run_id, args.name, args.checkpoint, index=args.index)
    print(f"registered {args.name} v{mv.version} from run {args.run_id}")
    if args.promote:
        decision = registry.promote_if_better(client, args.name, mv.version, data=args.data)
        print(json.dumps(decision.as_dict(), indent=1))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.train.tracking import mlflow_client
    from serving import registry

    quiet_mlflow()
    decision = registry.promote_if_better(
        mlflow_client(args.tracking_uri), args.name, args.version, data=args.data, min_delta=args.min_delta
    )
    print(json.dumps(decision.as_dict(), indent=1))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from jobs.launch import parse_scheduler_args
    from jobs.nightly import NightlyConfig, run_nightly

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


def add_commands(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--storage",
        help="Optuna storage URL: a database, never an object store (default sqlite:///<tune-dir>/<study>.db)",
    )
    p.add_argument("--trials", type=int, default=10, help="trials to run in this invocation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per trial (objective: mean)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every trial")
    p.add_argument("--data", help="sequence Parquet for every trial (overrides data.source)")
    p.add_argument("--experiment", help="MLflow experiment (default: the preset's)")
    p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler")
    p.add_argument("--scheduler-args", help="TorchX scheduler options")
    p.add_argument("--cpu", type=int, help="CPUs per job (default: all cores)")
    p.add_argument(
        "--tune-dir",
        default="runs/tune",
        help="run dirs and the report, a path or a URI (s3://...); on disk also the default SQLite study "
        "and the TorchX logs",
    )
    p.add_argument(
        "--report-dir", help="where the study report goes, a path or a URI (default <tune-dir>/<study>)"
    )
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
    p.add_argument("--out", default="runs/report", help="report folder, a path or a URI (s3://...)")
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
