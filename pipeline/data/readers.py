"""Raw interaction files -> the events table and the sequence Parquet format (`pipeline.data.sequences`).

Layouts read by `read_interactions`:
  ml-dat   MovieLens-1M `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header.
  ml-tsv   MovieLens-100K `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp`, no header.
  ml-csv   MovieLens-20M/25M `ratings.csv`: header `userId,movieId,rating,timestamp` (any column order).
  parquet  columns user_id, item_id, timestamp (optional rating; extra columns are ignored).
  auto     by file name: ratings.dat / *.dat -> ml-dat, u.data / *.data / *.tsv -> ml-tsv, *.csv -> ml-csv,
           *.parquet / *.pq -> parquet; anything else is an error that lists the layouts to pass.

Text files are read with pyarrow.csv as one string column per line (blocks streamed, so memory stays bounded),
split on the layout's separator and validated with pyarrow.compute: no per-row Python. Quoted CSV fields are
not supported (the MovieLens and KuaiRand files have none); a quoted value is quarantined as non-integer,
never misread.

Every file is read and written through the storage layer (`storage/`): an input or output may be a local path
or a URI (`s3://bucket/logs/ratings.csv`). A local path keeps being handed back as a `Path`, a URI as its
string; outputs are whole or absent (a rename on disk, one upload on an object store).

Bad rows are never dropped silently. Each is counted under one reason (the first failing check, in the order
field count, user_id, item_id, timestamp, rating) and written to `<quarantine_dir>/<stem>.quarantine.parquet`
(default: next to the input) with columns:
  source      input file name
  row_number  text files: 1-based line number in the file (the header is line 1); Parquet: row position + 1
  reason      e.g. wrong_field_count, empty_line, missing_user_id, non_integer_item_id, negative_user_id,
              out_of_range_user_id, zero_item_id, missing_timestamp, unparsable_timestamp, missing_rating,
              unparsable_rating
  field       the column that failed (null for field-count problems)
  value       the offending value as text (for field-count problems: "<n> fields, expected <k>")
  raw         the original line (text) or "user_id=..., item_id=..., ..." (Parquet)
A stale quarantine file from an earlier run is removed when the new run finds no bad rows.

Item id 0 is the padding id of the sequence format, so a row with item_id 0 is quarantined (`zero_item_id`);
data with 0-based item ids must be shifted by the caller. Timestamps are unix seconds in
[`schema.MIN_TIMESTAMP` (1), `MAX_TIMESTAMP` (2100-01-01)], the ingest's rule: zero, negative, millisecond
and far-future values are quarantined as `absurd_timestamp`. Exact duplicate events (same
user, item and timestamp) are kept once; the copies are counted `duplicate_event` (dropped, as the ingest
does). user id 0 is accepted (users are not embedded). Ids are not remapped (as the official code).
If every row is bad, ValueError names the file and the first bad row/field (the quarantine file is written
first, so it can be inspected). A file with no data rows is a ValueError too.

Report arithmetic: rows_read == rows_kept + rows_quarantined + rows_dropped. `reasons` counts quarantine
reasons and, for valid rows removed by a filter (e.g. `user_too_short` in `prepare_sequences`), drop reasons.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

import storage
from pipeline.data.schema import MAX_TIMESTAMP, MIN_TIMESTAMP, QUARANTINE_SCHEMA
from pipeline.data.sequences import (
    SequenceData,
    events_to_sequences,
    open_parquet,
    write_parquet,
    write_sequences,
)
from pipeline.data.vocab import Vocabulary, day_of, key_type_of, write_vocabulary
from storage.fs import require_bucket

log = logging.getLogger(__name__)

Source = Path | str  # a local file as a Path, a file on an object store as its URI (`located`)

LAYOUTS = ("ml-dat", "ml-tsv", "ml-csv", "parquet")
_SEPARATORS = {"ml-dat": "::", "ml-tsv": "\t", "ml-csv": ","}
# headerless MovieLens layouts: field order in the line
_POSITIONAL = {"user_id": 0, "item_id": 1, "rating": 2, "timestamp": 3}
# header names accepted for each output column (first name is the one error messages use)
_CSV_NAMES: dict[str, tuple[str, ...]] = {
    "user_id": ("userId", "user_id"),
    "item_id": ("movieId", "item_id", "itemId"),
    "timestamp": ("timestamp",),
    "rating": ("rating",),
}

_BLOCK_SIZE = 16 << 20
_HEADER_CHUNK = 64 << 10
_INT_RE = r"^-?[0-9]{1,18}$"  # fits int64 without overflow checks
_LONG_INT_RE = r"^-?[0-9]{19,}$"
_FLOAT_RE = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"


@dataclass(frozen=True)
class ColumnSpec:
    """How to validate one column. kind: "id" (int64 >= min_value), "key" (a raw id: text stays text,
    integers any int64), "time" (any int64), "seconds" (unix seconds of a plausible date: the ingest's
    rule, schema.MIN_TIMESTAMP..MAX_TIMESTAMP, else `absurd_<name>`), "float"."""

    name: str
    kind: str = "id"
    min_value: int = 0
    required: bool = True


MOVIELENS_SPECS = (  # identity ids: item ids are table rows
    ColumnSpec("user_id", "id", 0),
    ColumnSpec("item_id", "id", 1),  # 0 is the padding id
    ColumnSpec("timestamp", "seconds"),
    ColumnSpec("rating", "float", required=False),
)
_INT64_MIN = -(2**63)
RAW_ID_SPECS = (  # raw ids mapped by a vocabulary: any int64, or (Parquet text columns) strings
    ColumnSpec("user_id", "key", _INT64_MIN),
    ColumnSpec("item_id", "key", _INT64_MIN),
    ColumnSpec("timestamp", "seconds"),
    ColumnSpec("rating", "float", required=False),
)


@dataclass
class ReadReport:
    path: Source
    layout: str
    rows_read: int
    rows_kept: int
    rows_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    quarantine_path: Source | None = None
    rows_dropped: int = 0  # valid rows removed by a filter (min length, non-positive, ...)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        name = base_name(self.path)
        parts = [f"{name} [{self.layout}]: {self.rows_read:,} rows read, {self.rows_kept:,} kept"]
        parts.append(f"{self.rows_quarantined:,} quarantined")
        if self.rows_dropped:
            parts.append(f"{self.rows_dropped:,} dropped")
        text = ", ".join(parts)
        if self.reasons:
            text += " (" + ", ".join(f"{k}={v:,}" for k, v in sorted(self.reasons.items())) + ")"
        if self.quarantine_path is not None:
            text += f"; bad rows in {shown(self.quarantine_path)}"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = shown(self.path)
        d["quarantine_path"] = None if self.quarantine_path is None else shown(self.quarantine_path)
        return d


# ------------------------------------------------------------------------------------------------------------
# layout detection and file checks


def located(path: str | os.PathLike[str]) -> Source:
    """A local file (a plain path or `file://`) as a Path, as these readers always gave; a file on an object
    store as its URI."""
    uri = os.fspath(path)
    if not storage.is_local(uri):
        return uri
    return Path(uri) if "://" not in uri else Path(storage.parse(uri).path)


def base_name(src: str | os.PathLike[str]) -> str:
    return src.name if isinstance(src, Path) else storage.name_of(src)


def shown(src: str | os.PathLike[str]) -> str:
    """How a file is named in a message, a report or metadata (a URI without credentials)."""
    return str(src) if isinstance(src, Path) else storage.display(src)


def parent_of(src: Source) -> Source:
    return src.parent if isinstance(src, Path) else storage.parent(src)


def child(folder: Source, name: str, field: str) -> Source:
    """`folder/name` through `storage.join` (the name confined to the folder), a Path for a local folder."""
    joined = storage.join(os.fspath(folder), name, field=field)
    return Path(joined) if isinstance(folder, Path) else joined


def detect_layout(path: str | os.PathLike[str]) -> str:
    p = PurePosixPath(base_name(located(path)))
    name, suffix = p.name.lower(), p.suffix.lower()
    if name == "ratings.dat" or suffix == ".dat":
        return "ml-dat"
    if name == "u.data" or suffix in (".data", ".tsv"):
        return "ml-tsv"
    if suffix == ".csv":
        return "ml-csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(
        f"{shown(located(path))}: cannot detect the layout from the file name "
        "(expected ratings.dat, u.data, *.csv or *.parquet); "
        f"pass layout= one of {list(LAYOUTS)}"
    )


def check_readable(path: str | os.PathLike[str]) -> Source:
    """The file, located (a Path or a URI), once it is known to be a readable file; else one line naming
    it (on an object store: a missing bucket, a missing object, a prefix, or the store's own cause)."""
    p = located(path)
    if not isinstance(p, Path):
        require_bucket(p)
        if storage.is_file(p):
            return p
        if storage.exists(p):
            raise IsADirectoryError(
                f"{shown(p)}: is a prefix (a folder), expected a ratings/interactions file"
            )
        raise FileNotFoundError(f"{shown(p)}: file does not exist")
    if not p.exists():
        raise FileNotFoundError(f"{p}: file does not exist")
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory, expected a ratings/interactions file")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise OSError(f"{p}: cannot read file ({exc.strerror or exc})") from exc
    return p


def quarantine_file(
    path: str | os.PathLike[str], quarantine_dir: str | os.PathLike[str] | None, stem: str | None = None
) -> Source:
    p = located(path)
    qdir = located(quarantine_dir) if quarantine_dir is not None else parent_of(p)
    return child(qdir, f"{stem or PurePosixPath(base_name(p)).stem}.quarantine.parquet", "quarantine file")


# ------------------------------------------------------------------------------------------------------------
# vectorised validation


_NULL_STR = pa.scalar(None, pa.string())


def _null_str(n: int) -> pa.Array:
    return pa.nulls(n, pa.string())


def _as_string(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _labels(spec: ColumnSpec) -> dict[str, str]:
    if spec.kind in ("time", "seconds", "float"):
        bad = f"unparsable_{spec.name}"
        return {"missing": f"missing_{spec.name}", "bad": bad, "range": bad}
    return {
        "missing": f"missing_{spec.name}",
        "bad": f"non_integer_{spec.name}",
        "range": f"out_of_range_{spec.name}",
    }


class _Reasons:
    """The first failing check per row; allocated only once something fails (clean data stays cheap)."""

    def __init__(self, n: int):
        self.n = n
        self.array: pa.Array | None = None

    def add(self, cond: pa.Array, label: str) -> None:
        cond = pc.fill_null(cond, False)
        if not pc.any(cond).as_py():
            return
        current = self.array if self.array is not None else _null_str(self.n)
        self.array = pc.if_else(pc.and_(cond, pc.is_null(current)), pa.scalar(label, pa.string()), current)


def _parse_text(s: pa.Array, spec: ColumnSpec, lab: dict[str, str], reasons: _Reasons) -> pa.Array:
    """Slow path for text that did not cast cleanly: trim, then classify each bad value."""
    s = pc.utf8_trim_whitespace(_as_string(s))
    reasons.add(pc.or_kleene(pc.is_null(s), pc.equal(s, "")), lab["missing"])
    if spec.kind == "float":
        ok = pc.fill_null(pc.match_substring_regex(s, _FLOAT_RE), False)
        reasons.add(pc.invert(ok), lab["bad"])
        return pc.cast(pc.if_else(ok, s, _NULL_STR), pa.float64())
    ok = pc.fill_null(pc.match_substring_regex(s, _INT_RE), False)
    reasons.add(pc.match_substring_regex(s, _LONG_INT_RE), lab["range"])
    reasons.add(pc.invert(ok), lab["bad"])
    return pc.cast(pc.if_else(ok, s, _NULL_STR), pa.int64())


def _implausible(seconds: pa.Array) -> pa.Array:
    """Zero / negative, millisecond or far-future unix seconds (the ingest's rule)."""
    return pc.or_kleene(pc.less(seconds, MIN_TIMESTAMP), pc.greater(seconds, MAX_TIMESTAMP))


def check_column(arr: pa.Array, spec: ColumnSpec) -> tuple[pa.Array, pa.Array | None]:
    """Validate one column (text or typed).

    Returns (int64/float64 values, reason per row or None if all good). Values at rows with a reason are
    meaningless; callers drop those rows.
    """
    n = len(arr)
    lab = _labels(spec)
    reasons = _Reasons(n)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    out_type = pa.float64() if spec.kind == "float" else pa.int64()

    if pa.types.is_timestamp(t) and spec.kind in ("time", "seconds"):
        factor = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]
        vals = pc.cast(arr, pa.int64())
        if factor > 1:
            vals = pc.cast(pc.floor(pc.divide(pc.cast(vals, pa.float64()), factor)), pa.int64())
        reasons.add(pc.is_null(arr), lab["missing"])
        reasons.add(
            pc.or_kleene(pc.less(vals, MIN_TIMESTAMP), pc.greater(vals, MAX_TIMESTAMP)), "absurd_timestamp"
        )
        return vals, reasons.array
    if spec.kind == "key" and _is_text(t):  # a string id: only null / blank is bad
        s_ = pc.utf8_trim_whitespace(_as_string(arr))
        reasons.add(pc.or_kleene(pc.is_null(s_), pc.equal(s_, "")), lab["missing"])
        return pc.fill_null(s_, ""), reasons.array
    if _is_text(t):
        try:  # fast path: every value is a clean number
            vals = pc.cast(arr, out_type)
            reasons.add(pc.is_null(vals), lab["missing"])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            vals = _parse_text(arr, spec, lab, reasons)
        if spec.kind == "float":
            reasons.add(pc.or_kleene(pc.is_nan(vals), pc.is_inf(vals)), lab["bad"])
            return vals, reasons.array
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        reasons.add(pc.is_null(arr), lab["missing"])
        if pa.types.is_uint64(t):
            too_big = pc.greater(arr, pa.scalar(2**63 - 1, pa.uint64()))
            reasons.add(too_big, lab["range"])
            arr = pc.if_else(pc.fill_null(too_big, False), pa.scalar(None, t), arr)
        vals = pc.cast(arr, out_type)
        if spec.kind == "float":
            return vals, reasons.array
    elif pa.types.is_floating(t) or pa.types.is_decimal(t):
        f = pc.cast(arr, pa.float64())
        reasons.add(pc.or_kleene(pc.is_null(f), pc.is_nan(f)), lab["missing"])
        reasons.add(pc.is_inf(f), lab["bad"])
        if spec.kind == "float":
            return f, reasons.array
        reasons.add(pc.not_equal(pc.floor(f), f), lab["bad"])
        reasons.add(pc.greater(pc.abs(f), 9.0e18), lab["range"])
        ok = pc.is_null(reasons.array) if reasons.array is not None else pa.scalar(True)
        vals = pc.cast(pc.if_else(ok, f, pa.scalar(None, pa.float64())), pa.int64())
    else:
        raise TypeError(f"column {spec.name!r} has type {t}, expected integers or text")

    if spec.kind == "seconds":
        reasons.add(_implausible(vals), f"absurd_{spec.name}")
    if spec.kind in ("id", "key") and n and vals.null_count < n and spec.min_value > _INT64_MIN:
        lowest = pc.min(vals).as_py()
        if lowest is not None and lowest < spec.min_value:
            if spec.min_value == 1:
                reasons.add(pc.equal(vals, 0), f"zero_{spec.name}")
            reasons.add(pc.less(vals, spec.min_value), f"negative_{spec.name}")
    return vals, reasons.array


def validate_columns(
    cols: dict[str, pa.Array],
    specs: tuple[ColumnSpec, ...],
    row_ids: np.ndarray,
    raw: pa.Array | None = None,
    extra_reason: pa.Array | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Validate the columns named in `specs` (those present in `cols`).

    Returns (good rows as a typed table, bad rows as QUARANTINE_SCHEMA without `source`). `row_ids` go to
    row_number (callers may map them later); `raw` is the original line per row, else the fields are rendered
    as "name=value, ..."; `extra_reason` is a reason per row found before field validation (e.g. empty_line).
    """
    names, values, reasons = [], [], []
    for spec in specs:
        if spec.name not in cols:
            continue
        v, r = check_column(cols[spec.name], spec)
        names.append(spec.name)
        values.append(v)
        reasons.append(r)
    good = pa.table(values, names=names)
    # candidate reasons in priority order: pre-validation reason, then each column in spec order
    sources = [(None, extra_reason)] + [(nm, r) for nm, r in zip(names, reasons)]
    sources = [(nm, r) for nm, r in sources if r is not None]
    if not sources:
        return good, _empty_bad()
    reason = pc.coalesce(*[r for _, r in sources]) if len(sources) > 1 else sources[0][1]
    bad = pc.is_valid(reason)
    good = good.filter(pc.invert(bad))
    n_bad = int(pc.sum(bad).as_py())
    # which source gave each bad row its reason (the first valid one)
    which = pc.coalesce(
        *[
            pc.if_else(pc.is_valid(r.filter(bad)), pa.scalar(k, pa.int32()), pa.scalar(None, pa.int32()))
            for k, (_, r) in enumerate(sources)
        ]
    )
    b_cols = {nm: _as_string(cols[nm].filter(bad)) for nm in names}
    field_names = pa.array([nm for nm, _ in sources], pa.string())
    b_field = pc.take(field_names, which)
    b_value = pc.choose(which, *[b_cols[nm] if nm is not None else _null_str(n_bad) for nm, _ in sources])
    if raw is None:
        rendered = [
            pc.binary_join_element_wise(f"{nm}=", pc.fill_null(b_cols[nm], "null"), "") for nm in names
        ]
        b_raw = pc.binary_join_element_wise(*rendered, ", ") if len(rendered) > 1 else rendered[0]
    else:
        b_raw = raw.filter(bad)
    bad_rows = pa.table(
        {
            "row_number": pa.array(row_ids, pa.int64()).filter(bad),
            "reason": reason.filter(bad),
            "field": b_field,
            "value": b_value,
            "raw": b_raw,
        }
    )
    return good, bad_rows


def _empty_bad() -> pa.Table:
    return pa.schema([f for f in QUARANTINE_SCHEMA if f.name != "source"]).empty_table()


# ------------------------------------------------------------------------------------------------------------
# scanners


@dataclass
class Scan:
    """Result of scanning one file: validated rows, bad rows, and how many data rows it had."""

    good: pa.Table
    bad: pa.Table  # QUARANTINE_SCHEMA without `source`
    rows_read: int


def _first_line(src: Source) -> bytes:
    """The file's first line (through the storage layer, which streams: read in chunks up to a newline)."""
    head = b""
    with storage.open_input(os.fspath(src)) as fh:
        while b"\n" not in head and (chunk := fh.read(_HEADER_CHUNK)):
            head += chunk
    return head.split(b"\n", 1)[0]


def read_header(path: Source, sep: str) -> list[str]:
    text = _first_line(path).decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if not text.strip():
        raise ValueError(f"{shown(path)}: the first line is empty, expected a header line")
    return [h.strip().strip('"').strip("'").strip() for h in text.split(sep)]


def header_indices(
    path: Source, header: list[str], wanted: dict[str, tuple[str, ...]], required: set[str]
) -> dict[str, int]:
    """Map output column -> field index from a header; ValueError naming the file and missing column(s)."""
    idx: dict[str, int] = {}
    for out, names in wanted.items():
        for nm in names:
            if nm in header:
                idx[out] = header.index(nm)
                break
    missing = [wanted[c][0] for c in wanted if c in required and c not in idx]
    if missing:
        raise ValueError(f"{shown(path)}: missing column(s) {missing}; the header has {header}")
    return idx


def scan_text(
    path: Source,
    sep: str,
    n_fields: int,
    positions: dict[str, int],
    specs: tuple[ColumnSpec, ...],
    skip_rows: int = 0,
) -> Scan:
    """Parse a delimited text file (all columns as strings) and validate it; no per-row Python for good rows.

    `sep` is one character, or "::" (parsed as ':' with empty fields between the real ones). Lines with the
    wrong number of fields reach the parser's invalid-row handler and are quarantined with their text. The raw
    line of a bad row is rebuilt exactly when every field is read (MovieLens); otherwise (KuaiRand, whose
    other columns are not read) it is rendered as "name=value, ..." of the read fields and row_number locates
    it.
    """
    if sep == "::":
        delim, n_cols = ":", 2 * n_fields - 1
        col_of = {name: 2 * i for name, i in positions.items()}
        gaps = [2 * i + 1 for i in range(n_fields - 1)]
    elif len(sep) == 1:
        delim, n_cols, col_of, gaps = sep, n_fields, dict(positions), []
    else:
        raise ValueError(f"unsupported separator {sep!r}")
    col_names = [f"f{i}" for i in range(n_cols)]
    read_all = len(col_of) + len(gaps) == n_cols
    include = col_names if read_all else sorted({col_names[i] for i in col_of.values()}, key=col_names.index)
    skipped: list[tuple[int, str, int]] = []

    def on_invalid(row) -> str:  # wrong field count: keep the text for the quarantine file
        skipped.append((row.number if row.number is not None else -1, row.text, row.actual_columns))
        return "skip"

    specs_here = tuple(s for s in specs if s.name in positions)
    goods: list[pa.Table] = []
    bads: list[pa.Table] = []

    def read(stream: pa.NativeFile) -> int | None:
        """Parse and validate the blocks of the stream into goods / bads; the rows emitted, None if empty."""
        try:
            reader = pv.open_csv(
                stream,
                read_options=pv.ReadOptions(
                    column_names=col_names, skip_rows=skip_rows, use_threads=False, block_size=_BLOCK_SIZE
                ),
                parse_options=pv.ParseOptions(
                    delimiter=delim,
                    quote_char=False,
                    escape_char=False,
                    newlines_in_values=False,
                    ignore_empty_lines=False,
                    invalid_row_handler=on_invalid,
                ),
                convert_options=pv.ConvertOptions(
                    column_types={c: pa.string() for c in col_names},
                    include_columns=include,
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return None
            raise ValueError(f"{shown(path)}: not a readable text file ({exc})") from exc

        emitted = 0
        try:
            for batch in reader:
                n = batch.num_rows
                ids = np.arange(emitted, emitted + n, dtype=np.int64)
                emitted += n
                fields = [batch.column(c) for c in include]
                # a blank line parses as a row of empty fields
                extra = _Reasons(n)
                blank = pc.equal(fields[0], "")
                if pc.any(blank).as_py():
                    blank = functools.reduce(pc.and_, [pc.equal(f, "") for f in fields[1:]], blank)
                    extra.add(blank, "empty_line")
                else:
                    blank = None
                for g in gaps:  # "1:x:2::3::4": a single ':' inside a field
                    extra.add(pc.not_equal(batch.column(col_names[g]), ""), "wrong_field_count")
                raw = None
                if read_all:
                    raw = pc.binary_join_element_wise(*fields, delim) if len(fields) > 1 else fields[0]
                    if blank is not None:
                        raw = pc.if_else(blank, "", raw)
                cols = {name: batch.column(col_names[i]) for name, i in col_of.items()}
                good, bad = validate_columns(cols, specs_here, ids, raw=raw, extra_reason=extra.array)
                goods.append(good)
                if bad.num_rows:
                    bads.append(bad)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{shown(path)}: not a readable text file ({exc})") from exc
        return emitted

    with storage.open_input(os.fspath(path)) as stream:  # decompressed by extension, as a local path is
        emitted = read(stream)
    if emitted is None:
        return Scan(good=_empty_good(specs, positions), bad=_empty_bad(), rows_read=0)

    bad_tbl = pa.concat_tables(bads).combine_chunks() if bads else _empty_bad()
    base = 1 + skip_rows  # line number of the first data row
    if bad_tbl.num_rows:
        # emitted index -> line number: lines the parser skipped shift every later row down
        lines = np.array(sorted(s for s, _, _ in skipped if s > 0), dtype=np.int64)
        gap_at = lines - base - np.arange(len(lines))
        e = bad_tbl["row_number"].to_numpy()
        rows = e + base + np.searchsorted(gap_at, e, side="right")
        bad_tbl = bad_tbl.set_column(0, "row_number", pa.array(rows, pa.int64()))
    if skipped:
        n_found = [(c + 1) // 2 if sep == "::" else c for _, _, c in skipped]
        extra_bad = pa.table(
            {
                "row_number": pa.array([s for s, _, _ in skipped], pa.int64()),
                "reason": pa.array(
                    ["empty_line" if not t.strip() else "wrong_field_count" for _, t, _ in skipped],
                    pa.string(),
                ),
                "field": _null_str(len(skipped)),
                "value": pa.array([f"{k} fields, expected {n_fields}" for k in n_found], pa.string()),
                "raw": pa.array([t for _, t, _ in skipped], pa.string()),
            }
        )
        bad_tbl = pa.concat_tables([bad_tbl, extra_bad])
    if bad_tbl.num_rows:
        bad_tbl = bad_tbl.sort_by("row_number")
    good_tbl = pa.concat_tables(goods).combine_chunks() if goods else _empty_good(specs, positions)
    return Scan(good=good_tbl, bad=bad_tbl, rows_read=emitted + len(skipped))


def _empty_good(specs: tuple[ColumnSpec, ...], present) -> pa.Table:
    return pa.schema(
        [(s.name, pa.float64() if s.kind == "float" else pa.int64()) for s in specs if s.name in present]
    ).empty_table()


def scan_parquet(src: Source, specs: tuple[ColumnSpec, ...]) -> Scan:
    path = shown(src)
    try:
        pf = open_parquet(os.fspath(src))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    missing = [s.name for s in specs if s.required and s.name not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {names}")
    present = [s.name for s in specs if s.name in names]
    goods, bads, offset = [], [], 0
    try:
        for batch in pf.iter_batches(batch_size=1 << 20, columns=present):
            n = batch.num_rows
            cols = {nm: batch.column(nm) for nm in present}
            ids = np.arange(offset + 1, offset + n + 1, dtype=np.int64)
            offset += n
            try:
                good, bad = validate_columns(cols, specs, ids)
            except TypeError as exc:
                raise ValueError(f"{path}: {exc}") from exc
            goods.append(good)
            if bad.num_rows:
                bads.append(bad)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
    good = pa.concat_tables(goods).combine_chunks() if goods else _empty_good(specs, present)
    bad = pa.concat_tables(bads) if bads else _empty_bad()
    return Scan(good=good, bad=bad, rows_read=offset)


# ------------------------------------------------------------------------------------------------------------
# quarantine and reports


def reason_counts(bad: pa.Table) -> dict[str, int]:
    if bad.num_rows == 0:
        return {}
    vc = pc.value_counts(bad["reason"].combine_chunks())
    return {d["values"]: int(d["counts"]) for d in vc.to_pylist()}


def write_quarantine(bad: pa.Table, qpath: Source) -> Source | None:
    """Write bad rows (QUARANTINE_SCHEMA) to qpath (a path or URI, whole or not at all); with none, remove a
    stale file there and return None."""
    uri = os.fspath(qpath)
    if bad.num_rows == 0:
        storage.delete(uri)  # nothing there is fine
        return None
    try:
        write_parquet(bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA), uri, compression="zstd")
    except OSError as exc:
        raise OSError(
            f"cannot write quarantine file {storage.display(uri)} ({exc}); pass quarantine_dir= a "
            "writable folder"
        ) from exc
    return qpath


def with_source(bad: pa.Table, source: str) -> pa.Table:
    return bad.add_column(0, "source", pa.array([source] * bad.num_rows, pa.string()))


def raise_if_all_bad(src: Source, scan: Scan, qpath: Source | None, layout: str) -> None:
    path = shown(src)
    if scan.rows_read == 0:
        raise ValueError(f"{path}: contains no data rows")
    if scan.good.num_rows == 0:
        first = scan.bad.sort_by("row_number").slice(0, 1).to_pylist()[0]
        what = f"field {first['field']}={first['value']!r}" if first["field"] else (first["value"] or "")
        hint = ""
        if first["reason"] == "wrong_field_count":
            hint = f" (read as layout {layout!r}: is that the right layout?)"
        raise ValueError(
            f"{path}: all {scan.rows_read:,} rows are bad{hint}; first bad row {first['row_number']}: "
            f"{first['reason']} {what}; raw {first['raw']!r}; bad rows written to "
            f"{None if qpath is None else shown(qpath)}"
        )


# ------------------------------------------------------------------------------------------------------------
# public API


_TEXT_RAW_SPECS = tuple(  # text layouts: raw ids are integers of any sign (MovieLens ids stay numbers)
    ColumnSpec(c.name, "id", c.min_value, c.required) if c.kind == "key" else c for c in RAW_ID_SPECS
)


def read_interactions(
    path: str | os.PathLike[str],
    layout: str = "auto",
    quarantine_dir: str | os.PathLike[str] | None = None,
    raw_ids: bool = False,
) -> tuple[pa.Table, ReadReport]:
    """Read a ratings/events file (a path or URI) into a (user_id, item_id, timestamp int64[, rating
    float64]) table; bad rows go to `<quarantine_dir>/<stem>.quarantine.parquet` (a path or URI).

    Ids are int64 table rows (item ids >= 1) by default; with `raw_ids` they are raw ids for a vocabulary:
    any int64, and Parquet string columns stay strings."""
    p = check_readable(path)
    if layout == "auto":
        layout = detect_layout(p)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {list(LAYOUTS)}")

    specs = _TEXT_RAW_SPECS if raw_ids else MOVIELENS_SPECS
    if layout == "parquet":
        scan = scan_parquet(p, RAW_ID_SPECS if raw_ids else MOVIELENS_SPECS)
    elif layout == "ml-csv":
        header = read_header(p, ",")
        required = {s.name for s in specs if s.required}
        positions = header_indices(p, header, _CSV_NAMES, required)
        scan = scan_text(p, ",", len(header), positions, specs, skip_rows=1)
    else:
        scan = scan_text(p, _SEPARATORS[layout], 4, _POSITIONAL, specs)

    qpath = write_quarantine(with_source(scan.bad, base_name(p)), quarantine_file(p, quarantine_dir))
    raise_if_all_bad(p, scan, qpath, layout)
    events = scan.good
    order = [c for c in ("user_id", "item_id", "timestamp", "rating") if c in events.column_names]
    events = events.select(order)
    report = ReadReport(
        path=p,
        layout=layout,
        rows_read=scan.rows_read,
        rows_kept=events.num_rows,
        rows_quarantined=scan.bad.num_rows,
        reasons=reason_counts(scan.bad),
        quarantine_path=qpath,
    )
    if qpath is not None:
        log.warning("%s: %d bad rows quarantined in %s", shown(p), report.rows_quarantined, shown(qpath))
    return events, report


def drop_short_users(seq: pa.Table, min_length: int) -> tuple[pa.Table, int, int]:
    """Remove users with fewer than min_length events. Returns (table, rows dropped, users dropped)."""
    lengths = pc.list_value_length(seq["item_ids"])
    keep = pc.greater_equal(lengths, min_length)
    short = pc.invert(keep)
    rows = int(pc.sum(lengths.filter(short)).as_py() or 0)
    users = int(pc.sum(short).as_py() or 0)
    return seq.filter(keep), rows, users


def drop_duplicate_events(events: pa.Table) -> tuple[pa.Table, int]:
    """One of each exact (user_id, item_id, timestamp) event, in file order, and how many copies went."""
    keys = ["user_id", "item_id", "timestamp"]
    indexed = events.select(keys).append_column("_row", pa.array(np.arange(events.num_rows, dtype=np.int64)))
    first = indexed.group_by(keys, use_threads=False).aggregate([("_row", "min")])["_row_min"]
    dropped = events.num_rows - len(first)
    if dropped == 0:
        return events, 0
    return events.take(np.sort(first.to_numpy())), dropped


def max_item(seq: pa.Table) -> int:
    return int(pc.max(pc.list_flatten(seq["item_ids"])).as_py() or 0)


def prepare_sequences(
    path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    layout: str = "auto",
    min_length: int = 2,
    quarantine_dir: str | os.PathLike[str] | None = None,
    identity_ids: bool = False,
    min_count: int = 1,
) -> tuple[SequenceData, ReadReport]:
    """Read interactions, map item ids to rows through a vocabulary, group into time-ordered per-user
    sequences, drop short users, write the Parquet (and the vocabulary next to it: `<stem>.vocab.parquet`).
    Input, output and quarantine folder are paths or URIs, on one store or several; on an object store the
    output buckets are checked before anything is read, so a wrong one fails with nothing written.

    The vocabulary gives rows in ascending raw-id order (so ids that are already 1..N keep their values);
    items with fewer than `min_count` events get no row and their events are dropped (`below_admission`).
    `identity_ids`: item ids are rows already (integers >= 1), no vocabulary."""
    if int(min_length) < 1:
        raise ValueError(f"min_length must be >= 1, got {min_length}")
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    out = located(out_path)
    qdir = located(quarantine_dir) if quarantine_dir is not None else parent_of(out)  # beside the output
    for target in (out, qdir):
        require_bucket(target)
    events, report = read_interactions(path, layout=layout, quarantine_dir=qdir, raw_ids=not identity_ids)
    events, duplicates = drop_duplicate_events(events)
    if duplicates:
        report.reasons["duplicate_event"] = duplicates
        report.rows_dropped += duplicates
        report.rows_kept -= duplicates
        report.notes.append(f"{duplicates:,} exact duplicate events dropped")
    vocab = None
    if not identity_ids:
        events, vocab, below = _map_items(events, int(min_count))
        if below:
            report.reasons["below_admission"] = below
            report.rows_dropped += below
            report.rows_kept -= below
            report.notes.append(
                f"{len(vocab) - vocab.num_rows:,} items with < {min_count} events have no row"
            )
    seq = events_to_sequences(events)
    seq, rows_short, users_short = drop_short_users(seq, min_length)
    if rows_short:
        report.reasons["user_too_short"] = rows_short
        report.rows_dropped += rows_short
        report.rows_kept -= rows_short
        report.notes.append(f"{users_short:,} users with < {min_length} interactions dropped")
    if seq.num_rows == 0:
        raise ValueError(f"{report.path}: no user has at least {min_length} interactions; nothing to write")
    meta = {
        "source": str(report.path.resolve()) if isinstance(report.path, Path) else shown(report.path),
        "layout": report.layout,
        "min_length": int(min_length),
        "item_ids": "as in the source (identity ids)" if vocab is None else "rows of the vocabulary",
        "users_dropped": users_short,
        "report": report.to_dict(),
    }
    vocab_path = None
    if vocab is not None:
        vocab_name = PurePosixPath(base_name(out)).stem + ".vocab.parquet"
        vocab_path = child(parent_of(out), vocab_name, "vocabulary file")
        write_vocabulary(vocab, os.fspath(vocab_path))
        meta.update(vocab=vocab_name, min_count=int(min_count))
    num_items = vocab.num_rows + 1 if vocab is not None else max_item(seq) + 1
    data = SequenceData(table=seq, num_items=num_items, meta=meta, vocab=vocab_path)
    write_sequences(data, os.fspath(out))
    return data, report


def _map_items(events: pa.Table, min_count: int) -> tuple[pa.Table, Vocabulary, int]:
    """Raw item ids -> rows: a one-generation vocabulary over the whole file (first_day: the UTC date of an
    item's first event); events of items below `min_count` are dropped. Returns (events, vocab, dropped)."""
    key_type = key_type_of(events.schema.field("item_id").type)
    agg = events.group_by("item_id").aggregate([("item_id", "count"), ("timestamp", "min")])
    first = agg["timestamp_min"].to_numpy()
    vocab, _ = Vocabulary.empty(key_type, min_count).extend(
        "", agg["item_id"], agg["item_id_count"].to_numpy(), first
    )
    days = pa.array(day_of(vocab.table["first_timestamp"].to_numpy()), pa.string())
    admitted = pc.if_else(pc.is_valid(vocab.table["row"]), days, pa.scalar(None, pa.string()))
    table = vocab.table.set_column(2, "first_day", days).set_column(5, "admitted_day", admitted)
    vocab = Vocabulary(table, min_count)
    rows = vocab.lookup(events["item_id"])
    keep = rows > 0
    events = events.set_column(events.schema.get_field_index("item_id"), "item_id", pa.array(rows))
    return events.filter(pa.array(keep)), vocab, int((~keep).sum())
