"""`fuxi recommend | index | serve | export`: batch top-k, the faiss item index, HTTP serving, torch.export
(the `serving` package)."""

from __future__ import annotations

import argparse
import json
import os

from jobs.cli.common import quiet_mlflow


def cmd_recommend(args: argparse.Namespace) -> int:
    from serving.recommend import recommend, resolve_model

    quiet_mlflow()
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
    from serving.item_index import index_checkpoint
    from serving.loading import load_checkpoint_model
    from serving.recommend import resolve_model

    quiet_mlflow()
    model = resolve_model(args.model, args.tracking_uri, args.cache)
    path, meta = index_checkpoint(
        load_checkpoint_model(model.checkpoint), args.kind, args.m, args.ef_construction, args.nlist
    )
    print(f"wrote {path} ({meta['kind']}, {meta['rows']:,} rows, {meta['build_seconds']:.1f}s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.pyfunc import Limits
    from serving.server import ServerSettings, check_bind, read_token, serve

    # settings and bind first: a refused value costs no model load
    def given(**values: object) -> dict:
        return {k: v for k, v in values.items() if v is not None}

    settings = ServerSettings(
        Limits(**given(max_users=args.max_users, max_history=args.max_history, max_k=args.max_k)),
        token=read_token(args.token_file),
        **given(max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout),
    )
    check_bind(args.host, settings)
    quiet_mlflow()
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    serve(args.model, args.host, args.port, settings, args.tracking_uri, args.cache)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from serving.export import export_encoder
    from serving.recommend import resolve_model

    quiet_mlflow()
    model = resolve_model(args.model, args.tracking_uri, args.cache)
    report = export_encoder(model.checkpoint, args.out, args.batch, args.length)
    print(json.dumps(report, indent=1))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """fuxi recommend, index, serve, export."""

    def model(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            required=True,
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, a checkpoint folder, or a "
            "checkpoint on a store (s3://BUCKET/RUN/checkpoints, a pointer or a generation)",
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

    p = sub.add_parser("serve", help="serve a model over HTTP (MLflow's request layout, strict checks)")
    model(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address; off loopback a token is required")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--token-file", help="bearer token clients must send (default $FUXI_SERVE_TOKEN)")
    p.add_argument("--max-k", type=int, help="largest k a request may ask for (default 1000)")
    p.add_argument("--max-history", type=int, help="item ids per user (default 1000)")
    p.add_argument("--max-users", type=int, help="users per request (default 256)")
    p.add_argument("--max-body-bytes", type=int, help="request body size (default 16 MiB)")
    p.add_argument("--body-timeout", type=float, help="seconds a request body may take (default 10)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="torch.export the user encoder (fixed batch and history length)")
    model(p)
    p.add_argument("--out", required=True, help="output folder: encoder.pt2, item_vectors, manifest")
    p.add_argument("--batch", type=int, default=1, help="users per call of the exported program")
    p.add_argument("--length", type=int, help="history length (default the model's max_sequence_length)")
    p.set_defaults(func=cmd_export)
