"""`fuxi sweep | report | register | promote | nightly`: registered by `add_commands(subparsers)`.

Imports stay inside the handlers so `fuxi --help` does not load MLflow or torch.
"""

from __future__ import annotations

import argparse
import json
import os


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def cmd_sweep(args: argparse.Namespace) -> int:
    from jobs.report import build_report
    from jobs.sweep import mlflow_client, parse_grid, parse_scheduler_args, run_sweep

    _quiet_mlflow()
    grid = parse_grid(args.grid)
    result = run_sweep(
        args.preset, grid, args.set or [], name=args.name, experiment=args.experiment, tracking_uri=args.tracking_uri,
        sweep_dir=args.sweep_dir, scheduler=args.scheduler, scheduler_cfg=parse_scheduler_args(args.scheduler_args),
        parallel=args.parallel, data=args.data, cpu=args.cpu,
    )
    print(f"sweep parent run {result.parent_run_id}: {sum(j.state == 'SUCCEEDED' for j in result.jobs)}/"
          f"{len(result.jobs)} jobs succeeded in {result.seconds:.0f}s")
    if not args.no_report:
        out = args.report_dir or f"{args.sweep_dir}/{args.name or result.parent_run_id}"
        report = build_report(mlflow_client(args.tracking_uri), result.parent_run_id, out, args.metric,
                              name=args.report_name)
        print(report.markdown)
        print(f"report: {report.paths['plot']} {report.paths['leaderboard']}")
    return 0 if result.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import build_report
    from jobs.sweep import mlflow_client

    _quiet_mlflow()
    report = build_report(mlflow_client(args.tracking_uri), args.parent_run_id, args.out, args.metric,
                          log_to_parent=not args.no_log, name=args.name)
    print(report.markdown)
    print(f"report: {report.paths['plot']} {report.paths['leaderboard']}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from jobs import registry
    from jobs.sweep import mlflow_client

    _quiet_mlflow()
    client = mlflow_client(args.tracking_uri)
    mv = registry.register(client, args.run_id, args.name, args.checkpoint)
    print(f"registered {args.name} v{mv.version} from run {args.run_id}")
    if args.promote:
        decision = registry.promote_if_better(client, args.name, mv.version, data=args.data)
        print(json.dumps(decision.as_dict(), indent=1))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from jobs import registry
    from jobs.sweep import mlflow_client

    _quiet_mlflow()
    decision = registry.promote_if_better(mlflow_client(args.tracking_uri), args.name, args.version, data=args.data,
                                          min_delta=args.min_delta)
    print(json.dumps(decision.as_dict(), indent=1))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from jobs.nightly import NightlyConfig, run_nightly
    from jobs.sweep import parse_scheduler_args

    cfg = NightlyConfig(
        date=args.date, workdir=args.workdir, preset=args.preset, overrides=args.set or [], model_name=args.name,
        experiment=args.experiment, tracking_uri=args.tracking_uri, scheduler=args.scheduler,
        scheduler_cfg=parse_scheduler_args(args.scheduler_args), logs_dir=args.logs, sequences=args.sequences,
        demo_data=not args.no_demo_data, demo_logs=parse_scheduler_args(args.demo_logs),
    )
    state = run_nightly(cfg, args.step, force=args.force)
    final = state["steps"].get("register_promote", {}).get("outputs")
    if final:
        print(f"nightly {args.date}: v{final['version']} promoted={final['decision']['promoted']} "
              f"({final['decision']['reason']})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    def tracking(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    p = sub.add_parser("sweep", help="launch a grid of TorchX training jobs under one parent MLflow run")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="one axis of the grid, any config field, e.g. --grid model.num_layers=1,2,4")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every point")
    p.add_argument("--data", help="sequence Parquet for every point (overrides data.source)")
    p.add_argument("--name", help="sweep (parent run) name; default sweep-<preset>-<time>")
    p.add_argument("--experiment", help="MLflow experiment (default: the preset's)")
    p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler: local_cwd, kubernetes, slurm, ...")
    p.add_argument("--scheduler-args", help="TorchX scheduler options, e.g. queue=default,namespace=recsys")
    p.add_argument("--parallel", type=int, default=1, help="jobs in flight at once")
    p.add_argument("--cpu", type=int, help="CPUs per job (default: cores / parallel)")
    p.add_argument("--sweep-dir", default="runs/sweeps", help="run dirs and TorchX logs (local schedulers)")
    p.add_argument("--report-dir", help="where the report goes (default <sweep-dir>/<name>)")
    p.add_argument("--report-name", default="sweep_report", help="report file names: NAME.md, NAME.png, NAME.json")
    p.add_argument("--metric", default="final_test/ndcg_at_10")
    p.add_argument("--no-report", action="store_true")
    tracking(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="leaderboard + scaling curves of a sweep, from MLflow search_runs")
    p.add_argument("--parent-run-id", required=True)
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
    p.add_argument("--promote", action="store_true", help="then promote to @champion if it beats the champion")
    p.add_argument("--data", help="validation data for the comparison (default: the candidate's)")
    tracking(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move @champion to a version only if it beats the champion on validation")
    p.add_argument("--version", required=True)
    p.add_argument("--name", default="fuxi-alpha")
    p.add_argument("--data", help="validation data for the comparison (default: the candidate's)")
    p.add_argument("--min-delta", type=float, default=0.0)
    tracking(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("nightly", help="ingest -> sequences -> warm-start train -> evaluate -> register/promote")
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--step", action="append", choices=["ingest", "update_sequences", "train", "evaluate",
                                                       "register_promote"],
                   help="run only this step (repeatable); default: all steps not yet done")
    p.add_argument("--force", action="store_true", help="re-run steps already done for this date")
    p.add_argument("--workdir", default="runs/nightly", help="state, logs, sequences and runs")
    p.add_argument("--logs", help="log root holding date=YYYY-MM-DD partitions (default <workdir>/logs)")
    p.add_argument("--sequences", help="sequence data updated by the job (default <workdir>/sequences)")
    p.add_argument("--no-demo-data", action="store_true", help="fail when the day's logs are missing")
    p.add_argument("--demo-logs", help="synth-logs sizes of the demo window, e.g. users=300,items=200,events=21000")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--name", default="fuxi-alpha", help="registered model name")
    p.add_argument("--experiment", default="fuxi-nightly")
    p.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler of the train step")
    p.add_argument("--scheduler-args")
    tracking(p)
    p.set_defaults(func=cmd_nightly)
