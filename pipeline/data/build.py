"""Raw event logs -> per-user sequence shards, as Ray Data map tasks; incremental by day, idempotent.

Two stages, each a Ray Data `from_items(specs).map(task)` (no global groupby: stack-notes section 2 measured
`groupby().map_groups()` 30x slower than hash-partition + per-partition sort):
  scatter  one task per raw part file: validate (`pipeline.data.ingest`), quarantine bad rows, hash the user
           id into P partitions and write the good events of each partition as their own row groups of one
           temporary file. Memory: one 1M-row batch.
  gather   one task per partition: read its row groups from every scattered file (+ the existing shard when
           appending), sort by (user, time) keeping the read order within a tie, drop exact duplicate
           (user, item, time) events, keep the
           last `max_length` events of each user with their timestamps, write the shard sorted by user.
           Memory: one partition (about rows_per_partition events).

Output directory (a "sequence shard directory": a local folder or an object-store prefix such as
`s3://bucket/seq`; `read_sequences(dir)` and `pipeline.data.stream` read it):
    manifest.json                          format, num_items, max_length, partitions, shards, days, totals
    part-PPPPP-gGGGGGG.parquet             SEQUENCE_SCHEMA; P partitions of generation G; row groups
                                           of `row_group_rows` users (the streaming unit of
                                           `pipeline.data.stream`)
    quarantine/date=YYYY-MM-DD/<part>.gGGGGGG.quarantine.parquet   bad rows (`pipeline.data.ingest`),
                                           published by the commit that names them
The manifest is the commit point, the pointer of storage/commit.py's protocol with its own layout: every
object of a new generation (shards, vocabulary, quarantine files, all named by generation and never changed)
is written first, then the manifest, last, as one object, conditionally on the version this run read
(`storage.commit.write_conditional`: If-Match / If-None-Match on S3, a lock + compare + rename on disk), so
two builds of one directory cannot both commit (the second gets CommitConflict); then what the manifest no
longer names is deleted, by listing. A job killed before the commit leaves the old manifest valid (and
re-running redoes the work); a day recorded in the manifest is never applied twice: `append_day` of a
recorded day with the same files (name, bytes, rows) is a no-op, with different files an error. The Ray
tasks get URIs and read and write the store themselves (workers inherit the driver's AWS_* environment).

Rules (the same for a full build and for appends, so appending day by day equals a full rebuild):
  order      time; events of one user sharing a timestamp keep the logs' order (as
             `pipeline.data.sequences.events_to_sequences`): day, then part file (by name), then row. The
             scatter keeps row order within a partition and the gather stacks the stored shard first, then
             the days in date order, so appending days in date order equals a rebuild here too.
  dedup      exact duplicates of (user_id, item_id, timestamp) are kept once, the first in that order
             (event_type is not kept)
  truncate   the last `max_length` events per user. Appending keeps only the stored last max_length events
             of a user and merges the new ones: the same result as a rebuild, since anything truncated
             away is older than every kept event.
  num_items  catalogue size + 1 when a catalogue is configured (`--num-items`, or `_logs.json` of the
             logs); otherwise max item id seen + 1, growing with appends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

import storage
from pipeline.data.ingest import (
    IngestReport,
    IngestRules,
    check_log_schema,
    day_files,
    event_schema,
    fingerprint,
    id_key_type,
    log_days,
    read_logs_meta,
    report_of,
    scan_log_file,
    source_name,
)
from pipeline.data.readers import write_quarantine
from pipeline.data.schema import QUARANTINE_SCHEMA, SEQUENCE_SCHEMA, SHARD_MANIFEST, sequence_schema
from pipeline.data.sequences import open_parquet, read_parquet, shard_uris, time_order, write_parquet
from pipeline.data.vocab import Vocabulary, read_vocabulary, write_vocabulary
from storage.commit import read_versioned, write_conditional

FORMAT = "fuxi.sequence-shards/1"
MIN_LENGTHS = (
    2,
    3,
    4,
)  # row-group counts of users with at least this many events (see `pipeline.data.stream`)
_SHARD_WRITE = dict(
    compression="zstd",
    use_dictionary=False,
    column_encoding={"timestamps.list.element": "DELTA_BINARY_PACKED"},
)


@dataclass
class BuildConfig:
    max_length: int = 200  # events kept per user (the most recent)
    num_partitions: int | None = None  # None: ceil(rows / rows_per_partition), at least 2
    rows_per_partition: int = 4_000_000  # bounds a gather task's memory (~150 bytes per event)
    row_group_rows: int = 8192  # users per shard row group
    rules: IngestRules = field(default_factory=IngestRules)
    min_count: int = 1  # events before an item gets a row (vocabulary admission)

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a history and a target), got {self.max_length}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")


@dataclass
class BuildReport:
    out: str  # the shard directory: a local path or a URI
    op: str  # build | append
    days: list[str]
    skipped_days: list[str]
    ingest: IngestReport
    users: int  # users in the directory after this run
    sequences_written: int  # shard rows written by this run
    interactions: int  # events stored after this run
    duplicates_dropped: int
    truncated: int  # events dropped by max_length in this run
    num_items: int
    partitions: int
    seconds: float
    new_items: int = 0  # vocabulary rows added by this run

    def summary(self) -> str:
        if not self.days:
            return f"{self.out}: day(s) {', '.join(self.skipped_days)} already applied; nothing to do"
        text = (
            f"{self.op} {', '.join(self.days)}: {self.ingest.summary()}; "
            f"{self.users:,} users, {self.sequences_written:,} sequences written to "
            f"{self.partitions} shards, "
            f"{self.interactions:,} events stored ({self.duplicates_dropped:,} duplicates dropped, "
            f"{self.truncated:,} beyond max length); num_items {self.num_items:,} "
            f"({self.new_items:,} new); {self.seconds:.1f} s"
        )
        if self.skipped_days:
            text += f"; skipped (already applied): {', '.join(self.skipped_days)}"
        return text


# ------------------------------------------------------------------------------------------------------------
# pure functions (numpy / pyarrow; no Ray)


def partition_of(users: np.ndarray | pa.Array, num_partitions: int) -> np.ndarray:
    """Stable hash partition of user ids (splitmix64 finaliser), the same in every process and run; string
    ids are first hashed to 64 bits (pandas' keyed SipHash, fixed key)."""
    if isinstance(users, pa.ChunkedArray):
        users = users.combine_chunks()
    if isinstance(users, pa.Array):
        if pa.types.is_integer(users.type):
            users = users.to_numpy(zero_copy_only=False)
        else:
            users = pd.util.hash_array(np.asarray(users.to_pylist(), dtype=object), categorize=False)
    x = users.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(num_partitions)).astype(np.int64)


def group_events(events: pa.Table, max_length: int) -> tuple[pa.Table, dict[str, int]]:
    """(user_id, item_id, timestamp) events -> SEQUENCE_SCHEMA rows sorted by user; plus counts."""
    n_in = events.num_rows
    schema = sequence_schema(events.schema.field("user_id").type)
    if n_in == 0:
        return schema.empty_table(), {"events": 0, "duplicates": 0, "truncated": 0}
    order = time_order(events)  # ties: row order, i.e. (stored shard, day, file, row) as gather_task stacks
    u, i, t = (
        events[c].take(order).to_numpy(zero_copy_only=False) for c in ("user_id", "item_id", "timestamp")
    )
    keep = first_copies(u, i, t)
    n_dup = int(n_in - keep.sum())
    if n_dup:
        u, i, t = u[keep], i[keep], t[keep]
    n = len(u)
    first = np.r_[True, u[1:] != u[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], n]
    lengths = ends - starts
    n_trunc = int(np.maximum(lengths - max_length, 0).sum())
    if n_trunc:
        gid = np.cumsum(first) - 1
        keep = np.arange(n) >= (ends - max_length)[gid]
        i, t = i[keep], t[keep]
        lengths = np.minimum(lengths, max_length)
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    table = pa.Table.from_arrays(
        [
            pa.array(u[starts]),
            pa.ListArray.from_arrays(offsets, pa.array(i)),
            pa.ListArray.from_arrays(offsets, pa.array(t)),
        ],
        schema=schema,
    )
    return table, {"events": n_in, "duplicates": n_dup, "truncated": n_trunc}


def first_copies(u: np.ndarray, i: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Keep-mask over events in time order: False for a repeat of an earlier (user, item, timestamp).

    Copies share (user, timestamp), so only rows inside a tie can repeat one; those few rows are sorted once
    more by item (then position, so the earliest copy is the one kept) to find the repeats."""
    same = (u[1:] == u[:-1]) & (t[1:] == t[:-1])  # row k+1 shares row k's (user, timestamp)
    keep = np.ones(len(u), dtype=bool)
    tied = np.flatnonzero(np.r_[same, False] | np.r_[False, same])
    if len(tied) == 0:
        return keep
    group = np.cumsum(np.r_[True, ~same])[tied]  # one id per (user, timestamp)
    by_item = np.lexsort((tied, i[tied], group))  # np.lexsort: the last key is the primary one
    g, it = group[by_item], i[tied][by_item]
    repeat = np.r_[False, (g[1:] == g[:-1]) & (it[1:] == it[:-1])]
    keep[tied[by_item][repeat]] = False
    return keep


def sequences_to_events(seq: pa.Table) -> pa.Table:
    """The inverse of group_events (for merging a day into a stored shard)."""
    lengths = pc.list_value_length(seq["item_ids"]).to_numpy(zero_copy_only=False)
    user_type = seq.schema.field("user_id").type
    users = np.repeat(seq["user_id"].to_numpy(zero_copy_only=False), lengths)
    items = pc.list_flatten(seq["item_ids"]).to_numpy(zero_copy_only=False)
    times = pc.list_flatten(seq["timestamps"]).to_numpy(zero_copy_only=False)
    return pa.Table.from_arrays(
        [pa.array(users, user_type), pa.array(items), pa.array(times)], schema=event_schema(None, user_type)
    )


def row_group_counts(lengths: np.ndarray, rows_per_group: int) -> list[list[int]]:
    """Per row group: [rows, users with >= 2 events, >= 3, >= 4] (what a stream needs to plan equal steps)."""
    out = []
    for s in range(0, len(lengths), rows_per_group):
        chunk = lengths[s : s + rows_per_group]
        out.append([int(len(chunk))] + [int((chunk >= m).sum()) for m in MIN_LENGTHS])
    return out


# ------------------------------------------------------------------------------------------------------------
# the two Ray Data tasks (plain functions of a JSON spec; run inline by `_run_tasks(..., ray=False)`)


def scatter_task(spec: dict) -> dict:
    """Validate one raw file, quarantine its bad rows, write its good events grouped by partition and (with
    a vocabulary) its item counts: raw id, events, first timestamp."""
    path, num_parts = spec["path"], spec["partitions"]
    rules = IngestRules(**spec["rules"])
    schema = check_log_schema(path, rules)
    writer, rg, part_rgs = None, 0, [[] for _ in range(num_parts)]
    bads, counts, rows_read, kept, filtered, max_item = [], [], 0, 0, 0, 0
    stream = None  # the scattered file: a task-private name under the build's `_tmp-gG` folder or prefix
    for good, bad, n_filtered in scan_log_file(path, rules, spec["source"]):
        rows_read += good.num_rows + bad.num_rows + n_filtered
        kept += good.num_rows
        filtered += n_filtered
        if bad.num_rows:
            bads.append(bad)
        if good.num_rows == 0:
            continue
        if rules.identity_ids:
            max_item = max(max_item, int(pc.max(good["item_id"]).as_py()))
        else:
            counts.append(_item_counts(good))
        part = partition_of(good["user_id"], num_parts)
        order = np.argsort(part, kind="stable")
        sizes = np.bincount(part, minlength=num_parts)
        grouped = good.take(pa.array(order))
        if writer is None:
            stream = storage.open_output(spec["out"])
            writer = pq.ParquetWriter(stream, good.schema, compression="lz4")
        offsets = np.r_[0, np.cumsum(sizes)]
        for p in np.flatnonzero(sizes):
            writer.write_table(grouped.slice(int(offsets[p]), int(sizes[p])), row_group_size=int(sizes[p]))
            part_rgs[p].append(rg)
            rg += 1
    if writer is not None and stream is not None:
        writer.close()
        stream.close()
    items_file = None
    if counts:
        items_file = spec["out"] + ".items.parquet"
        write_parquet(_item_counts(pa.concat_tables(counts), merge=True), items_file)
    bad_all = pa.concat_tables(bads) if bads else QUARANTINE_SCHEMA.empty_table()
    qpath = write_quarantine(bad_all, spec["quarantine"])  # no bad rows: removes a stale file
    report = report_of(rows_read, kept, bad_all, spec["quarantine_name"] if qpath else None, filtered)
    return {
        "date": spec["date"],
        "source": spec["source"],
        "file": spec["out"] if writer is not None else None,
        "items": items_file,
        "keys": {"item": id_key_type(schema, "item_id"), "user": id_key_type(schema, "user_id")},
        "row_groups": part_rgs,
        "max_item": max_item,
        "report": report.to_dict(),
    }


def _item_counts(events: pa.Table, merge: bool = False) -> pa.Table:
    """(item_id, count, first_timestamp) per distinct raw item id of validated events (or of such tables)."""
    if merge:
        agg = events.group_by("item_id").aggregate([("count", "sum"), ("first_timestamp", "min")])
        names = {"count": "count_sum", "first_timestamp": "first_timestamp_min"}
    else:
        agg = events.group_by("item_id").aggregate([("item_id", "count"), ("timestamp", "min")])
        names = {"count": "item_id_count", "first_timestamp": "timestamp_min"}
    return pa.table(
        {
            "item_id": agg["item_id"],
            "count": agg[names["count"]].cast(pa.int64()),
            "first_timestamp": agg[names["first_timestamp"]],
        }
    )


def gather_task(spec: dict) -> dict:
    """Build one partition's shard from its scattered row groups (+ the stored shard when appending); with a
    vocabulary, raw item ids become rows, and events of items not admitted by their day are left out."""
    tables, below = [], {}
    pieces = [open_parquet(path).read_row_groups(rgs) for path, rgs, _ in spec["pieces"]]
    if pieces and spec.get("vocab"):  # one lookup for the whole partition
        mapping = read_parquet(spec["vocab"])  # raw_id, row, admitted (YYYYMMDD, 0 = pending)
        keys = mapping["raw_id"].combine_chunks()
        rows, admitted = mapping["row"].to_numpy(), mapping["admitted"].to_numpy()
        t = pa.concat_tables(pieces).combine_chunks()
        day_of_row = np.repeat(
            np.array([int(d.replace("-", "")) for _, _, d in spec["pieces"]], dtype=np.int64),
            [p.num_rows for p in pieces],
        )
        # a pandas hash index probes ~3x faster than a binary search or pc.index_in here
        raw = t["item_id"].to_numpy(zero_copy_only=False)
        idx = pd.Index(keys.to_numpy(zero_copy_only=False)).get_indexer(raw)
        ok = idx >= 0
        ok[ok] = (admitted[idx[ok]] > 0) & (admitted[idx[ok]] <= day_of_row[ok])
        for d in np.unique(day_of_row[~ok]):
            date = f"{d // 10000:04d}-{d // 100 % 100:02d}-{d % 100:02d}"
            below[date] = int(((day_of_row == d) & ~ok).sum())
        mask = pa.array(ok)
        pieces = [
            pa.Table.from_arrays(
                [t["user_id"].filter(mask), pa.array(rows[idx[ok]]), t["timestamp"].filter(mask)],
                schema=event_schema(None, t.schema.field("user_id").type),
            )
        ]
    if spec.get("existing"):  # first: its events are of earlier days, and ties keep the logs' order
        tables.append(sequences_to_events(read_parquet(spec["existing"], columns=SEQUENCE_SCHEMA.names)))
    tables.extend(pieces)  # in (day, file, row) order: the order of the scatter specs
    user_type = pa.string() if spec.get("user_key") == "string" else pa.int64()
    events = (
        pa.concat_tables(tables).combine_chunks() if tables else event_schema(None, user_type).empty_table()
    )
    seq, counts = group_events(events, spec["max_length"])
    del events, tables
    write_parquet(seq, spec["out"], row_group_size=spec["row_group_rows"], **_SHARD_WRITE)
    lengths = pc.list_value_length(seq["item_ids"]).to_numpy(zero_copy_only=False)
    return {
        "partition": spec["partition"],
        "file": storage.name_of(spec["out"]),
        "rows": seq.num_rows,
        "interactions": int(lengths.sum()),
        "row_groups": row_group_counts(lengths, spec["row_group_rows"]),
        "below_admission": below,
        **counts,
    }


# A task that needs a CPU waits for one forever: Ray Data only warns "The job may hang forever unless the
# cluster scales up" (ray-project/ray#45909). A cluster left with no CPU at all (every worker node lost; a
# cluster's head often has none) fails the stage after this long instead, before anything is committed.
NO_CPU_TIMEOUT_S = 60.0


def _run_tasks(
    fn: Callable[[dict], dict],
    specs: list[dict],
    desc: str,
    progress: bool,
    no_cpu_timeout_s: float | None = None,
) -> list[dict]:
    """Run `fn` over specs as Ray Data map tasks (one task per spec), with a progress bar. The results are
    read in a thread; this one watches the cluster's CPUs (NO_CPU_TIMEOUT_S)."""
    import ray
    import ray.data

    from pipeline.data.stream import ensure_ray, quiet_context

    if not specs:
        return []
    ensure_ray()

    def task(row: dict[str, Any]) -> dict[str, Any]:
        return {"result": json.dumps(fn(json.loads(row["spec"])))}

    ds = ray.data.from_items([{"spec": json.dumps(s)} for s in specs], override_num_blocks=len(specs)).map(
        task
    )
    quiet_context(ds.context)
    timeout = NO_CPU_TIMEOUT_S if no_cpu_timeout_s is None else no_cpu_timeout_s
    out: list[dict] = []
    failed: list[BaseException] = []

    def collect() -> None:
        try:
            for row in ds.iter_rows():
                out.append(json.loads(row["result"]))
                bar.update(1)
        except BaseException as exc:  # re-raised by the caller's thread
            failed.append(exc)

    with tqdm(total=len(specs), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        reader = threading.Thread(target=collect, name=f"{desc} results", daemon=True)
        reader.start()
        no_cpu_since = None
        while reader.is_alive():
            reader.join(1.0)
            if not reader.is_alive():
                break
            if ray.cluster_resources().get("CPU", 0) > 0:
                no_cpu_since = None
                continue
            no_cpu_since = no_cpu_since or time.monotonic()
            if time.monotonic() - no_cpu_since >= timeout:
                alive = sum(1 for n in ray.nodes() if n["Alive"])
                # the executor thread is abandoned: once the caller shuts Ray down it would log that as
                # warnings with tracebacks, and its next Ray call would start (or join) a Ray again by
                # itself (Ray's auto-init, RAY_ENABLE_AUTO_CONNECT=0 when read at import)
                logging.getLogger("ray.data").setLevel(logging.CRITICAL)
                from ray._private import auto_init_hook

                auto_init_hook.enable_auto_connect = False
                raise RuntimeError(
                    f"{desc}: the Ray cluster has had no CPU for {timeout:.0f} s ({alive} node(s) "
                    f"alive, none with a CPU: worker nodes lost?); {len(out)} of {len(specs)} tasks done, "
                    "nothing committed"
                )
    if failed:
        raise failed[0]
    return out


# ------------------------------------------------------------------------------------------------------------
# manifest


def read_manifest(seqdir: str | Path) -> dict:
    manifest, _ = _read_manifest(os.fspath(seqdir))
    if manifest is None:
        raise FileNotFoundError(
            f"{storage.display(os.fspath(seqdir))}: no {SHARD_MANIFEST}; build it first with "
            "`fuxi data build-sequences`"
        )
    return manifest


def _read_manifest(out: str) -> tuple[dict | None, str | None]:
    """(manifest, its version) of a shard directory, (None, None) when it has none. The version is what the
    commit of the next generation expects to replace."""
    uri = storage.join(out, SHARD_MANIFEST)
    found = read_versioned(uri)
    if found is None:
        return None, None
    manifest = json.loads(found[0])
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{storage.display(uri)}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    return manifest, found[1]


def _write_manifest(out: str, manifest: dict, base: str | None) -> None:
    """The commit: the manifest is written last, as one object, and only over the version this run read
    (`base`, None: there was none), so two builds of one directory cannot both commit (CommitConflict)."""
    data = json.dumps(manifest, indent=1).encode()
    write_conditional(storage.join(out, SHARD_MANIFEST), data, expect=base)


# ------------------------------------------------------------------------------------------------------------
# build and append


def build_sequences(
    logs: str | Path,
    out: str | Path,
    cfg: BuildConfig | None = None,
    dates: list[str] | None = None,
    progress: bool = True,
) -> BuildReport:
    """Full (re)build of `out` from the days of `logs` (all days, or `dates`)."""
    cfg = cfg or BuildConfig()
    logs, out = os.fspath(logs), os.fspath(out)
    days = log_days(logs)
    if dates is not None:
        unknown = [d for d in dates if d not in days]
        if unknown:
            raise FileNotFoundError(
                f"{storage.display(logs)}: no partition for date(s) {unknown}; it has {sorted(days)}"
            )
        days = {d: days[d] for d in sorted(dates)}
    rules = cfg.rules
    if rules.identity_ids and rules.num_items is None and read_logs_meta(logs).get("num_items"):
        rules = dataclasses.replace(rules, num_items=int(read_logs_meta(logs)["num_items"]))
    files = [(d, p) for d, ps in days.items() for p in ps]
    for _, p in files:  # schema errors name the file and column before any task runs
        check_log_schema(p, rules)
    rows = sum(open_parquet(p).metadata.num_rows for _, p in files)
    parts = cfg.num_partitions or max(2, math.ceil(rows / cfg.rows_per_partition))
    previous, base = _read_manifest(out)
    manifest = {
        "format": FORMAT,
        "generation": (previous["generation"] if previous else 0) + 1,
        "max_length": cfg.max_length,
        "num_partitions": parts,
        "row_group_rows": cfg.row_group_rows,
        "rules": asdict(rules),
        "max_item": 0,
        "days": {},
        "history": [],
    }
    if not rules.identity_ids:
        manifest["vocab"] = {
            "file": None,
            "key_type": None,
            "min_count": cfg.min_count,
            "rows": 0,
            "pending": 0,
        }
    report = _apply(logs, out, manifest, base, days, existing={}, progress=progress, op="build")
    if previous:  # quarantine folders of days the rebuild no longer holds
        for d in set(previous["days"]) - set(manifest["days"]):
            storage.delete(storage.join(out, "quarantine", f"date={d}"), recursive=True)
        _remove_unreferenced(out, manifest)
    return report


def append_day(logs: str | Path, date: str, sequences: str | Path, progress: bool = True) -> BuildReport:
    """Merge one more day of `logs` into the shard directory `sequences`; a no-op if the day is recorded."""
    logs, out = os.fspath(logs), os.fspath(sequences)
    manifest, base = _read_manifest(out)
    if manifest is None:
        manifest = read_manifest(out)  # the error naming the directory
    files = day_files(logs, date)
    if date in manifest["days"]:
        prints = [fingerprint(p) for p in files]
        if prints == manifest["days"][date]["files"]:
            return BuildReport(
                out,
                "append",
                [],
                [date],
                IngestReport(),
                manifest["users"],
                0,
                manifest["interactions"],
                0,
                0,
                manifest["num_items"],
                manifest["num_partitions"],
                0.0,
            )
        raise ValueError(
            f"{storage.display(out)}: day {date} was already applied from different files "
            f"({manifest['days'][date]['files']}); now {prints}. A day cannot be re-applied incrementally: "
            "rebuild with `fuxi data build-sequences`"
        )
    for p in files:
        check_log_schema(p, IngestRules(**manifest["rules"]))
    # names read from the manifest stay inside the directory (storage.join refuses `..` and absolute names)
    existing = {s["partition"]: uri for s, uri in zip(manifest["shards"], shard_uris(out, manifest))}
    manifest = dict(manifest, generation=manifest["generation"] + 1)
    report = _apply(
        logs, out, manifest, base, {date: files}, existing=existing, progress=progress, op="append"
    )
    _remove_unreferenced(out, manifest)
    return report


def _apply(
    logs: str,
    out: str,
    manifest: dict,
    base: str | None,
    days: dict[str, list[str]],
    existing: dict[int, str],
    progress: bool,
    op: str,
) -> BuildReport:
    t0 = time.perf_counter()
    gen, parts = manifest["generation"], manifest["num_partitions"]
    # every task gets URIs (or plain paths) and reads and writes them itself, on disk or an object store
    tmp = storage.join(out, f"_tmp-g{gen:06d}")
    storage.delete(tmp, recursive=True)
    scatter_specs = []
    for d, paths in sorted(days.items()):  # date order, then file name order: the tie order of the events
        for k, p in enumerate(paths):
            # named by generation: the manifest commit publishes it (an uncommitted run's file is never
            # mistaken for the committed one, and is removed by the next commit)
            qname = f"quarantine/date={d}/{_stem(p)}.g{gen:06d}.quarantine.parquet"
            scatter_specs.append(
                {
                    "path": p,
                    "source": source_name(p),
                    "date": d,
                    "partitions": parts,
                    "rules": manifest["rules"],
                    "out": storage.join(tmp, f"{d}-{k:05d}.parquet"),
                    "quarantine": storage.join(out, qname),
                    "quarantine_name": qname,
                }
            )
    scattered = _run_tasks(scatter_task, scatter_specs, f"{op}: validate + partition", progress)
    scattered.sort(key=lambda s: (s["date"], s["source"]))  # Ray returns in any order; ties need the logs'
    _check_keys(out, manifest, scattered)
    new_items, vocab_file = 0, None
    if "vocab" in manifest:
        new_items, vocab_file = _extend_vocabulary(out, manifest, scattered, sorted(days))
    gather_specs = []
    for p in range(parts):
        pieces = [
            [s["file"], s["row_groups"][p], s["date"]] for s in scattered if s["file"] and s["row_groups"][p]
        ]
        gather_specs.append(
            {
                "partition": p,
                "pieces": pieces,
                "existing": existing.get(p),
                "vocab": None if vocab_file is None else str(vocab_file),
                "user_key": manifest.get("user_key"),
                "max_length": manifest["max_length"],
                "row_group_rows": manifest["row_group_rows"],
                "out": storage.join(out, f"part-{p:05d}-g{gen:06d}.parquet"),
            }
        )
    shards = sorted(
        _run_tasks(gather_task, gather_specs, f"{op}: sort + group", progress), key=lambda s: s["partition"]
    )

    ingest = IngestReport()
    day_reports: dict[str, IngestReport] = {d: IngestReport() for d in days}
    for s in scattered:
        r = IngestReport.from_dict(s["report"])
        day_reports[s["date"]].add(r)
        ingest.add(r)
    for shard in shards:  # events of items not admitted (yet) were validated but are not stored
        for d, n in shard["below_admission"].items():
            for r in (day_reports[d], ingest):
                r.below_admission += n
                r.rows_kept -= n
    max_item = max([manifest["max_item"]] + [s["max_item"] for s in scattered])
    catalogue = manifest["rules"]["num_items"]
    if "vocab" in manifest:
        num_items = manifest["vocab"]["rows"] + 1
    else:
        num_items = (catalogue if catalogue is not None else max_item) + 1
    manifest.update(
        max_item=max_item,
        num_items=num_items,
        shards=[
            {k: s[k] for k in ("partition", "file", "rows", "interactions", "row_groups")} for s in shards
        ],
        users=sum(s["rows"] for s in shards),
        interactions=sum(s["interactions"] for s in shards),
        days=dict(
            manifest["days"],
            **{
                d: {
                    "files": [fingerprint(p) for p in paths],
                    "generation": manifest["generation"],
                    "report": day_reports[d].to_dict(),
                }
                for d, paths in days.items()
            },
        ),
    )
    seconds = time.perf_counter() - t0
    dups, trunc = sum(s["duplicates"] for s in shards), sum(s["truncated"] for s in shards)
    manifest["history"] = manifest["history"] + [
        {
            "op": op,
            "generation": manifest["generation"],
            "days": sorted(days),
            "logs": str(Path(logs).resolve()) if "://" not in logs else storage.display(logs),
            "rows_read": ingest.rows_read,
            "quarantined": ingest.rows_quarantined,
            "filtered_event_type": ingest.filtered_event_type,
            "below_admission": ingest.below_admission,
            "new_items": new_items,
            "duplicates": dups,
            "truncated": trunc,
            "seconds": round(seconds, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    ]
    _write_manifest(out, manifest, base)  # the commit point
    storage.delete(tmp, recursive=True)
    return BuildReport(
        out=out,
        op=op,
        days=sorted(days),
        skipped_days=[],
        ingest=ingest,
        users=manifest["users"],
        sequences_written=manifest["users"],
        interactions=manifest["interactions"],
        duplicates_dropped=dups,
        truncated=trunc,
        num_items=manifest["num_items"],
        partitions=manifest["num_partitions"],
        seconds=seconds,
        new_items=new_items,
    )


def _check_keys(out: str, manifest: dict, scattered: list[dict]) -> None:
    """Raw id types are fixed by the first build: the vocabulary's item keys and the shards' user ids."""
    for s in scattered:
        if not s["file"]:
            continue
        for what, key in (("item", "vocab"), ("user", None)):
            have = (
                manifest["vocab"]["key_type"] if key and "vocab" in manifest else manifest.get(f"{what}_key")
            )
            got = s["keys"][what]
            if have is None:
                if key and "vocab" in manifest:
                    manifest["vocab"]["key_type"] = got
                manifest[f"{what}_key"] = got
            elif have != got:
                raise ValueError(
                    f"{s['source']}: column '{what}_id' holds {got} ids, but {storage.display(out)} keys "
                    f"{what}s as {have} "
                    "(fixed by its first build); convert the column or rebuild"
                )


def _extend_vocabulary(out: str, manifest: dict, scattered: list[dict], days: list[str]) -> tuple[int, str]:
    """Extend the vocabulary by each day's item counts, in date order; write this generation's file (before
    the manifest commit) and record it. Returns (rows added, the sorted mapping the gather tasks read)."""
    info = manifest["vocab"]
    key_type = info["key_type"] or "int64"
    if info["file"]:
        name = storage.join(out, info["file"], field=f"{SHARD_MANIFEST}: vocab.file")
        vocab = read_vocabulary(name, min_count=info["min_count"])
    else:
        vocab = Vocabulary.empty(key_type, info["min_count"])
    added = 0
    for day in days:
        files = [s["items"] for s in scattered if s["date"] == day and s["items"]]
        if not files:
            continue
        counts = pa.concat_tables([read_parquet(f) for f in files])
        counts = _item_counts(counts, merge=True) if len(files) > 1 else counts
        vocab, n = vocab.extend(
            day, counts["item_id"], counts["count"].to_numpy(), counts["first_timestamp"].to_numpy()
        )
        added += n
    path = write_vocabulary(vocab, storage.join(out, f"vocab-g{manifest['generation']:06d}.parquet"))
    # what the gather tasks map with: raw ids (sorted), their rows and admission days (a temporary file)
    keys, rows, admitted = vocab.admitted_days()
    order = pc.sort_indices(keys)
    mapping = pa.table(
        {"raw_id": keys.take(order), "row": rows[order.to_numpy()], "admitted": admitted[order.to_numpy()]}
    )
    mapping_path = storage.join(out, f"_tmp-g{manifest['generation']:06d}", "vocab-map.parquet")
    write_parquet(mapping, mapping_path, compression="lz4")
    pending = len(vocab) - vocab.num_rows
    manifest["vocab"] = dict(
        info, file=storage.name_of(path), key_type=vocab.key_type, rows=vocab.num_rows, pending=pending
    )
    return added, mapping_path


def _stem(uri: str) -> str:
    name = storage.name_of(uri)
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def _remove_unreferenced(out: str, manifest: dict) -> None:
    """Delete shards and vocabularies of older generations, quarantine files no commit names, and temporary
    folders (after the manifest commit): by listing, so the same on disk and on an object store."""
    keep = {s["file"] for s in manifest["shards"]} | {(manifest.get("vocab") or {}).get("file")}
    for name in storage.listdir(out):
        generated = name.endswith(".parquet") and name.startswith(("part-", "vocab-g"))
        if generated and name not in keep:
            storage.delete(storage.join(out, name))
        elif name.startswith("_tmp-g"):
            storage.delete(storage.join(out, name), recursive=True)
    quarantined = {q for day in manifest["days"].values() for q in day["report"].get("quarantine_files", [])}
    quarantine = storage.join(out, "quarantine")
    for day in storage.listdir(quarantine):
        if not day.startswith("date="):
            continue
        for name in storage.listdir(storage.join(quarantine, day)):
            if name.endswith(".quarantine.parquet") and f"quarantine/{day}/{name}" not in quarantined:
                storage.delete(storage.join(quarantine, day, name))
