"""Id-space sizes at scale: how large an item vocabulary gets, against a fixed-size managed-collision table.

    .venv/bin/python benchmarks/bench_id_space.py [--events 10000000] [--out DIR]

Generates synthetic logs with `pipeline.data.synth_logs.generate_slice` (hashed int64 item and user ids, new
items every day) slice by slice in memory, nothing on disk, and counts them with bounded memory: each slice's
ids are reduced by `np.unique`, and the running per-item table (sorted raw id, count, first day, first
timestamp) is merged with it. Users are only counted (distinct), merging their slice uniques every few slices.
Reported: distinct items and users; the vocabulary (rows 1..N for the items with count >= min_count) as
Parquet bytes (raw_id, row, first_day, first_timestamp, count; written once to a temp dir) and in memory
(Arrow table bytes; a numpy sorted-array lookup: raw ids + rows, searchsorted); the item embedding table at
`--dim` fp32 for the vocabulary vs an MCH table of `--mch-slots` slots; generation and counting rates, and
the distinct-item growth curve (for extrapolating to sizes not run; `--stop-after-days` measures the
first days of a large configuration).
Results: printed, and written to DIR/bench_id_space.json (default benchmarks/results/bench_id_space,
gitignored).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.synth_logs import SECONDS_PER_DAY, LogConfig, _static, generate_slice, plan_days


class ItemCounts:
    """Running per-item counts keyed by sorted raw id; memory O(distinct items)."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.count = np.zeros(0, np.int64)
        self.first_day = np.zeros(0, np.int32)
        self.first_ts = np.zeros(0, np.int64)

    def add(self, items: np.ndarray, times: np.ndarray, day: int) -> None:
        # a slice is sorted by time, so an id's first index is its first timestamp in the slice
        ids, first, count = np.unique(items, return_index=True, return_counts=True)
        all_ids = np.concatenate([self.ids, ids])
        merged, inv = np.unique(all_ids, return_inverse=True)
        n_old = len(self.ids)
        cnt = np.bincount(inv, weights=np.concatenate([self.count, count]), minlength=len(merged))
        fday = np.full(len(merged), np.iinfo(np.int32).max, np.int32)
        fts = np.full(len(merged), np.iinfo(np.int64).max, np.int64)
        np.minimum.at(fday, inv[:n_old], self.first_day)
        np.minimum.at(fts, inv[:n_old], self.first_ts)
        new = inv[n_old:]
        np.minimum.at(fday, new, np.int32(day))
        np.minimum.at(fts, new, times[first])
        self.ids, self.count, self.first_day, self.first_ts = merged, cnt.astype(np.int64), fday, fts


def vocabulary(counts: ItemCounts, min_count: int) -> pa.Table:
    """Admitted items as rows 1..N in order of first appearance (first timestamp, then raw id)."""
    keep = np.flatnonzero(counts.count >= min_count)
    order = keep[np.lexsort((counts.ids[keep], counts.first_ts[keep]))]
    return pa.table(
        {
            "raw_id": counts.ids[order],
            "row": np.arange(1, len(order) + 1, dtype=np.int64),
            "first_day": counts.first_day[order],
            "first_timestamp": counts.first_ts[order],
            "count": counts.count[order],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=None, help="default: events // 50")
    ap.add_argument("--items", type=int, default=None, help="day-0 catalogue; default: events // 500")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--new-items-per-day", type=int, default=None, help="default: items // 100")
    ap.add_argument("--slice", type=int, default=4_000_000, help="events per generated slice")
    ap.add_argument("--min-count", type=int, default=5, help="vocabulary admission")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--mch-slots", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after-days", type=int, default=None, help="measure only the first days")
    ap.add_argument("--out", default="benchmarks/results/bench_id_space")
    args = ap.parse_args()

    items = args.items or max(1000, args.events // 500)
    cfg = LogConfig(
        num_users=args.users or max(1000, args.events // 50),
        num_items=items,
        num_days=args.days,
        num_events=args.events,
        seed=args.seed,
        rows_per_part=args.slice,
        new_items_per_day=items // 100 if args.new_items_per_day is None else args.new_items_per_day,
        item_ids="hashed",
        user_ids="hashed",
    )
    t_start = time.perf_counter()
    st = _static(cfg)
    t_static = time.perf_counter() - t_start
    counts = ItemCounts()
    users = np.zeros(0, np.int64)
    pending: list[np.ndarray] = []
    t_gen = t_count = 0.0
    seen = 0
    growth = []
    for d, (_, t_day, parts) in enumerate(plan_days(cfg)[: args.stop_after_days]):
        width = SECONDS_PER_DAY / len(parts)
        for k, n in enumerate(parts):
            t0 = time.perf_counter()
            table = generate_slice(
                cfg, st, d, k, t_day + int(k * width), t_day + int((k + 1) * width), int(n)
            )
            t1 = time.perf_counter()
            counts.add(table["item_id"].to_numpy(), table["timestamp"].to_numpy(), d)
            pending.append(np.unique(table["user_id"].to_numpy()))
            if len(pending) >= 8:
                users = np.unique(np.concatenate([users, *pending]))
                pending = []
            t_count += time.perf_counter() - t1
            t_gen += t1 - t0
            seen += int(n)
        growth.append({"day": d, "events": seen, "distinct_items": len(counts.ids)})
        print(f"day {d}: {seen:,} events, {len(counts.ids):,} distinct items", flush=True)
    users = np.unique(np.concatenate([users, *pending]))

    vocab_all = vocabulary(counts, 1)
    vocab = vocabulary(counts, args.min_count)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.parquet"
        pq.write_table(vocab, path, compression="zstd")
        parquet_bytes = path.stat().st_size
        pq.write_table(vocab_all, path, compression="zstd")
        parquet_bytes_all = path.stat().st_size
    # lookup structure: raw ids sorted + their rows; one slice of raw ids looked up by searchsorted
    order = np.argsort(vocab["raw_id"].to_numpy())
    keys, rows = vocab["raw_id"].to_numpy()[order], vocab["row"].to_numpy()[order]
    probe = table["item_id"].to_numpy()
    t0 = time.perf_counter()
    pos = np.searchsorted(keys, probe).clip(0, len(keys) - 1)
    looked = np.where(keys[pos] == probe, rows[pos], 0)
    t_lookup = time.perf_counter() - t0
    result = {
        "config": {k: v for k, v in vars(cfg).items()},
        "events": seen,
        "distinct_items": len(counts.ids),
        "catalogue_items": cfg.total_items,
        "distinct_users": len(users),
        "min_count": args.min_count,
        "vocab_rows": vocab.num_rows,
        "vocab_rows_min_count_1": vocab_all.num_rows,
        "vocab_parquet_bytes": parquet_bytes,
        "vocab_parquet_bytes_min_count_1": parquet_bytes_all,
        "vocab_arrow_bytes": vocab.nbytes,
        "vocab_lookup_bytes": keys.nbytes + rows.nbytes,
        "lookup_ids_per_s": len(probe) / t_lookup,
        "lookup_hit_rate": float(np.mean(looked > 0)),
        "item_table_bytes": (vocab.num_rows + 1) * args.dim * 4,
        "mch_slots": args.mch_slots,
        # embedding rows + MCH buffers (sorted raw ids, remapped mapping, one int64 of eviction metadata)
        "mch_table_bytes": args.mch_slots * (args.dim * 4 + 3 * 8),
        "counting_state_bytes": counts.ids.nbytes * 3 + counts.first_day.nbytes + users.nbytes,
        "seconds_static": t_static,
        "seconds_generate": t_gen,
        "seconds_count": t_count,
        "generate_events_per_s": seen / t_gen,
        "count_events_per_s": seen / t_count,
        "seconds_total": time.perf_counter() - t_start,
        "growth": growth,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_id_space.json").write_text(json.dumps(result, indent=1))
    for k, v in result.items():
        if k not in ("config", "growth"):
            print(f"{k:32s} {v:,.1f}" if isinstance(v, float) else f"{k:32s} {v:,}")


if __name__ == "__main__":
    main()
