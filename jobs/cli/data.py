"""`fuxi data ...`: synthetic data, MovieLens / KuaiRand preparation, raw logs -> sequence shards."""

from __future__ import annotations

import argparse
import json
import os


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


def _join_ray(args: argparse.Namespace) -> None:
    """--ray-address: the Ray cluster the data path joins. It is handed on as RAY_ADDRESS, which the data
    path reads (pipeline/data/stream.py:ensure_ray), so the flag and the variable mean the same; the flag
    wins when both are set."""
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address


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
    _join_ray(args)
    with ray_session():  # no Ray process outlives this command, also when it is stopped
        print(build_sequences(args.logs, args.out, cfg, dates=dates).summary())
    return 0


def cmd_data_append_day(args: argparse.Namespace) -> int:
    from pipeline.data.build import append_day
    from pipeline.data.stream import ray_session

    _join_ray(args)
    with ray_session():
        print(append_day(args.logs, args.date, args.sequences).summary())
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """fuxi data synth, prepare, download, kuairand, stats, synth-logs, build-sequences, append-day."""
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
    p.add_argument("--input", required=True, help="the raw file: a path or URI (s3://bucket/ratings.csv)")
    p.add_argument(
        "--out", required=True, help="sequence Parquet, a path or URI (vocabulary and bad rows beside it)"
    )
    p.add_argument("--layout", default="auto", choices=["auto", "ml-dat", "ml-tsv", "ml-csv", "parquet"])
    p.add_argument("--min-length", type=int, default=2)
    p.add_argument("--identity-ids", action="store_true", help="item ids are already rows (no vocabulary)")
    p.add_argument("--min-count", type=int, default=1, help="events before an item gets a row (admission)")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("download", help="download MovieLens from the GroupLens site (needs internet)")
    p.add_argument("--dataset", required=True, choices=["ml-100k", "ml-1m", "ml-20m"])
    p.add_argument(
        "--dest", default="data/raw", help="folder or URI for the unpacked data set (fetched locally first)"
    )
    p.add_argument("--out", help="also prepare the sequence Parquet here (a path or URI)")
    p.set_defaults(func=cmd_data_download)

    p = data.add_parser("kuairand", help="KuaiRand-1K / Pure logs -> sequences")
    p.add_argument("--logs", nargs="+", required=True, help="log_*.csv files or folders: paths or URIs")
    p.add_argument("--out", required=True, help="sequence Parquet, a path or URI (item map beside it)")
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
    _ray_address_option(p)
    p.set_defaults(func=cmd_data_build_sequences)

    p = data.add_parser("append-day", help="merge one day of logs into sequence shards (no-op if applied)")
    p.add_argument("--logs", required=True)
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--sequences", required=True)
    _ray_address_option(p)
    p.set_defaults(func=cmd_data_append_day)


def _ray_address_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        help="join this Ray cluster (HOST:PORT of its head); default: RAY_ADDRESS if set, else a local Ray "
        "shut down after the command",
    )
