"""The sequence Parquet format every reader produces and every trainer consumes.

One row per user: `user_id` (the raw user id: int64, or string), `item_ids` list<int64> (rows of the
item table; the item vocabulary, pipeline/data/vocab.py, maps them to raw ids), `timestamps` list<int64>,
in time order. Ties keep the input's order: events of one user that share a timestamp stay in the order they
have in the file (a stable sort by (user, timestamp); `time_order`), never re-sorted by item id, which would
reorder what the user did within one second and so change which item a split holds out. The
file's key-value metadata records `fuxi.num_items` (rows of the item table: vocabulary rows + 1, or max
item id + 1 for identity ids; row 0 is padding), its vocabulary file (a sidecar) and where the data came
from.

Splits (leave-one-out by position):
  anchor     train on each sequence minus its last item; evaluate the last item (official code).
  validated  train on all but the last two; validate on the second-to-last; test on the last.
  temporal   a global time cut instead (pipeline/data/temporal.py): train on the events before it,
             evaluate every event of the next window (valid) and of the one after (test).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from pipeline.data.schema import SEQUENCE_SCHEMA, SHARD_MANIFEST, sequence_schema
from pipeline.data.vocab import find_vocabulary

PathOrURI = TypeVar("PathOrURI", str, Path)  # a writer returns what it was given

EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
META_KEY = b"fuxi.meta"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a manifest lists shards and days: far below this
# rows of an item table: TorchRec's and faiss's row ids are fine far beyond this; a table this large
# (2^31 rows x 64 dims fp32 = 512 GiB) is already beyond any one host
MAX_NUM_ITEMS = 2**31

# number of trailing items held out of training, and of the evaluation sequence, per protocol
PROTOCOLS = {
    "anchor": {"train": 1, "test": 0},
    "validated": {"train": 2, "valid": 1, "test": 0},
    # rows are cut by time, not by position: pipeline.data.batches.temporal_batches builds the splits
    "temporal": {"train": 0, "valid": 0, "test": 0},
}


@dataclass
class SequenceData:
    table: pa.Table  # SEQUENCE_SCHEMA
    num_items: int
    meta: dict = field(default_factory=dict)
    # the item vocabulary (pipeline.data.vocab): a Path on local disk, a URI on an object store; None: item
    # ids are rows
    vocab: Path | str | None = None

    @property
    def num_users(self) -> int:
        return self.table.num_rows

    @property
    def num_interactions(self) -> int:
        return int(pc.sum(pc.list_value_length(self.table["item_ids"])).as_py() or 0)

    def lengths(self) -> np.ndarray:
        return pc.list_value_length(self.table["item_ids"]).to_numpy(zero_copy_only=False)

    def max_item(self) -> int:
        """The largest item row any sequence holds (0 when empty)."""
        return _max_item(self.table)


def time_order(events: pa.Table) -> pa.Array:
    """Row indices of `events` sorted by (user_id, timestamp), events of one user at one timestamp in the
    order of their rows: the row position is the last sort key, so the order does not rest on the sort
    being stable."""
    keys = events.select(["user_id", "timestamp"]).append_column(
        "_row", pa.array(np.arange(events.num_rows, dtype=np.int64))
    )
    return pc.sort_indices(
        keys, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending"), ("_row", "ascending")]
    )


def events_to_sequences(events: pa.Table) -> pa.Table:
    """Group (user_id, item_id, timestamp) events into one time-ordered row per user (ties: row order)."""
    missing = [c for c in EVENT_COLUMNS if c not in events.column_names]
    if missing:
        raise ValueError(f"events table lacks column(s) {missing}; has {events.column_names}")
    user_type = pa.string() if pa.types.is_string(events.schema.field("user_id").type) else pa.int64()
    events = events.select(list(EVENT_COLUMNS)).cast(
        pa.schema([("user_id", user_type), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    )
    events = events.take(time_order(events))
    users = events["user_id"].to_numpy(zero_copy_only=False)
    schema = sequence_schema(user_type)
    if len(users) == 0:
        return schema.empty_table()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    offsets = pa.array(np.r_[starts, len(users)].astype(np.int32))
    items = pa.ListArray.from_arrays(offsets, events["item_id"].combine_chunks())
    times = pa.ListArray.from_arrays(offsets, events["timestamp"].combine_chunks())
    return pa.Table.from_arrays([pa.array(users[starts], user_type), items, times], schema=schema)


def write_sequences(data: SequenceData, path: PathOrURI) -> PathOrURI:
    """Write a sequence Parquet file to a path or URI; returns `path`."""
    meta = dict(data.meta, num_items=data.num_items, num_users=data.num_users)
    schema = sequence_schema(data.table.schema.field("user_id").type)
    table = data.table.cast(schema).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    write_parquet(table, os.fspath(path), compression="zstd")
    return path


def write_parquet(table: pa.Table, uri: str, **options: Any) -> None:
    """`pq.write_table` to a path or URI, whole or not at all: on local disk a temporary file beside it
    renamed over it; on an object store the object appears only when its upload completes."""
    if "://" not in uri or storage.is_local(uri):
        path = storage.parse(uri).path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        pq.write_table(table, tmp, **options)
        os.replace(tmp, path)
        return
    with storage.open_output(uri) as out:
        pq.write_table(table, out, **options)


def open_parquet(uri: str) -> pq.ParquetFile:
    """A Parquet file of a path or URI, opened through the storage layer (one footer read)."""
    fs, path = storage.resolve(uri)
    return pq.ParquetFile(path, filesystem=fs)


def read_sequences(path: str | Path) -> SequenceData:
    """A sequence Parquet file, or a shard directory written by `fuxi data build-sequences`; a local path
    or a URI (`s3://bucket/seq.parquet`), read through the storage layer."""
    uri = os.fspath(path)
    if storage.is_file(uri):
        return _read_file(uri)
    if storage.exists(uri):
        return _read_shard_dir(uri)
    raise FileNotFoundError(f"sequence file {storage.display(uri)} does not exist")


def item_rows(path: str | Path) -> int:
    """`num_items` of a sequence file or shard directory without reading its sequences: the file's
    metadata (or its largest item + 1, reading that column only), or the shard manifest's; checked as the
    readers check it (a preset sized from crafted data is refused before a table is built)."""
    uri = os.fspath(path)
    if storage.is_file(uri):
        shown = storage.display(uri)
        try:
            raw = (open_parquet(uri).schema_arrow.metadata or {}).get(META_KEY)
        except storage.StorageError:
            raise
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{shown}: not a readable Parquet file ({exc})") from exc
        meta = _file_meta(raw, shown)
        num_items = meta.get("num_items") or _max_item(read_parquet(uri, columns=["item_ids"])) + 1
        return check_num_items(_integer_num_items(num_items, shown), shown)
    if storage.exists(uri):
        return check_num_items(_manifest_num_items(read_shard_manifest(uri), uri), storage.display(uri))
    raise FileNotFoundError(f"sequence file {storage.display(uri)} does not exist")


def check_num_items(n: int, source: str) -> int:
    """`n` if it is a sane item table size (rows, padding row 0 included); else one line naming `source`."""
    if type(n) is not int or not 2 <= n <= MAX_NUM_ITEMS:
        raise ValueError(f"{source}: num_items {str(n)[:40]} is not in 2..2^31 (rows of the item table)")
    return n


def _file_meta(raw: bytes | None, shown: str) -> dict:
    """A sequence file's `fuxi.meta`: bytes someone else wrote, so any failure is one line naming the file."""
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"{shown}: not a sequence file ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{shown}: not a sequence file ({META_KEY.decode()} is not a JSON object)")
    return meta


def _integer_num_items(num_items: Any, shown: str) -> int:
    if type(num_items) is not int:
        raise ValueError(f"{shown}: {META_KEY.decode()} num_items {str(num_items)[:40]!r} is not an integer")
    return num_items


def _manifest_num_items(manifest: dict, uri: str) -> int:
    where = storage.display(storage.join(uri, SHARD_MANIFEST))
    if not isinstance(manifest.get("shards"), list) or type(manifest.get("num_items")) is not int:
        raise ValueError(f"{where}: expected an object with a list 'shards' and an integer 'num_items'")
    return manifest["num_items"]


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file of a path or URI, through the storage layer's filesystem."""
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def _read_file(uri: str) -> SequenceData:
    shown = storage.display(uri)
    try:
        table = read_parquet(uri)
    except storage.StorageError:
        raise
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{shown}: not a readable Parquet file ({exc})") from exc
    missing = [f.name for f in SEQUENCE_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{shown}: not a sequence file, missing column(s) {missing}")
    meta = _file_meta((table.schema.metadata or {}).get(META_KEY), shown)
    try:
        table = table.select([f.name for f in SEQUENCE_SCHEMA])
        table = table.cast(sequence_schema(table.schema.field("user_id").type))
        num_items = meta.get("num_items") or _max_item(table) + 1
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise ValueError(f"{shown}: not a sequence file ({' '.join(str(exc).split())[:200]})") from None
    num_items = _integer_num_items(num_items, shown)
    return SequenceData(table=table, num_items=num_items, meta=meta, vocab=find_vocabulary(uri))


def read_shard_manifest(uri: str) -> dict:
    """The manifest of a shard directory (a folder or a prefix)."""
    manifest_uri = storage.join(uri, SHARD_MANIFEST)
    if not storage.is_file(manifest_uri):
        raise ValueError(
            f"{storage.display(uri)}: a directory without {SHARD_MANIFEST}, not a sequence shard directory"
        )
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri, limit=MAX_MANIFEST_BYTES))
    except (ValueError, RecursionError) as exc:
        shown = storage.display(manifest_uri)
        raise ValueError(f"{shown}: not valid JSON ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{storage.display(manifest_uri)}: expected a JSON object")
    return manifest


def shard_uris(uri: str, manifest: dict) -> list[str]:
    """The shard files a manifest names, each confined to the shard directory (a name read from the
    manifest is refused in one line when it is absolute or climbs out)."""
    return [
        storage.join(uri, s["file"], field=f"{SHARD_MANIFEST}: shards[{k}].file")
        for k, s in enumerate(manifest["shards"])
    ]


def _read_shard_dir(uri: str) -> SequenceData:
    """All shards of a directory in manifest order; num_items comes from the manifest."""
    manifest = read_shard_manifest(uri)
    where = storage.display(storage.join(uri, SHARD_MANIFEST))
    _manifest_num_items(manifest, uri)
    if not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in manifest["shards"]):
        raise ValueError(f"{where}: every shard must be an object with a string 'file'")
    names = [f.name for f in SEQUENCE_SCHEMA]
    schema = sequence_schema(pa.string() if manifest.get("user_key") == "string" else None)
    tables = []
    for shard in shard_uris(uri, manifest):
        try:
            tables.append(read_parquet(shard, columns=names).cast(schema))
        except storage.StorageError:
            raise
        except Exception as exc:  # pyarrow's errors for a corrupt file or a wrong column type
            shown = storage.display(shard)
            raise ValueError(f"{shown}: not a sequence shard ({' '.join(str(exc).split())[:200]})") from None
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    meta = {
        k: manifest[k]
        for k in ("format", "generation", "max_length", "num_partitions", "users")
        if k in manifest
    }
    source = str(Path(uri).resolve()) if "://" not in uri else storage.display(uri)
    meta.update(source=source, days=sorted(manifest.get("days", {})))
    return SequenceData(
        table=table, num_items=int(manifest["num_items"]), meta=meta, vocab=find_vocabulary(uri)
    )


def _max_item(table: pa.Table) -> int:
    flat = pc.list_flatten(table["item_ids"])
    return int(pc.max(flat).as_py() or 0)


def token_budget_cuts(tokens: np.ndarray, budget: int) -> np.ndarray:
    """Split points of a sequence of rows with `tokens` positions each into batches of about `budget`
    positions: a batch ends where the running token count crosses a multiple of the budget (so every
    batch but the last holds >= budget - max(tokens) positions). For np.split. Used by
    pipeline.data.batches.SequenceBatches (`data.batch_tokens`) and the throughput benchmark."""
    cum = np.cumsum(tokens)
    return np.flatnonzero(np.diff((cum - 1) // budget)) + 1


def eligible_rows(data: SequenceData, drop_last: int) -> np.ndarray:
    """Rows that still have a history and a target after dropping `drop_last` trailing items."""
    return np.flatnonzero(data.lengths() - drop_last >= 2)
