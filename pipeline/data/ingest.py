"""Raw event logs: layout, schema check and value validation with a quarantine. No Ray import.

Layout (what `fuxi data synth-logs` writes and `fuxi data build-sequences` reads):
    LOGDIR/date=YYYY-MM-DD/part-*.parquet    one row per interaction, in time order, not grouped by user
    LOGDIR/_logs.json                        optional: {"num_items": catalogue size, ...}
                                             (written by synth-logs)
Columns: user_id, item_id (raw ids: any int64, or strings), timestamp (integer unix seconds, or a Parquet
timestamp type); optional event_type (any type; compared as text with `IngestRules.event_types`); other
columns are not read. The sequence format does not carry event types.

Item ids are raw ids mapped to table rows by the item vocabulary (pipeline/data/vocab.py), so 2^62, negative
hashes, 0 and strings are ordinary ids. `IngestRules.identity_ids` keeps the older contract where item ids
*are* rows (integers 1..num_items): then negative / zero / out-of-catalogue ids are bad values.

Schema problems (a missing column, an id column that is neither integers nor text) are errors naming the file
and the column: a file with the wrong schema is a pipeline bug, not a bad row. Bad values are quarantined, one
reason per row (the first failing check, in this order):
    missing_user_id (null, or empty text), negative_user_id (identity mode), out_of_range_user_id (uint64
    above int64), missing_item_id, negative_item_id and zero_item_id (identity mode; 0 is the padding row),
    out_of_range_item_id, out_of_catalogue_item_id (identity mode: item_id > the configured catalogue
    size), missing_event_type (null, when event types are filtered),
    missing_timestamp, absurd_timestamp (outside [min_timestamp, max_timestamp]; e.g. milliseconds)
Rows whose event_type is not one of `event_types` are valid but not positive interactions: counted as
`filtered_event_type`, not quarantined.
Quarantine files follow `pipeline.data.readers`: QUARANTINE_SCHEMA (source, row_number, reason, field,
value, raw), `source` = the file's path relative to LOGDIR, `row_number` = 1-based row position in the file,
`raw` = "user_id=..., item_id=..., timestamp=...[, event_type=...]".
Report arithmetic: rows_read == rows_kept + rows_quarantined + filtered_event_type (+ below_admission, the
events of items not yet admitted by the vocabulary, counted by the build).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from pipeline.data.readers import reason_counts
from pipeline.data.schema import DATE_RE, LOGS_META, MAX_TIMESTAMP, QUARANTINE_SCHEMA
from pipeline.data.sequences import open_parquet

EVENT_FIELDS = ("user_id", "item_id", "timestamp")
OPTIONAL_FIELDS = ("event_type",)
SCAN_ROWS = 1 << 20  # rows per validated batch: bounds memory per file


@dataclass(frozen=True)
class IngestRules:
    num_items: int | None = None  # identity mode: valid item ids are 1..num_items; None = no upper bound
    min_timestamp: int = 946_684_800  # 2000-01-01 UTC
    max_timestamp: int = MAX_TIMESTAMP  # 2100-01-01 UTC
    identity_ids: bool = False  # item ids are table rows (no vocabulary)
    event_types: tuple[str, ...] | None = None  # event types that count as interactions; None: all

    def __post_init__(self) -> None:
        if self.event_types is not None:
            types = tuple(str(t).strip() for t in self.event_types if str(t).strip())
            if not types:
                raise ValueError("event_types: give at least one event type, or none to keep every type")
            object.__setattr__(self, "event_types", types)


# reason code -> (reason, field); code 0 = good row. The order is the check priority.
REASONS = (
    ("", ""),
    ("missing_user_id", "user_id"),
    ("negative_user_id", "user_id"),
    ("out_of_range_user_id", "user_id"),
    ("missing_item_id", "item_id"),
    ("negative_item_id", "item_id"),
    ("zero_item_id", "item_id"),
    ("out_of_range_item_id", "item_id"),
    ("out_of_catalogue_item_id", "item_id"),
    ("missing_event_type", "event_type"),
    ("missing_timestamp", "timestamp"),
    ("absurd_timestamp", "timestamp"),
)
_CODE = {name: k for k, (name, _) in enumerate(REASONS)}


@dataclass
class IngestReport:
    files: int = 0
    rows_read: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    quarantine_files: list[str] = field(default_factory=list)
    filtered_event_type: int = 0  # valid rows of event types that are not interactions
    below_admission: int = 0  # kept rows of items the vocabulary has not admitted (yet): not in sequences

    def add(self, other: IngestReport) -> IngestReport:
        self.files += other.files
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.rows_quarantined += other.rows_quarantined
        self.filtered_event_type += other.filtered_event_type
        self.below_admission += other.below_admission
        for k, v in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v
        self.quarantine_files += other.quarantine_files
        return self

    def summary(self) -> str:
        text = (
            f"{self.files:,} files, {self.rows_read:,} rows read, {self.rows_kept:,} kept, "
            f"{self.rows_quarantined:,} quarantined"
        )
        if self.filtered_event_type:
            text += f", {self.filtered_event_type:,} of other event types"
        if self.below_admission:
            text += f", {self.below_admission:,} below admission (items seen too rarely yet)"
        if self.reasons:
            text += " (" + ", ".join(f"{k}={v:,}" for k, v in sorted(self.reasons.items())) + ")"
        return text

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_quarantined": self.rows_quarantined,
            "reasons": dict(sorted(self.reasons.items())),
            "quarantine_files": sorted(self.quarantine_files),
            "filtered_event_type": self.filtered_event_type,
            "below_admission": self.below_admission,
        }

    @classmethod
    def from_dict(cls, d: dict) -> IngestReport:
        return cls(
            files=d["files"],
            rows_read=d["rows_read"],
            rows_kept=d["rows_kept"],
            rows_quarantined=d["rows_quarantined"],
            reasons=dict(d["reasons"]),
            quarantine_files=list(d.get("quarantine_files", [])),
            filtered_event_type=int(d.get("filtered_event_type", 0)),
            below_admission=int(d.get("below_admission", 0)),
        )


# ------------------------------------------------------------------------------------------------------------
# layout


def _parts(folder: str) -> list[str]:
    """The `*.parquet` files directly in a day folder or prefix, sorted by name (URIs, or plain paths)."""
    names = [n for n in storage.listdir(folder) if n.endswith(".parquet") and not n.startswith(".")]
    uris = [storage.join(folder, n, field="log part file") for n in names]
    return [u for u in uris if storage.is_file(u)]


def log_days(logs: str | Path) -> dict[str, list[str]]:
    """date -> its part files (sorted by name), for every `date=YYYY-MM-DD` folder or prefix under `logs`
    (a local path or a URI such as `s3://bucket/logs`)."""
    root = os.fspath(logs)
    if storage.is_file(root) or not storage.exists(root):
        raise FileNotFoundError(f"{storage.display(root)}: log directory does not exist")
    days = {}
    for name in storage.listdir(root):
        m = DATE_RE.match(name)
        if m:
            folder = storage.join(root, name, field="log day folder")
            if not storage.is_file(folder):
                days[m.group(1)] = _parts(folder)
    if not days:
        raise ValueError(f"{storage.display(root)}: no date=YYYY-MM-DD partitions found")
    return days


def day_files(logs: str | Path, date: str) -> list[str]:
    if not re.match(r"^\d{4}-\d{2}-\d{2}$", date):
        raise ValueError(f"date must be YYYY-MM-DD, got {date!r}")
    folder = storage.join(os.fspath(logs), f"date={date}", field="date")
    files = _parts(folder)
    if not files:
        raise FileNotFoundError(f"{storage.display(folder)}: no part files for {date}")
    return files


def source_name(path: str | Path) -> str:
    """A part file's name relative to its log root: `date=YYYY-MM-DD/part-00000.parquet`."""
    uri = os.fspath(path)
    return f"{storage.name_of(storage.parent(uri))}/{storage.name_of(uri)}"


def fingerprint(path: str | Path) -> dict:
    """What identifies an input file in the manifest: relative name, bytes and row count."""
    uri = os.fspath(path)
    fs, where = storage.resolve(uri)
    return {
        "name": source_name(uri),
        "bytes": fs.get_file_info(where).size,
        "rows": open_parquet(uri).metadata.num_rows,
    }


def read_logs_meta(logs: str | Path) -> dict:
    path = storage.join(os.fspath(logs), LOGS_META)
    return json.loads(storage.read_bytes(path)) if storage.is_file(path) else {}


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def id_key_type(schema: pa.Schema, name: str) -> str:
    """ "int64" or "string": how a file's id column is keyed (after check_log_schema)."""
    return "string" if _is_text(schema.field(name).type) else "int64"


def check_log_schema(path: str | Path, rules: IngestRules | None = None) -> pa.Schema:
    """The file's Arrow schema, or ValueError naming the file and the offending column."""
    rules = rules or IngestRules()
    uri = os.fspath(path)
    path = storage.display(uri)  # what every message names
    try:
        fs, where = storage.resolve(uri)
        schema = pq.read_schema(where, filesystem=fs)
    except storage.StorageError:
        raise
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in EVENT_FIELDS if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {schema.names}")
    for name in ("user_id", "item_id"):
        t = schema.field(name).type
        text_ok = not (rules.identity_ids and name == "item_id")  # rows are integers
        if not (pa.types.is_integer(t) or (text_ok and _is_text(t))):
            want = "integers or strings" if text_ok else "integers (identity ids: item ids are rows)"
            raise ValueError(f"{path}: column {name!r} has type {t}, expected {want}")
    if rules.event_types is not None and "event_type" not in schema.names:
        raise ValueError(
            f"{path}: event types are filtered ({list(rules.event_types)}) but the file has no "
            f"'event_type' column; it has {schema.names}"
        )
    t = schema.field("timestamp").type
    if not (pa.types.is_integer(t) or pa.types.is_timestamp(t)):
        raise ValueError(f"{path}: column 'timestamp' has type {t}, expected integer seconds or a timestamp")
    return schema


# ------------------------------------------------------------------------------------------------------------
# validation


def _ints(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(int64 values with nulls as 0, null mask or None, uint64-overflow mask or None)."""
    null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    if pa.types.is_timestamp(arr.type):
        factor = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[arr.type.unit]
        vals = pc.fill_null(arr.cast(pa.int64()), 0).to_numpy()
        return (vals // factor if factor > 1 else vals), null, None
    over = None
    if pa.types.is_uint64(arr.type):
        big = pc.fill_null(pc.greater(arr, pa.scalar(2**63 - 1, pa.uint64())), False).to_numpy(
            zero_copy_only=False
        )
        over = big if big.any() else None
        arr = pc.if_else(pa.array(big), pa.scalar(0, pa.uint64()), arr) if over is not None else arr
    return pc.fill_null(arr.cast(pa.int64()), 0).to_numpy().astype(np.int64, copy=False), null, over


def _mark(code: np.ndarray | None, cond: np.ndarray | None, reason: str, n: int) -> np.ndarray | None:
    """Give rows without a reason yet the code of `reason` where cond holds; allocate only when needed."""
    if cond is None or not cond.any():
        return code
    if code is None:
        code = np.zeros(n, dtype=np.int8)
    code[(code == 0) & cond] = _CODE[reason]
    return code


def _keys(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None, np.ndarray | None]:
    """A raw id column as (int64 or string values, missing mask or None, uint64-overflow mask or None);
    null and empty / blank text are missing."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if _is_text(arr.type):
        arr = arr.cast(pa.string())
        missing = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_trim_whitespace(arr), ""))
        missing = pc.fill_null(missing, True).to_numpy(zero_copy_only=False)
        return pc.fill_null(arr, ""), (missing if missing.any() else None), None
    vals, null, over = _ints(arr)
    return pa.array(vals), null, over


def validate_events(
    batch: pa.RecordBatch | pa.Table, rules: IngestRules, first_row: int, source: str
) -> tuple[pa.Table, pa.Table, int]:
    """(good rows: user_id, item_id (raw keys: int64 or string), timestamp int64; bad rows as
    QUARANTINE_SCHEMA; valid rows left out for their event type).

    `first_row`: 0-based file position of row 0.
    """
    n = batch.num_rows
    names = list(batch.schema.names)
    cols = {c: batch.column(c) for c in EVENT_FIELDS + OPTIONAL_FIELDS if c in names}
    if isinstance(batch, pa.Table):
        cols = {c: a.combine_chunks() for c, a in cols.items()}
    user, user_null, user_over = _keys(cols["user_id"])
    item, item_null, item_over = _keys(cols["item_id"])
    ts, ts_null, _ = _ints(cols["timestamp"])
    code = None
    code = _mark(code, user_null, "missing_user_id", n)
    if rules.identity_ids:
        u = user.to_numpy(zero_copy_only=False) if pa.types.is_integer(user.type) else None
        code = _mark(code, None if u is None else u < 0, "negative_user_id", n)
    code = _mark(code, user_over, "out_of_range_user_id", n)
    code = _mark(code, item_null, "missing_item_id", n)
    if rules.identity_ids:
        i = item.to_numpy(zero_copy_only=False)
        code = _mark(code, i < 0, "negative_item_id", n)
        code = _mark(code, i == 0, "zero_item_id", n)  # null rows already carry missing_item_id
    code = _mark(code, item_over, "out_of_range_item_id", n)
    if rules.identity_ids and rules.num_items is not None:
        code = _mark(
            code, item.to_numpy(zero_copy_only=False) > rules.num_items, "out_of_catalogue_item_id", n
        )
    other_type = None
    if rules.event_types is not None:
        etype = pc.cast(cols["event_type"], pa.string())
        code = _mark(code, etype.is_null().to_numpy(zero_copy_only=False), "missing_event_type", n)
        wanted = pc.is_in(etype, value_set=pa.array(rules.event_types, pa.string()))
        other_type = ~pc.fill_null(wanted, True).to_numpy(zero_copy_only=False)
    code = _mark(code, ts_null, "missing_timestamp", n)
    code = _mark(code, (ts < rules.min_timestamp) | (ts > rules.max_timestamp), "absurd_timestamp", n)
    ok = np.ones(n, bool) if code is None else code == 0
    filtered = 0
    if other_type is not None:
        other_type &= ok
        filtered = int(other_type.sum())
        ok = ok & ~other_type
    schema = event_schema(item.type, user.type)
    if ok.all():
        good = pa.Table.from_arrays([user, item, pa.array(ts)], schema=schema)
    else:
        mask = pa.array(ok)
        good = pa.Table.from_arrays([user.filter(mask), item.filter(mask), pa.array(ts[ok])], schema=schema)
    if code is None or not code.any():
        return good, QUARANTINE_SCHEMA.empty_table(), filtered
    bad_idx = np.flatnonzero(code != 0)
    bad_code = code[bad_idx]
    shown = list(EVENT_FIELDS) + [c for c in OPTIONAL_FIELDS if c in names]
    text = {}
    for c in shown:
        arr = batch.column(c)
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        text[c] = pc.cast(arr.take(pa.array(bad_idx)), pa.string())
    raw = pc.binary_join_element_wise(
        *[pc.binary_join_element_wise(f"{c}=", pc.fill_null(text[c], "null"), "") for c in shown], ", "
    )
    field_of = np.array([f for _, f in REASONS], dtype=object)[bad_code]
    value = np.empty(len(bad_idx), dtype=object)
    for c in shown:
        here = field_of == c
        value[here] = text[c].to_numpy(zero_copy_only=False)[here]
    bad = pa.table(
        {
            "source": pa.array([source] * len(bad_idx), pa.string()),
            "row_number": pa.array(first_row + bad_idx + 1, pa.int64()),
            "reason": pa.array(
                np.array([r for r, _ in REASONS], dtype=object)[bad_code].tolist(), pa.string()
            ),
            "field": pa.array(field_of.tolist(), pa.string()),
            "value": pa.array(value.tolist(), pa.string()),
            "raw": raw,
        },
        schema=QUARANTINE_SCHEMA,
    )
    return good, bad, filtered


def event_schema(item_type: pa.DataType | None = None, user_type: pa.DataType | None = None) -> pa.Schema:
    """Validated events: raw user and item keys (int64 or string) and int64 timestamps."""
    return pa.schema(
        [
            ("user_id", user_type or pa.int64()),
            ("item_id", item_type or pa.int64()),
            ("timestamp", pa.int64()),
        ]
    )


def scan_log_file(
    path: str | Path, rules: IngestRules, source: str, batch_rows: int = SCAN_ROWS
) -> Iterator[tuple[pa.Table, pa.Table, int]]:
    """Validated (good, bad, filtered count) per batch of at most `batch_rows` rows; memory bounded by one
    batch."""
    schema = check_log_schema(path, rules)
    columns = list(EVENT_FIELDS) + [c for c in OPTIONAL_FIELDS if c in schema.names]
    offset = 0
    try:
        for batch in open_parquet(os.fspath(path)).iter_batches(batch_size=batch_rows, columns=columns):
            yield validate_events(batch, rules, offset, source)
            offset += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{storage.display(os.fspath(path))}: not a readable Parquet file ({exc})") from exc


def report_of(
    rows_read: int, rows_kept: int, bad: pa.Table, quarantine_file: str | None, filtered: int = 0
) -> IngestReport:
    return IngestReport(
        files=1,
        rows_read=rows_read,
        rows_kept=rows_kept,
        rows_quarantined=bad.num_rows,
        reasons=reason_counts(bad),
        quarantine_files=[quarantine_file] if quarantine_file else [],
        filtered_event_type=filtered,
    )
