"""KuaiRand-1K / KuaiRand-Pure logs -> the sequence Parquet format.

The FuXi-alpha paper evaluates on KuaiRand but neither it nor the official code says how the logs were turned
into sequences, so the choices below are ours; each is recorded in the output file's metadata.

Input: the interaction logs, e.g. `log_standard_4_08_to_4_21_1k.csv`, `log_standard_4_22_to_5_08_1k.csv`,
`log_random_4_22_to_5_08_1k.csv` (and the `_pure` equivalents): CSV with a header holding at least user_id,
video_id, time_ms and the positive column (other columns: date, hourmin, is_click, is_like, ..., play_time_ms,
duration_ms, tab, ... are not read). `log_paths` may name files or folders (a folder means its `log_*.csv`),
each a local path or a URI (`s3://bucket/kuairand/`); the output may be a URI too. Everything is read and
written through the storage layer (`storage/`).

Choices:
  * Positive feedback: rows whose `positive` column (default is_click) == 1; any other value is a non-positive
    exposure, dropped and counted as `not_positive`. positive="all" keeps every exposure.
  * Random-exposure logs (file name containing "random") are left out unless include_random=True: their videos
    were shown at random, not by the production recommender, so they are a different distribution (KuaiRand
    ships them for debiasing/evaluation). Left-out files are named in the report's notes and the metadata.
  * timestamp = time_ms // 1000 (unix seconds, like MovieLens). Sequences are ordered by time_ms (so the
    order within one second is kept), events at the same millisecond in file order (files in the order
    given): the tie rule of `pipeline.data.sequences`.
  * video_id is remapped to contiguous item ids 1..n (0 stays the padding id) in order of first appearance
    over time among the kept interactions: sorted by (time_ms, user_id, video_id), the first video seen
    gets 1. The mapping (item_id, video_id, first_time_ms) is written next to the output as
    `<out stem>.item_map.parquet`. num_items = n + 1. Only videos of kept interactions get an id.
  * Users with fewer than min_length (default 5) positive interactions are dropped (one pass, not an
    iterated k-core), counted as `user_too_short`. user_id is kept as is.
  * Repeated (user, video) interactions are kept: each is a separate positive event.
  * Malformed rows (non-integer / negative / missing user_id, video_id, positive flag, missing or unparsable
    time_ms, wrong field count) are quarantined as in `pipeline.data.readers`, all files into one file
    `<quarantine_dir>/<out stem>.quarantine.parquet` (default: next to the output) whose `source` column names
    the log file; raw holds the read fields ("user_id=..., ...") and row_number the file line.
    A log file in which every row is bad is a ValueError naming it.

Report arithmetic: rows_read == rows_kept + rows_quarantined + rows_dropped (not_positive + user_too_short).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import storage
from pipeline.data.readers import (
    ColumnSpec,
    ReadReport,
    Source,
    base_name,
    check_readable,
    child,
    header_indices,
    located,
    parent_of,
    raise_if_all_bad,
    read_header,
    reason_counts,
    scan_text,
    shown,
    with_source,
    write_quarantine,
)
from pipeline.data.schema import QUARANTINE_SCHEMA
from pipeline.data.sequences import (
    SequenceData,
    events_to_sequences,
    time_order,
    write_parquet,
    write_sequences,
)
from storage.fs import require_bucket

log = logging.getLogger(__name__)

REQUIRED = ("user_id", "video_id", "time_ms")


def find_logs(log_paths, include_random: bool = False) -> tuple[list[Source], list[Source]]:
    """Expand folders (or prefixes) to their log_*.csv, drop duplicates; returns (files to read, random logs
    left out): local files as Paths, files on an object store as URIs."""
    if isinstance(log_paths, (str, os.PathLike)):
        log_paths = [log_paths]
    files: list[Source] = []
    for item in log_paths:
        p = located(item)
        if _is_folder(p):
            names = storage.listdir(os.fspath(p))
            found = [child(p, n, "KuaiRand log") for n in names if fnmatch.fnmatchcase(n, "log_*.csv")]
            if not found:
                raise FileNotFoundError(f"{shown(p)}: folder holds no KuaiRand log_*.csv files")
            files.extend(found)
        else:
            files.append(p)
    seen: set[Source] = set()
    unique = [f for f in files if not (_key(f) in seen or seen.add(_key(f)))]
    skipped = [f for f in unique if not include_random and "random" in base_name(f).lower()]
    chosen = [f for f in unique if f not in skipped]
    if not chosen:
        raise ValueError(
            f"no KuaiRand log to read in {[shown(located(p)) for p in log_paths]}"
            + (
                f" (random-exposure logs {[base_name(f) for f in skipped]} need include_random=True)"
                if skipped
                else ""
            )
        )
    return chosen, skipped


def _is_folder(p: Source) -> bool:
    if isinstance(p, Path):
        return p.is_dir()
    require_bucket(p)  # a missing bucket in one line, not as a missing file
    return not storage.is_file(p) and storage.exists(p)


def _key(f: Source) -> Source:
    """What makes two names one file: the real path locally, the URI on a store."""
    return f.resolve() if isinstance(f, Path) else f


def _where(f: Source) -> str:
    """A source as recorded in the metadata: the absolute local path, or the URI."""
    return str(f.resolve()) if isinstance(f, Path) else shown(f)


def preprocess_kuairand(
    log_paths,
    out_path: str | os.PathLike[str],
    positive: str = "is_click",
    include_random: bool = False,
    min_length: int = 5,
    quarantine_dir: str | os.PathLike[str] | None = None,
) -> tuple[SequenceData, ReadReport]:
    """Turn KuaiRand log CSVs into per-user sequences; see the module docstring for every choice."""
    if int(min_length) < 1:
        raise ValueError(f"min_length must be >= 1, got {min_length}")
    out = located(out_path)
    name = base_name(out)
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else PurePosixPath(name).stem
    qdir = located(quarantine_dir) if quarantine_dir is not None else parent_of(out)
    for target in (out, qdir):
        require_bucket(target)  # a wrong output bucket fails before anything is read or written
    qpath = child(qdir, f"{stem}.quarantine.parquet", "quarantine file")
    files, skipped = find_logs(log_paths, include_random)

    specs = (
        ColumnSpec("user_id", "id", 0),
        ColumnSpec("video_id", "id", 0),
        ColumnSpec("time_ms", "time"),
    )
    wanted: dict[str, tuple[str, ...]] = {c: (c,) for c in REQUIRED}
    if positive != "all":
        if positive in REQUIRED:
            raise ValueError(f"positive={positive!r} is not a feedback column")
        specs += (ColumnSpec(positive, "id", 0),)
        wanted[positive] = (positive,)

    goods, bads, rows_read, per_file = [], [], 0, {}
    for f in files:
        check_readable(f)
        header = read_header(f, ",")
        positions = header_indices(f, header, wanted, set(wanted))
        scan = scan_text(f, ",", len(header), positions, specs, skip_rows=1)
        rows_read += scan.rows_read
        per_file[base_name(f)] = {"rows_read": scan.rows_read, "rows_quarantined": scan.bad.num_rows}
        if scan.bad.num_rows:
            bads.append(with_source(scan.bad, base_name(f)))
        if scan.rows_read == 0 or scan.good.num_rows == 0:
            written = write_quarantine(pa.concat_tables(bads), qpath) if bads else None
            raise_if_all_bad(f, scan, written, "kuairand")
        goods.append(scan.good)

    bad = pa.concat_tables(bads) if bads else None
    written = write_quarantine(bad if bad is not None else QUARANTINE_SCHEMA.empty_table(), qpath)
    events = pa.concat_tables(goods)
    reasons = reason_counts(bad) if bad is not None else {}
    n_bad = bad.num_rows if bad is not None else 0
    dropped = 0

    if positive != "all":
        keep = pc.equal(events[positive], 1)
        not_pos = events.num_rows - int(pc.sum(keep).as_py() or 0)
        events = events.filter(keep)
        if not_pos:
            reasons["not_positive"] = not_pos
            dropped += not_pos

    # users with too few interactions (single pass)
    if events.num_rows:
        counts = events.group_by("user_id").aggregate([("user_id", "count")])
        long_enough = counts.filter(pc.greater_equal(counts["user_id_count"], min_length))["user_id"]
        keep = pc.is_in(events["user_id"], value_set=long_enough.combine_chunks())
        short_rows = events.num_rows - int(pc.sum(keep).as_py() or 0)
        short_users = counts.num_rows - len(long_enough)
        events = events.filter(keep)
    else:
        short_rows = short_users = 0
    if short_rows:
        reasons["user_too_short"] = short_rows
        dropped += short_rows

    notes = [f"positive: {positive if positive == 'all' else positive + ' == 1'}"]
    if short_users:
        notes.append(f"{short_users:,} users with < {min_length} interactions dropped")
    if skipped:
        notes.append(f"random-exposure logs left out: {', '.join(base_name(f) for f in skipped)}")
    report = ReadReport(
        path=files[0] if len(files) == 1 else _common_parent(files),
        layout="kuairand",
        rows_read=rows_read,
        rows_kept=events.num_rows,
        rows_quarantined=n_bad,
        reasons=reasons,
        quarantine_path=written,
        rows_dropped=dropped,
        notes=notes,
    )
    if events.num_rows == 0:
        raise ValueError(
            f"{[shown(f) for f in files]}: no interactions left after filtering; {report.summary()}"
        )

    # remap video ids by first appearance over time
    order = events.sort_by([("time_ms", "ascending"), ("user_id", "ascending"), ("video_id", "ascending")])
    vids = order["video_id"].to_numpy()
    times = order["time_ms"].to_numpy()
    uniq, first = np.unique(vids, return_index=True)
    by_time = np.argsort(first, kind="stable")
    videos = uniq[by_time]
    item_map = pa.table(
        {
            "item_id": pa.array(np.arange(1, len(videos) + 1, dtype=np.int64)),
            "video_id": pa.array(videos, pa.int64()),
            "first_time_ms": pa.array(times[first[by_time]], pa.int64()),
        }
    )
    # millisecond order first (ties: file order): grouping by seconds below keeps the order within a second
    by_ms = events.select(["user_id", "time_ms"]).rename_columns(["user_id", "timestamp"])
    events = events.take(time_order(by_ms))
    position = pc.index_in(events["video_id"], value_set=item_map["video_id"].combine_chunks())
    item_ids = pc.add(pc.cast(position, pa.int64()), 1)
    seconds = np.floor_divide(events["time_ms"].to_numpy(), 1000)
    seq = events_to_sequences(
        pa.table(
            {"user_id": events["user_id"], "item_id": item_ids, "timestamp": pa.array(seconds, pa.int64())}
        )
    )

    map_path = child(parent_of(out), f"{stem}.item_map.parquet", "item map file")
    write_parquet(item_map, os.fspath(map_path))  # whole or absent: a rename on disk, one upload on a store
    meta = {
        "dataset": "kuairand",
        "sources": [_where(f) for f in files],
        "random_logs_left_out": [_where(f) for f in skipped],
        "positive": positive,
        "include_random": bool(include_random),
        "min_length": int(min_length),
        "timestamp": "time_ms // 1000 (seconds)",
        "item_ids": "video_id remapped to 1..n by first appearance over time",
        "item_map": _where(map_path),
        "users_dropped": short_users,
        "per_file": per_file,
        "report": report.to_dict(),
    }
    data = SequenceData(table=seq, num_items=len(videos) + 1, meta=meta)
    write_sequences(data, os.fspath(out))
    log.info("%s", report.summary())
    return data, report


def _common_parent(files: list[Source]) -> Source:
    """The folder (or prefix) holding every file: what the report names when several are read."""
    if all(isinstance(f, Path) for f in files):
        return Path(os.path.commonpath([str(f.resolve().parent) for f in files]))  # type: ignore[union-attr]
    common = parent_of(files[0])
    while not all(os.fspath(f).startswith(os.fspath(common).rstrip("/") + "/") for f in files):
        up = parent_of(common)
        if up == common:  # different buckets or stores: no folder holds them all
            break
        common = up
    return common
