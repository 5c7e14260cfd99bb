"""Item vocabulary: raw item ids (any int64, or strings) <-> dense rows 1..N of the item table (0 is padding).

Logs carry sparse ids (64-bit hashes, 2^62, negatives, strings) and new items every day; the item table needs
dense rows. The vocabulary is built from counts by the sequence build (pipeline/data/build.py) and by
`prepare_sequences` (pipeline/data/readers.py), stored as Parquet with each data generation, and only ever
extended: a row, once given, never changes meaning, so a checkpoint's rows stay valid on later data
(pipeline/train/grow.py grows the table for the new rows).

Parquet columns (one row per raw id ever seen, admitted ones first in row order, then pending ones):
    raw_id           int64 or string (the vocabulary's key type, fixed at its first build)
    row              int64; null = not admitted yet (seen fewer than `min_count` times)
    first_day        YYYY-MM-DD of the log partition where the id was first seen (prepare: the UTC date of
                     its first event)
    first_timestamp  int64 unix seconds of its first event
    count            int64, events seen so far (including those before admission)
    admitted_day     YYYY-MM-DD of the day it got its row (null while pending); its events of earlier days
                     are not in the sequences (counted as `below_admission` by the build)
Admission: an id gets a row at the end of the first day (in date order) on which its cumulative count
reaches `min_count`; that day's new rows go to its new ids in ascending raw-id order. So building over days
at once and appending them one by one give the same vocabulary.

A checkpoint folder (and the registered model) carries a copy named VOCAB_FILE, so top-k and serving speak
raw ids (serving/loading.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from pipeline.data.schema import SHARD_MANIFEST

PathOrURI = TypeVar("PathOrURI", str, Path)  # a writer returns what it was given

VOCAB_FILE = "vocab.parquet"
META_KEY = b"fuxi.meta"  # the sequence file's metadata key (pipeline.data.sequences)
KEY_TYPES = {"int64": pa.int64(), "string": pa.string()}


def vocab_schema(key_type: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("raw_id", KEY_TYPES[key_type], nullable=False),
            pa.field("row", pa.int64()),
            pa.field("first_day", pa.string(), nullable=False),
            pa.field("first_timestamp", pa.int64(), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
            pa.field("admitted_day", pa.string()),
        ]
    )


def key_type_of(t: pa.DataType) -> str:
    """The vocabulary key type of an id column's Arrow type (integers -> int64, text -> string)."""
    if pa.types.is_integer(t):
        return "int64"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "string"
    raise TypeError(f"type {t}, expected integers or strings")


def as_keys(values: Any, key_type: str) -> pa.Array:
    """Raw ids (pa.Array / ChunkedArray / list / numpy) as an Arrow array of the key type."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(list(values) if not isinstance(values, np.ndarray) else values)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    want = KEY_TYPES[key_type]
    if values.type != want:
        try:
            values = values.cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise TypeError(f"ids of type {values.type} do not match a {key_type} vocabulary") from None
    return values


class Vocabulary:
    """An in-memory vocabulary (see the module docstring for the table)."""

    def __init__(self, table: pa.Table, min_count: int = 1) -> None:
        self.table = table
        self.key_type = key_type_of(table.schema.field("raw_id").type)
        self.min_count = int(min_count)
        rows = table["row"].combine_chunks()
        admitted = pc.is_valid(rows)
        self.num_rows = int(pc.sum(admitted).as_py() or 0)
        self._keys = table["raw_id"].combine_chunks()
        self._rows = pc.fill_null(rows, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        by_row = self._rows[: self.num_rows]
        if self.num_rows and not np.array_equal(by_row, np.arange(1, self.num_rows + 1)):
            raise ValueError("vocabulary rows must be 1..N in table order (admitted ids first)")

    @classmethod
    def empty(cls, key_type: str, min_count: int = 1) -> Vocabulary:
        return cls(vocab_schema(key_type).empty_table(), min_count)

    def __len__(self) -> int:
        return self.table.num_rows

    def lookup(self, raw: Any) -> np.ndarray:
        """Rows of raw ids; 0 for ids not in the vocabulary or not admitted."""
        keys = as_keys(raw, self.key_type)
        idx = pc.index_in(keys, value_set=self._keys)
        pos = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        out = np.zeros(len(pos), dtype=np.int64)
        hit = pos >= 0
        out[hit] = self._rows[pos[hit]]
        return out

    def raw_ids(self, rows: Any) -> list[Any]:
        """Rows 1..N -> raw ids (python int or str)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        bad = rows[(rows < 1) | (rows > self.num_rows)]
        if len(bad):
            raise ValueError(f"row {int(bad[0])} is not an item row of this vocabulary (1..{self.num_rows})")
        return self._keys.take(pa.array(rows - 1)).to_pylist()

    def admitted_days(self) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        """(raw ids, their rows (0 while pending), admission day as a YYYYMMDD int (0 while pending)), in
        table order: what the build maps events with."""
        days = self.table["admitted_day"].combine_chunks()
        as_int = pc.cast(pc.replace_substring(pc.fill_null(days, "0"), "-", ""), pa.int64())
        return self._keys, self._rows, as_int.to_numpy(zero_copy_only=False)

    def extend(
        self, day: str, keys: pa.Array, counts: np.ndarray, first_ts: np.ndarray
    ) -> tuple[Vocabulary, int]:
        """The vocabulary after one more day: `keys` distinct raw ids seen that day, with their counts and
        first timestamps. Returns (new vocabulary, rows added). Existing rows never move."""
        keys = as_keys(keys, self.key_type)
        order = pc.sort_indices(keys).to_numpy()  # the day's new rows go in ascending raw-id order
        keys = keys.take(pa.array(order))
        counts = np.asarray(counts, dtype=np.int64)[order]
        first_ts = np.asarray(first_ts, dtype=np.int64)[order]
        idx = pc.fill_null(pc.index_in(keys, value_set=self._keys), -1).to_numpy(zero_copy_only=False)
        old = idx >= 0
        total = self.table["count"].to_numpy().copy()
        np.add.at(total, idx[old], counts[old])
        first_old = self.table["first_timestamp"].to_numpy().copy()
        np.minimum.at(first_old, idx[old], first_ts[old])
        rows = self._rows.copy()
        # pending ids that reach min_count today, then ids first seen today that reach it at once
        pending_now = (rows == 0) & (total >= self.min_count)
        new = ~old
        fresh_admit = new & (counts >= self.min_count)
        admit_keys = pa.concat_arrays(
            [self._keys.filter(pa.array(pending_now)), keys.filter(pa.array(fresh_admit))]
        )
        admit_order = pc.sort_indices(admit_keys).to_numpy()
        n_admit = len(admit_order)
        new_rows = np.empty(n_admit, dtype=np.int64)
        new_rows[admit_order] = np.arange(self.num_rows + 1, self.num_rows + 1 + n_admit)
        n_pending = int(pending_now.sum())
        rows[pending_now] = new_rows[:n_pending]
        today = pa.scalar(day, pa.string())
        old_days = pc.if_else(pa.array(pending_now), today, self.table["admitted_day"].combine_chunks())
        new_days = pc.if_else(pa.array(fresh_admit[new]), today, pa.scalar(None, pa.string()))
        add_rows = np.zeros(int(new.sum()), dtype=np.int64)
        add_rows[fresh_admit[new]] = new_rows[n_pending:]
        table = pa.table(
            {
                "raw_id": pa.concat_arrays([self._keys, keys.filter(pa.array(new))]),
                "row": np.r_[rows, add_rows],
                "first_day": pa.concat_arrays(
                    [self.table["first_day"].combine_chunks(), pa.array([day] * int(new.sum()), pa.string())]
                ),
                "first_timestamp": np.r_[first_old, first_ts[new]],
                "count": np.r_[total, counts[new]],
                "admitted_day": pa.concat_arrays([old_days, new_days]),
            }
        )
        table = _canonical(table, self.key_type)
        return Vocabulary(table, self.min_count), n_admit


def _canonical(table: pa.Table, key_type: str) -> pa.Table:
    """Admitted ids in row order, then pending ones in raw-id order; row 0 stored as null."""
    rows = table["row"].to_numpy()
    admitted = np.flatnonzero(rows > 0)
    pending = np.flatnonzero(rows == 0)
    pending = (
        pending[pc.sort_indices(table["raw_id"].take(pa.array(pending))).to_numpy()]
        if len(pending)
        else pending
    )
    order = np.r_[admitted[np.argsort(rows[admitted], kind="stable")], pending].astype(np.int64)
    table = table.take(pa.array(order))
    row = table["row"].to_numpy()
    table = table.set_column(1, "row", pa.array(row, pa.int64(), mask=row == 0))
    return table.cast(vocab_schema(key_type))


def day_of(ts: np.ndarray) -> list[str]:
    """UTC dates (YYYY-MM-DD) of unix seconds."""
    return [dt.datetime.fromtimestamp(int(t), dt.timezone.utc).strftime("%Y-%m-%d") for t in ts]


def read_vocabulary(path: str | Path, min_count: int | None = None) -> Vocabulary:
    """A vocabulary Parquet file: a local path or a URI (read through the storage layer)."""
    path = os.fspath(path)
    try:
        fs, where = storage.resolve(path)
        table = pq.read_table(where, filesystem=fs)
    except storage.StorageError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: vocabulary file does not exist") from None
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: not a readable vocabulary Parquet file ({exc})") from exc
    missing = [
        n for n in ("raw_id", "row", "first_day", "first_timestamp", "count") if n not in table.column_names
    ]
    if missing:
        raise ValueError(f"{path}: not a vocabulary file, missing column(s) {missing}")
    try:
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        stored = meta.get("min_count", 1) if isinstance(meta, dict) else None
    except (ValueError, RecursionError):
        stored = None
    if min_count is None and (type(stored) is not int or not 1 <= stored <= 2**31):
        raise ValueError(f"{path}: {META_KEY.decode()} is not a JSON object with an integer min_count >= 1")
    key_type = key_type_of(table.schema.field("raw_id").type)
    table = table.select(list(vocab_schema(key_type).names)).cast(vocab_schema(key_type))
    try:
        return Vocabulary(table, min_count if min_count is not None else int(stored))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def check_vocabulary(path: str | Path, num_items: int, table: str = "the item table") -> Vocabulary:
    """The vocabulary file at `path`, read and checked against an item table of `num_items` rows (padding
    row 0 + N items): raw ids non-null and unique, admitted rows exactly 1..N in table order (pending ids
    after them), N = num_items - 1, counts >= 1. Any failure is a ValueError of one line naming the file;
    `table` names what num_items came from (the model's table, the data's manifest).

    Every reader of a vocabulary that others wrote calls this first: training before it copies the data's
    vocabulary into each checkpoint, serving before it answers with raw ids."""
    path = os.fspath(path)
    if "://" not in path and (Path(path).is_symlink() or not Path(path).is_file()):
        raise ValueError(f"{path}: not a plain file")
    try:
        vocab = read_vocabulary(path)
    except storage.StorageError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:  # Type: ids neither ints nor strings; fuxi.meta
        message = " ".join(str(exc).split())[:600]
        raise ValueError(message if message.startswith(path) else f"{path}: {message}") from None
    except Exception as exc:  # pyarrow's casts raise their own types
        raise ValueError(f"{path}: not a vocabulary ({type(exc).__name__}: {str(exc)[:160]})") from None
    keys = vocab.table["raw_id"]
    if keys.null_count:
        raise ValueError(f"{path}: raw_id holds {keys.null_count} nulls")
    if len(pc.unique(keys)) != len(keys):
        seen: set[Any] = set()
        dup = next(k for k in keys.to_pylist() if k in seen or seen.add(k))
        raise ValueError(f"{path}: raw id {dup!r} appears more than once")
    rows = vocab.table["row"].combine_chunks()
    if rows.null_count != len(rows) - vocab.num_rows:  # pending ids (null rows) come after admitted ones
        raise ValueError(f"{path}: rows must be 1..N in table order, admitted ids first")
    counts = vocab.table["count"]
    if counts.null_count or (len(counts) and pc.min(counts).as_py() < 1):
        raise ValueError(f"{path}: count must be >= 1 for every id (an id is listed once it is seen)")
    if vocab.num_rows + 1 != num_items:
        raise ValueError(
            f"{path}: {vocab.num_rows} item rows, {table} has {num_items - 1} (plus padding row 0)"
        )
    return vocab


def write_vocabulary(vocab: Vocabulary, path: PathOrURI) -> PathOrURI:
    """Write the vocabulary Parquet to a path or URI (whole or not at all); returns `path`."""
    from pipeline.data.sequences import write_parquet  # sequences imports this module

    meta = {"min_count": vocab.min_count, "rows": vocab.num_rows, "key_type": vocab.key_type}
    table = vocab.table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    write_parquet(table, os.fspath(path), compression="zstd")
    return path


def find_vocabulary(source: str | Path) -> Path | str | None:
    """The vocabulary of a sequence shard directory (its manifest names it) or of a sequence file (its
    metadata names a sidecar file next to it); None when the data's item ids are rows. A local source
    gives a Path, a URI source a URI; the name read from the manifest or metadata is confined to the
    source's folder or prefix."""
    uri = os.fspath(source)
    if storage.is_file(uri):
        try:
            fs, where = storage.resolve(uri)
            raw = (pq.read_schema(where, filesystem=fs).metadata or {}).get(META_KEY)
        except Exception:  # not Parquet: no vocabulary
            return None
        name = _named(json.loads(raw) if raw else {}, "vocab", uri, "fuxi.meta")
        found = storage.join(storage.parent(uri), name, field="fuxi.meta: vocab") if name else None
    else:
        manifest = storage.join(uri, SHARD_MANIFEST)
        if not storage.is_file(manifest):
            return None
        vocab = _named(json.loads(storage.read_bytes(manifest)), "vocab", manifest, "", dict)
        name = _named(vocab, "file", manifest, "vocab") if vocab else None
        found = storage.join(uri, name, field=f"{SHARD_MANIFEST}: vocab.file") if name else None
    if found is None:
        return None
    return Path(found) if "://" not in found else found


def _named(doc: Any, key: str, where: str, at: str, kind: type = str) -> Any:
    """doc[key] when doc is an object and the value (if any) a `kind`; else one line naming the file."""
    if not isinstance(doc, dict):
        raise ValueError(f"{storage.display(where)}: {at or 'the document'} is not a JSON object")
    value = doc.get(key)
    if value is not None and not isinstance(value, kind):
        field = f"{at}.{key}" if at else key
        raise ValueError(f"{storage.display(where)}: {field} is not a {kind.__name__} ({str(value)[:40]!r})")
    return value
