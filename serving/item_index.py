"""Top-k over the item table: the exact chunked scan every serving path uses, and a faiss index for speed.

The model scores an item by the inner product of the user vector with the item's L2-normalised table row
(`LoadedModel.item_vectors`), so inner product on those rows is the exact score and a faiss inner-product
index over them (HNSW; IVF optional) approximates it. Row 0 is padding and never returned; a user's
history items are filtered ("seen").

    scores, rows = exact_top_k(user_BD, items_VD, seen, k)       # chunks of the table: bounded memory
    index = build_index(items_VD, kind="hnsw", m=32)             # faiss, inner product
    write_index(index, path); index = read_index(path)           # faiss's own binary format, not pickle
    scores, rows = index_top_k(index, user_BD, seen, k, ef_search=128)

`fuxi index` writes `item_index.faiss` (+ `item_index.json`: kind, parameters, rows, build time) into a
checkpoint folder, where the batch job and the served model find it (`--use-index`, param `use_index`).
The folder may be a URI (`s3://...`): faiss reads and writes local files only, so the index is staged
through a temporary file and copied by the storage layer; it is checked (`read_index`) on the local copy.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import storage

INDEX_FILE = "item_index.faiss"
INDEX_META = "item_index.json"
DEFAULT_CHUNK = 65_536  # item rows scored at once: users x chunk fp32 scores (256 users: 64 MiB)


def _seen_pairs(seen: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(user index, item row) of every seen item, flat."""
    lengths = torch.as_tensor([len(s) for s in seen], dtype=torch.long)
    users = torch.repeat_interleave(torch.arange(len(seen)), lengths)
    items = torch.as_tensor([int(i) for s in seen for i in s], dtype=torch.long)
    return users, items


def exact_top_k(
    user_BD: torch.Tensor,
    items_VD: torch.Tensor,
    seen: Sequence[Sequence[int]] | None,
    k: int,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B, k], item rows [B, k]), best first: the exact inner-product top-k over rows 1..V-1,
    without each user's `seen` rows. The table is scored `chunk` rows at a time and the running top-k
    merged, so memory is B x chunk whatever V is. k is capped at V - 1; a user whose every row is seen
    gets -inf scores (row ids then are arbitrary)."""
    num_items = items_VD.shape[0]
    k = min(k, num_items - 1)
    pairs = _seen_pairs(seen) if seen is not None else None
    best_s = torch.full((user_BD.shape[0], 0), -torch.inf)
    best_i = torch.zeros((user_BD.shape[0], 0), dtype=torch.long)
    with torch.no_grad():
        for lo in range(0, num_items, chunk):
            hi = min(lo + chunk, num_items)
            scores = user_BD @ items_VD[lo:hi].T
            if lo == 0:
                scores[:, 0] = -torch.inf  # padding row
            if pairs is not None:
                users, items = pairs
                inside = (items >= lo) & (items < hi)
                scores[users[inside], items[inside] - lo] = -torch.inf
            top = torch.topk(scores, min(k, hi - lo), dim=1)
            best_s = torch.cat([best_s, top.values], 1)
            best_i = torch.cat([best_i, top.indices + lo], 1)
            if best_s.shape[1] > k:  # merge: keep the k best so far (stable: earlier rows win ties)
                keep = torch.topk(best_s, k, dim=1)
                best_s, best_i = keep.values, best_i.gather(1, keep.indices)
    return best_s.numpy(), best_i.numpy()


# ---------------------------------------------------------------------------------------------------
# faiss


def build_index(
    items_VD: torch.Tensor | np.ndarray,
    kind: str = "hnsw",
    m: int = 32,
    ef_construction: int = 200,
    nlist: int = 1024,
    threads: int | None = None,
) -> Any:
    """A faiss inner-product index over the item rows (row r of the table = faiss id r; row 0 is added
    too and filtered at query time, so ids stay rows). kind: "hnsw" (IndexHNSWFlat, M = m) or "ivf"
    (IndexIVFFlat with nlist k-means lists, trained on the rows)."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    x = np.ascontiguousarray(np.asarray(items_VD, dtype=np.float32))
    d = x.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, min(nlist, max(1, len(x) // 39)), faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    else:
        raise ValueError(f"index kind {kind!r}: expected 'hnsw' or 'ivf'")
    index.add(x)
    return index


def set_search_params(index: Any, ef_search: int = 128, nprobe: int = 16) -> None:
    """The query-time knobs: efSearch for HNSW, nprobe for IVF."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = nprobe


def index_top_k(
    index: Any,
    user_BD: torch.Tensor | np.ndarray,
    seen: Sequence[Sequence[int]] | None,
    k: int,
    ef_search: int = 128,
    nprobe: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B, k], item rows [B, k]) from the index: asks for k + the longest history + 1 candidates,
    drops the padding row and seen rows, keeps the first k. Missing slots (too few candidates) are row 0
    with score -inf."""
    q = np.ascontiguousarray(np.asarray(user_BD, dtype=np.float32))
    longest = max((len(s) for s in seen), default=0) if seen is not None else 0
    want = min(k + longest + 1, index.ntotal)
    set_search_params(index, max(ef_search, want), nprobe)
    scores, rows = index.search(q, want)
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.zeros((len(q), k), dtype=np.int64)
    for b in range(len(q)):
        drop = {0, *map(int, seen[b])} if seen is not None else {0}
        keep = [j for j in range(want) if rows[b, j] >= 0 and int(rows[b, j]) not in drop][:k]
        out_s[b, : len(keep)] = scores[b, keep]
        out_i[b, : len(keep)] = rows[b, keep]
    return out_s, out_i


def valid_slots(scores_K: np.ndarray, rows_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One user's top-k without its empty slots: a user who has seen nearly every item gets fewer than k
    rows, never the padding row 0 or a non-finite (-inf: filtered) score."""
    keep = np.isfinite(scores_K) & (rows_K > 0)
    return scores_K[keep], rows_K[keep]


def write_index(index: Any, folder: str | Path, meta: dict[str, Any]) -> str:
    """item_index.faiss (faiss's binary format) + item_index.json into `folder` (a path or a URI); returns
    the index file's URI. faiss writes a local temporary file, which the storage layer moves or uploads
    whole (a rename on disk, one upload on an object store)."""
    import faiss

    target = storage.join(os.fspath(folder), INDEX_FILE, field="index file")
    if storage.is_local(target):
        tmp = storage.join(os.fspath(folder), f".{INDEX_FILE}.tmp", field="index file")
        faiss.write_index(index, tmp)
        os.replace(tmp, target)
    else:
        with tempfile.TemporaryDirectory(prefix="fuxi-index-") as staging:
            local = os.path.join(staging, INDEX_FILE)
            faiss.write_index(index, local)
            storage.copy_file(local, target)
    storage.write_bytes(
        storage.join(os.fspath(folder), INDEX_META, field="index file"), json.dumps(meta, indent=1).encode()
    )
    return target


KINDS = {"hnsw": b"IHNf", "ivf": b"IwFl"}  # faiss's fourcc of IndexHNSWFlat and IndexIVFFlat files
MAX_INDEX_META_BYTES = 64 * 1024
VECTOR_TOLERANCE = 1e-5  # max |index vector - table row|: the index must hold the table's own rows


def read_index(
    folder: str | Path, items_VD: torch.Tensor | np.ndarray | None = None
) -> tuple[Any, dict[str, Any]] | None:
    """(index, meta) from a checkpoint folder, or None when it has none; checked before use, each failure
    a TrustError naming the file: item_index.json (kind, rows, dim) is required, the file's header must
    be that kind's (nothing else is handed to faiss's reader), faiss's read errors are one line, the
    index must be inner product with `rows` vectors of `dim`, its graph or lists may only name those
    rows, and with `items_VD` (the table) the rows and dimension must be the table's and the stored
    vectors its rows. A folder on an object store: its two files are copied to a temporary folder and
    checked there (errors name the URI)."""
    from serving.trust import TrustError

    uri = os.fspath(folder)
    if storage.is_local(uri):
        return _read_local_index(Path(uri), items_VD)
    if not storage.is_file(storage.join(uri, INDEX_FILE, field="index file")):
        return None
    with tempfile.TemporaryDirectory(prefix="fuxi-index-") as staging:
        for name in (INDEX_FILE, INDEX_META):
            remote = storage.join(uri, name, field="index file")
            if storage.is_file(remote):
                storage.copy_file(remote, os.path.join(staging, name))
        try:
            return _read_local_index(Path(staging), items_VD)
        except TrustError as exc:
            raise TrustError(str(exc).replace(staging, storage.display(uri))) from None


def _read_local_index(
    folder: Path, items_VD: torch.Tensor | np.ndarray | None = None
) -> tuple[Any, dict[str, Any]] | None:
    """read_index on a local folder."""
    import faiss

    from serving.trust import TrustError, read_json

    file, meta_file = folder / INDEX_FILE, folder / INDEX_META
    if not file.exists() and not file.is_symlink():
        return None
    for f in (file, meta_file):
        if f.is_symlink() or not f.is_file():
            raise TrustError(
                f"{f}: missing or not a plain file (an index needs {INDEX_FILE} and {INDEX_META})"
            )
    meta = read_json(meta_file, MAX_INDEX_META_BYTES)
    if not isinstance(meta, dict):
        raise TrustError(f"{meta_file}: expected a JSON object")
    kind, rows, dim = meta.get("kind"), meta.get("rows"), meta.get("dim")
    if kind not in KINDS:
        raise TrustError(f"{meta_file}: kind {str(kind)[:40]!r}, expected one of {', '.join(KINDS)}")
    for key, value in (("rows", rows), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**40:
            raise TrustError(f"{meta_file}: {key} {str(value)[:40]!r}, expected a positive integer")
    if items_VD is not None and (rows, dim) != tuple(items_VD.shape):
        raise TrustError(
            f"{meta_file}: an index of {rows} rows x {dim}, the item table is "
            f"{items_VD.shape[0]} x {items_VD.shape[1]}"
        )
    with open(file, "rb") as f:
        head = f.read(4)
    if head != KINDS[kind]:
        raise TrustError(f"{file}: header {head!r} is not a faiss {kind} index ({KINDS[kind]!r})")
    try:
        index = faiss.read_index(str(file))
    except Exception as exc:  # faiss's C++ message: keep its last clause, the reason
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = reason.rsplit("Error: ", 1)[-1].replace(str(file), "").strip()
        raise TrustError(f"{file}: not a readable faiss index ({reason[:160]})") from None
    _check_structure(file, index, kind, int(meta["rows"]), int(meta["dim"]))
    if items_VD is not None:
        stored = index.reconstruct_n(0, index.ntotal)
        table = np.asarray(items_VD, dtype=np.float32)
        diff = float(np.abs(stored - table).max()) if np.isfinite(stored).all() else math.inf
        if diff > VECTOR_TOLERANCE:
            raise TrustError(f"{file}: its vectors are not the item table's rows (max difference {diff:.3g})")
    return index, meta


def _check_structure(file: Path, index: Any, kind: str, rows: int, dim: int) -> None:
    """The index is what item_index.json says, and every id its graph or lists hold is one of its rows
    (faiss follows them without bounds checks)."""
    import faiss

    want = "IndexHNSWFlat" if kind == "hnsw" else "IndexIVFFlat"
    if type(index).__name__ != want or type(index).__module__ != faiss.IndexFlat.__module__:
        raise _refused(file, f"holds a {type(index).__name__}, not a {want}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _refused(file, "is not an inner-product index")
    if (index.ntotal, index.d) != (rows, dim):
        raise _refused(file, f"holds {index.ntotal} rows x {index.d}, item_index.json says {rows} x {dim}")
    if kind == "hnsw":
        h = index.hnsw
        neighbors = faiss.vector_to_array(h.neighbors)
        offsets = faiss.vector_to_array(h.offsets)
        levels = faiss.vector_to_array(h.levels)
        cum = faiss.vector_to_array(h.cum_nneighbor_per_level)
        ok = (
            index.storage.ntotal == rows
            and len(levels) == rows
            and len(offsets) == rows + 1
            and offsets[0] == 0
            and offsets[-1] == len(neighbors)
            and (len(neighbors) == 0 or (neighbors.min() >= -1 and neighbors.max() < rows))
            and 0 <= h.entry_point < rows
            and 0 <= h.max_level < len(cum) - 1
            and levels.min() >= 1
            and levels.max() == h.max_level + 1
            and np.array_equal(np.diff(offsets), cum[levels])
        )
        if not ok:
            raise _refused(file, "its HNSW graph is inconsistent (levels, offsets or neighbour ids)")
    else:
        lists = index.invlists
        sizes = [lists.list_size(i) for i in range(index.nlist)]
        ids = [faiss.rev_swig_ptr(lists.get_ids(i), n).copy() for i, n in enumerate(sizes) if n]
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        if (
            index.quantizer.ntotal != index.nlist
            or index.quantizer.d != dim
            or sum(sizes) != rows
            or not np.array_equal(np.sort(flat), np.arange(rows))
        ):
            raise _refused(file, "its inverted lists do not hold each row exactly once")
        index.make_direct_map()  # reconstruct_n: the vectors are checked against the table


def _refused(file: Path, what: str) -> Exception:
    from serving.trust import TrustError

    return TrustError(f"{file}: {what}")


def index_checkpoint(
    loaded: Any, kind: str = "hnsw", m: int = 32, ef_construction: int = 200, nlist: int = 1024
) -> tuple[str, dict[str, Any]]:
    """Build the index of a loaded checkpoint's item vectors and store it in the checkpoint folder (the
    checkpoint's own URI when it was loaded from an object store, and its local staged copy)."""
    start = time.perf_counter()
    items = loaded.item_vectors().numpy()
    index = build_index(items, kind, m, ef_construction, nlist)
    meta = {
        "kind": kind,
        "m": m,
        "ef_construction": ef_construction,
        "nlist": nlist if kind == "ivf" else None,
        "rows": int(items.shape[0]),
        "dim": int(items.shape[1]),
        "metric": "inner_product on L2-normalised item rows",
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    written = write_index(index, loaded.path, meta)
    source = getattr(loaded, "source", None)
    if source:
        written = write_index(index, source, meta)
    return written, meta


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over users of |approx top-k ∩ exact top-k| / k."""
    k = exact_rows.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits) / k)
