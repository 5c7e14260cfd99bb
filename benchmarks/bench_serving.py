"""Serving benchmarks: batch top-k through Ray Data, the faiss item index, the HTTP endpoint under locust.

    .venv/bin/python benchmarks/bench_serving.py --part batch --users 100000
    .venv/bin/python benchmarks/bench_serving.py --part index --items 100000,1000000
    .venv/bin/python benchmarks/bench_serving.py --part http --seconds 20

The model (batch, http): FuXi-alpha at the cpu-demo config (d=50, 2 layers, history up to 100), trained
one epoch on 500 synthetic users of the 1000-item catalogue (the weights do not change the speed),
tracked in a SQLite MLflow under --out and registered with its faiss index.

batch  `serving.recommend.recommend` (k=100, exact scan, seen filtered) on --users synthetic users with 1
       and 2 Ray actors (1 torch thread each), against the trainer's full-ranking evaluation
       (`pipeline.train.evaluate.evaluate`, 1 torch thread, batches of 256) on the same users in this
       process: users/s and the ratio.
index  clustered synthetic item vectors (D=64; --clusters Gaussian centres, each item = its centre +
       noise of 0.7x the centre's scale, L2-normalised) and 1000 queries (the sum of 2 random centres +
       noise, normalised: users with two interests). Exact: `serving.item_index.exact_top_k` (the serving
       scan, torch, chunks of 65,536) and faiss IndexFlatIP; HNSW for M in --hnsw-m, efSearch in
       --ef-search: recall@100 against the exact top-100 and queries/s (batch of 1000, 2 threads).
http   `fuxi serve` on localhost; benchmarks/locust_serving.py (headless locust, FastHttpUser, no wait)
       at concurrency 1, 8, 32 for --seconds each: p50/p99 latency, requests/s, non-2xx count; the
       server's RSS (peak, sampled every 50 ms); then a corpus of malformed requests, each must get a 4xx.
       Requests: one user each, the last 50 items and timestamps of a synthetic user, k=100.
Results are printed as tables and written to <out>/bench_serving_<part>.json (benchmarks/results/ is
gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fuxi-bench"
K = 100


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# the model


def trained_model(out: Path) -> dict:
    """Train (once, cached under out) and register the benchmark model; returns uri, run, checkpoint."""
    marker = out / "model.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from pipeline.train.config import apply_overrides
    from pipeline.train.presets import get_preset
    from pipeline.train.run import run
    from pipeline.train.tracking import mlflow_client
    from serving import registry

    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out.resolve()}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = mlflow_client(uri)
    if client.get_experiment_by_name("bench-serving") is None:
        client.create_experiment("bench-serving", artifact_location=str((out / "artifacts").resolve()))
    cfg = apply_overrides(
        get_preset("cpu-demo"),
        [
            "epochs=1",
            "data.synthetic.num_users=500",
            "tracking.experiment=bench-serving",
            f"tracking.uri={uri}",
        ],
    )
    cfg.output_dir, cfg.progress = str(out / "runs"), False
    report = run(cfg)
    mv = registry.register(client, report["run_id"], MODEL, index=True)
    registry.promote_if_better(client, MODEL, mv.version, candidate_metric=0.0)
    info = {
        "uri": uri,
        "run_id": report["run_id"],
        "checkpoint": str(report["checkpoint"]),
        "version": mv.version,
    }
    marker.write_text(json.dumps(info))
    return info


def users_file(out: Path, users: int) -> Path:
    from pipeline.data.sequences import write_sequences
    from pipeline.data.synthetic import SyntheticConfig, synthetic_sequences

    path = out / f"users_{users}.parquet"
    if not path.exists():
        write_sequences(synthetic_sequences(SyntheticConfig(num_users=users, num_items=1000, seed=1)), path)
    return path


# ---------------------------------------------------------------------------------------------------
# batch


def eval_throughput(checkpoint: str, sequences: Path, users: int) -> dict:
    """The trainer's full-ranking evaluation on the first `users` rows: users/s."""
    import pyarrow.parquet as pq

    from pipeline.data.collate import collate_arrow
    from pipeline.train.evaluate import evaluate
    from serving.loading import load_checkpoint_model

    torch.set_num_threads(1)  # as one Ray actor: two intra-op threads on a shared 2-core machine stall
    loaded = load_checkpoint_model(checkpoint)
    t = pq.read_table(sequences).slice(0, users)
    max_len = loaded.cfg.model.max_sequence_length
    batches = [collate_arrow(t.slice(s, 256), max_len) for s in range(0, t.num_rows, 256)]
    start = time.perf_counter()
    metrics = evaluate(loaded.model, batches)
    seconds = time.perf_counter() - start
    return {
        "users": int(metrics["num_users"]),
        "seconds": seconds,
        "users_per_s": metrics["num_users"] / seconds,
    }


def bench_batch(args: argparse.Namespace, out: Path) -> dict:
    from serving.recommend import recommend

    model = trained_model(out)
    seqs = users_file(out, args.users)
    ev = eval_throughput(model["checkpoint"], seqs, min(args.users, args.eval_users))
    rows, result = [], {"eval": ev, "recommend": []}
    for workers in (1, 2):
        rep = recommend(
            model["checkpoint"],
            seqs,
            out / f"recs_{workers}.parquet",
            K,
            version="bench",
            workers=workers,
            progress=False,
        )
        r = {
            "workers": workers,
            "users": rep.users,
            "seconds": rep.seconds,
            "users_per_s": rep.users_per_second,
            "steady_users_per_s": rep.steady_users_per_second,
            "first_block_s": rep.first_block_seconds,
        }
        result["recommend"].append(r)
        rows.append(
            [
                f"fuxi recommend, {workers} Ray worker{'s' if workers > 1 else ''}",
                f"{rep.users:,}",
                f"{rep.seconds:.1f}",
                f"{r['users_per_s']:,.0f}",
                f"{r['first_block_s']:.1f}",
                f"{r['users_per_s'] / ev['users_per_s']:.2f}",
            ]
        )
    rows.append(
        [
            "trainer's full-ranking eval (in process, 1 thread)",
            f"{ev['users']:,}",
            f"{ev['seconds']:.1f}",
            f"{ev['users_per_s']:,.0f}",
            "",
            "1.00",
        ]
    )
    print(f"\nbatch top-{K}, {args.users:,} synthetic users, 1000 items, FuXi-alpha cpu-demo config")
    print(table(["path", "users", "seconds", "users/s (wall)", "first results at s", "ratio vs eval"], rows))
    return result


# ---------------------------------------------------------------------------------------------------
# index


def clustered(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    items = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    q = centres[rng.integers(0, clusters, 1000)] + centres[rng.integers(0, clusters, 1000)]
    q += 0.7 * rng.standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return items, q.astype(np.float32)


def bench_index(args: argparse.Namespace, out: Path) -> dict:
    import faiss

    from serving.item_index import build_index, exact_top_k, index_top_k, recall_at_k

    faiss.omp_set_num_threads(2)
    torch.set_num_threads(2)
    result, rows = [], []
    for n in [int(x) for x in args.items.split(",")]:
        items, queries = clustered(n, 64, args.clusters, seed=n)
        items_t, q_t = torch.from_numpy(items), torch.from_numpy(queries)
        start = time.perf_counter()
        _, exact = exact_top_k(q_t, items_t, None, K)
        exact_qps = len(queries) / (time.perf_counter() - start)
        flat = faiss.IndexFlatIP(64)
        flat.add(items)
        start = time.perf_counter()
        flat.search(queries, K + 1)
        flat_qps = len(queries) / (time.perf_counter() - start)
        rows.append(
            [f"{n:,}", "exact scan (torch, serving path)", "", f"{exact_qps:,.0f}", "1.000", "1.0", ""]
        )
        rows.append(
            [
                f"{n:,}",
                "faiss IndexFlatIP",
                "",
                f"{flat_qps:,.0f}",
                "1.000",
                f"{flat_qps / exact_qps:.1f}",
                "",
            ]
        )
        entry = {"items": n, "exact_qps": exact_qps, "flat_qps": flat_qps, "hnsw": []}
        for m in [int(x) for x in args.hnsw_m.split(",")]:
            start = time.perf_counter()
            index = build_index(items, "hnsw", m=m, ef_construction=args.ef_construction)
            build = time.perf_counter() - start
            for ef in [int(x) for x in args.ef_search.split(",")]:
                start = time.perf_counter()
                _, approx = index_top_k(index, queries, None, K, ef_search=ef)
                qps = len(queries) / (time.perf_counter() - start)
                rec = recall_at_k(approx, exact)
                entry["hnsw"].append({"m": m, "ef_search": ef, "build_s": build, "qps": qps, "recall": rec})
                rows.append(
                    [
                        f"{n:,}",
                        f"HNSW M={m}, efC={args.ef_construction}",
                        ef,
                        f"{qps:,.0f}",
                        f"{rec:.3f}",
                        f"{qps / exact_qps:.1f}",
                        f"{build:.0f}",
                    ]
                )
            del index
        result.append(entry)
        print(f"(done {n:,} items)", flush=True)
    print(f"\nitem index: top-{K}, 1000 queries, D=64, {args.clusters} clusters, 2 threads")
    print(
        table(
            ["items", "method", "efSearch", "queries/s", f"recall@{K}", "speed-up vs exact", "build s"], rows
        )
    )
    return {"sizes": result}


# ---------------------------------------------------------------------------------------------------
# http


class PeakRSS:
    """Peak RSS of one process, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


MALFORMED = [
    {"dataframe_records": [{"item_ids": []}]},
    {"dataframe_records": [{"item_ids": "5,17"}]},
    {"dataframe_records": [{"item_ids": [5, 1.5]}]},
    {"dataframe_records": [{"item_ids": [5, 6], "timestamps": [1]}]},
    {"dataframe_records": [{"item_ids": [5]}], "params": {"k": 0}},
    {"dataframe_records": [{"item_ids": [5]}], "params": {"k": -1}},
    {"dataframe_records": [{"item_ids": [5]}], "params": {"k": "ten"}},
    {"dataframe_records": [{"item_ids": list(range(1, 1500))}]},
    {"dataframe_records": [{"item_ids": [5], "user": 3}]},
    {"dataframe_records": [{"item_ids": [5]}], "params": {"top_k": 3}},
    {"dataframe_records": [{"item_ids": [5]}], "extra": 1},
    {"dataframe_records": []},
]


def _post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def bench_http(args: argparse.Namespace, out: Path) -> dict:
    import pyarrow.parquet as pq

    model = trained_model(out)
    t = pq.read_table(users_file(out, 2000)).slice(0, 200)
    bodies = [
        {"dataframe_records": [{"item_ids": i[-50:], "timestamps": s[-50:]}], "params": {"k": K}}
        for i, s in zip(t.column("item_ids").to_pylist(), t.column("timestamps").to_pylist())
    ]
    (out / "bodies.json").write_text(json.dumps(bodies))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=model["uri"])
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "serve",
        "--model",
        f"models:/{MODEL}@champion",
        "--port",
        str(port),
    ]
    log = open(out / "serve.log", "w")
    server = subprocess.Popen(cmd, env=env, cwd=out, stdout=log, stderr=subprocess.STDOUT)
    result: dict = {"levels": []}
    rows = []
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError((out / "serve.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        result["idle_rss_mb"] = psutil.Process(server.pid).memory_info().rss / 2**20
        for users in (1, 8, 32):
            stats_file = out / f"locust_{users}.json"
            client = [sys.executable, str(ROOT / "benchmarks" / "locust_serving.py"), "--host", url]
            client += ["--users", str(users), "--seconds", str(args.seconds)]
            client += ["--bodies", str(out / "bodies.json"), "--out", str(stats_file)]
            with PeakRSS(server.pid) as rss:
                subprocess.run(client, check=True, cwd=out, capture_output=True)
            stats = json.loads(stats_file.read_text())
            stats["server_peak_rss_mb"] = rss.peak / 2**20
            result["levels"].append(stats)
            rows.append(
                [
                    users,
                    f"{stats['requests']:,}",
                    stats["non_2xx"],
                    f"{stats['rps']:.1f}",
                    f"{stats['p50_ms']:.0f}",
                    f"{stats['p99_ms']:.0f}",
                    f"{stats['server_peak_rss_mb']:.0f}",
                ]
            )
        answers = [_post(f"{url}/invocations", body) for body in MALFORMED]
        result["malformed"] = [
            {"body": b, "status": s, "reply": r[:300]} for b, (s, r) in zip(MALFORMED, answers)
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    print(
        f"\nHTTP: fuxi serve (MLflow scoring app, 1 uvicorn worker) on localhost, top-{K}, "
        f"{args.seconds:.0f} s each"
    )
    print(f"idle server RSS {result['idle_rss_mb']:.0f} MB")
    print(
        table(["concurrency", "requests", "non-2xx", "req/s", "p50 ms", "p99 ms", "server peak RSS MB"], rows)
    )
    four = sum(400 <= m["status"] < 500 for m in result["malformed"])
    statuses = [m["status"] for m in result["malformed"]]
    print(f"malformed corpus: {four}/{len(MALFORMED)} got a 4xx; statuses {statuses}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["batch", "index", "http"], required=True)
    ap.add_argument("--out", default="benchmarks/results/serving")
    ap.add_argument("--users", type=int, default=100_000, help="batch: synthetic users")
    ap.add_argument("--eval-users", type=int, default=20_000, help="batch: users the evaluation is timed on")
    ap.add_argument("--items", default="100000,1000000", help="index: catalogue sizes")
    ap.add_argument("--clusters", type=int, default=2000, help="index: Gaussian centres of the item vectors")
    ap.add_argument("--hnsw-m", default="32", help="index: HNSW M values")
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--ef-search", default="128,256,512", help="index: HNSW efSearch values")
    ap.add_argument("--seconds", type=float, default=20, help="http: seconds per concurrency level")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    result = {"batch": bench_batch, "index": bench_index, "http": bench_http}[args.part](args, out)
    (out / f"bench_serving_{args.part}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
