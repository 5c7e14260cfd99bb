"""The one way to load a checkpoint as a model, outside a training run: `fuxi eval`, the MLflow registry
(pyfunc serving, promotion), the nightly job. One CPU process, no process group: DCP reshards the weights
of a run on any world size into the plain (unsharded) model.

    loaded = load_checkpoint_model("runs/tiny/<run>/checkpoints")   # a checkpoint folder, or a root
    loaded.model, loaded.cfg, loaded.path, loaded.meta, loaded.vocab
    metrics = evaluate_checkpoint(loaded, split="valid")             # or a path
    ids, scores, ignored = loaded.top_k([[5, 17, 3]], [[t0, t1, t2]], k=10)   # raw item ids in and out

A checkpoint folder carries the item vocabulary of its training data (`vocab.parquet`, rows <-> raw ids;
pipeline/data/vocab.py) when the data had one; without it item ids are table rows.

A checkpoint on an object store (`s3://.../checkpoints`, a pointer, or a generation) is resolved to its
generation and copied file by file into a local staging folder first (`local_checkpoint`; links never
followed, names confined): serving's checks (serving/trust.py) read local files, and a generation never
changes, so one copy per process serves every load of it. `LoadedModel.source` keeps the URI.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import datetime as dt
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import storage
from pipeline.train.checkpoint import resolve_checkpoint
from pipeline.train.config import ModelConfig, TrainConfig
from pipeline.train.grow import warm_start

__all__ = [
    "LoadedModel",
    "checkpoint_config",
    "evaluate_checkpoint",
    "load_checkpoint_model",
    "local_checkpoint",
    "parameter_count",
    "recent_item_topk",
    "resolve_checkpoint",
]


@dataclass
class LoadedModel:
    model: Any  # model.recommender.SequentialRecommender, in eval mode
    cfg: TrainConfig  # the config the checkpoint was trained with (train.json)
    path: str  # the resolved checkpoint: a folder, or a URI (pipeline/train/checkpoint.py)
    meta: dict[str, Any]  # the whole train.json
    vocab: Any = None  # pipeline.data.vocab.Vocabulary (rows <-> raw item ids), None: ids are rows
    source: str | None = None  # the checkpoint's URI when `path` is a local staged copy of it

    def top_k(
        self,
        histories: list[list[Any]],
        timestamps: list[list[int]] | None = None,
        request_times: list[int] | None = None,
        k: int = 10,
        filter_seen: bool = True,
    ) -> tuple[list[list[Any]], list[np.ndarray], list[int]]:
        """Top-k in raw item ids: (item ids per user, their scores per user, history items ignored per
        user). A user who has seen nearly every item gets fewer than k (never row 0 or a -inf score).

        Histories are raw ids (ints or strings, as the data's vocabulary); ids the model does not know
        (not in its vocabulary, or rows beyond its table) are dropped from the history and counted.
        Without a vocabulary ids are rows. See `top_k_rows` for the rest."""
        rows, stamps, ignored = self.known_rows(histories, timestamps)
        if request_times is None and timestamps is not None:  # the request time of the raw history
            request_times = [int(t[-1]) if len(t) else 0 for t in timestamps]
        from serving.item_index import valid_slots

        ids, scores = self.top_k_rows(rows, stamps, request_times, k, filter_seen)
        kept = [valid_slots(s, r) for s, r in zip(scores, ids)]
        return [self.raw_ids(r) for _, r in kept], [s for s, _ in kept], ignored

    def known_rows(
        self, histories: list[list[Any]], timestamps: list[list[int]] | None = None
    ) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """Raw-id histories -> (table rows, their timestamps, ids ignored per user): ids the model does
        not know (not in its vocabulary, or rows beyond its table) are dropped and counted."""
        if timestamps is not None and len(timestamps) != len(histories):
            raise ValueError("item_ids and timestamps differ in number of users")
        rows, stamps, ignored = [], [], []
        for b, h in enumerate(histories):
            t = list(timestamps[b]) if timestamps is not None else [0] * len(h)
            if len(h) != len(t):
                raise ValueError("item_ids and timestamps differ in length")
            r = self._rows(h)
            known = (r > 0) & (r < self.cfg.model.num_items)
            rows.append([int(x) for x in r[known]])
            stamps.append([int(x) for x, ok in zip(t, known) if ok])
            ignored.append(int((~known).sum()))
        return rows, stamps, ignored

    def _rows(self, raw: list[Any]) -> np.ndarray:
        if self.vocab is not None:
            return self.vocab.lookup(list(raw))
        try:
            return np.asarray([int(x) for x in raw], dtype=np.int64)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.path}: this model has no vocabulary; item ids must be integers"
            ) from None

    def raw_ids(self, rows: np.ndarray) -> list[Any]:
        """Item rows of this model's table -> raw item ids."""
        if self.vocab is None:
            return [int(r) for r in rows]
        return self.vocab.raw_ids(np.asarray(rows))

    def top_k_rows(
        self,
        histories: list[list[int]],
        timestamps: list[list[int]] | None = None,
        request_times: list[int] | None = None,
        k: int = 10,
        filter_seen: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(item rows [B, k], scores [B, k]), best first, for histories of table rows (`exact_top_k`: slots
        beyond the unseen items score -inf; `valid_slots` drops them). `request_times` is the time of the
        request (FuXi-alpha's temporal channel reads it); default: the last history timestamp."""
        from serving.item_index import exact_top_k

        scores, rows = exact_top_k(
            self.user_vectors(histories, timestamps, request_times),
            self.item_vectors(),
            histories if filter_seen else None,
            k,
        )
        return rows, scores

    def user_vectors(
        self,
        histories: list[list[int]],
        timestamps: list[list[int]] | None = None,
        request_times: list[int] | None = None,
    ) -> Any:
        """User vectors [B, D] (torch, L2-normalised) of histories of table rows: what scores every item
        (score = user . item_vectors()). Each history is cut to its last max_sequence_length items."""
        import pyarrow as pa
        import torch

        from pipeline.data.collate import collate_arrow

        if not histories or any(len(h) == 0 for h in histories):
            raise ValueError("every history needs at least one known item")
        timestamps = timestamps if timestamps is not None else [[0] * len(h) for h in histories]
        if request_times is None:
            request_times = [int(t[-1]) for t in timestamps]
        items, times = [], []
        for h, t, now in zip(histories, timestamps, request_times, strict=True):
            if len(h) != len(t):
                raise ValueError("item_ids and timestamps differ in length")
            items.append([int(i) for i in h] + [0])  # the target slot: id 0 (padding), time of the request
            times.append([int(x) for x in t] + [int(now)])
        table = pa.table(
            {
                "user_id": pa.array(range(len(items)), pa.int64()),
                "item_ids": pa.array(items, pa.list_(pa.int64())),
                "timestamps": pa.array(times, pa.list_(pa.int64())),
            }
        )
        batch = collate_arrow(table, self.cfg.model.max_sequence_length, drop_last=0)
        with torch.no_grad():
            return self.model.encode_last(batch.seq)

    def item_vectors(self) -> Any:
        """The item table as the model scores it: [num_items, D] torch, rows L2-normalised (row 0 is
        padding and never recommended)."""
        import torch

        with torch.no_grad():
            return self.model.normalized_item_embeddings().detach()


_staged: dict[str, str] = {}  # generation URI -> its local copy (this process)
_staging_lock = threading.Lock()
_staging_root: str | None = None


def _staging_dir() -> str:
    global _staging_root
    if _staging_root is None:
        _staging_root = tempfile.mkdtemp(prefix="fuxi-checkpoints-")
        atexit.register(shutil.rmtree, _staging_root, True)
    return _staging_root


def local_checkpoint(checkpoint: str | Path) -> str | Path:
    """A local folder to load `checkpoint` from: itself on local disk; on an object store its generation
    (a root's final / latest, or what a pointer names) copied into this process's staging folder, once.
    The copy goes through storage.copy_tree: a name that would leave the folder is refused."""
    uri = os.fspath(checkpoint)
    if storage.is_local(uri):
        return checkpoint
    generation = resolve_checkpoint(uri)
    with _staging_lock:
        if generation not in _staged:
            dest = os.path.join(tempfile.mkdtemp(dir=_staging_dir()), storage.name_of(generation))
            storage.copy_tree(generation, dest)
            _staged[generation] = dest
        return _staged[generation]


@contextlib.contextmanager
def named_by_source(staged: str | Path, source: str | None) -> Iterator[None]:
    """Serving's checks (serving/trust.py) read the staged copy; a refusal of it names the store's URI
    instead of the temporary folder (the copy is the generation file for file, under the same names)."""
    from serving.trust import TrustError

    if source is None:
        yield
        return
    try:
        yield
    except TrustError as exc:
        raise TrustError(str(exc).replace(os.fspath(staged), storage.display(source))) from None


def checkpoint_config(checkpoint: str | Path) -> TrainConfig:
    """The training config a checkpoint records (its train.json, checked), without loading weights."""
    from serving.trust import read_train_json, resolve_served_checkpoint

    return read_train_json(resolve_served_checkpoint(local_checkpoint(checkpoint)))[1]


def load_checkpoint_model(path: str | Path, device: str = "cpu", num_items: int | None = None) -> LoadedModel:
    """resolve and check the folder -> its train.json config, validated -> the model it describes built on
    the meta device and compared with the checkpoint's shapes -> build it -> load the weights (restricted
    DCP loader) -> check them finite and the vocabulary against the table (serving/trust.py). `path`: a
    checkpoint folder, a run's checkpoint root, or a model folder as registered.

    num_items: rows of the item table (default: the checkpoint's). More rows than the checkpoint has grow
    the table (pipeline/train/grow.py): the old rows are the checkpoint's, the new ones the cold-start
    init of a training run under the checkpoint config's seed; the returned cfg.model.num_items is the
    grown size. Fewer rows is a ValueError."""
    from model.recommender import build_model
    from pipeline.data.vocab import VOCAB_FILE
    from pipeline.train.builder import init_item_table
    from serving.trust import (
        check_finite,
        check_shapes,
        check_vocabulary,
        read_train_json,
        resolve_served_checkpoint,
    )

    source = None if storage.is_local(os.fspath(path)) else resolve_checkpoint(path)
    staged = local_checkpoint(path)
    with named_by_source(staged, source):
        resolved = resolve_served_checkpoint(staged)
        meta, cfg = read_train_json(resolved)
        check_shapes(resolved, cfg.model)  # before any tensor is allocated
        saved_rows = cfg.model.num_items
        vocab_file = resolved / VOCAB_FILE
        vocab = check_vocabulary(vocab_file, saved_rows) if vocab_file.exists() else None
        if num_items is not None and num_items != saved_rows:
            cfg.model = dataclasses.replace(cfg.model, num_items=num_items)
        model = build_model(cfg.model, device=device)
        if cfg.model.num_items > saved_rows:  # the rows the checkpoint lacks: as a cold start draws them
            init_fn = model.item_embedding.embedding_configs()[0].init_fn
            init_item_table(model, init_fn, cfg.model.num_items, cfg.model.embedding_dim, cfg.seed)
        with warnings.catch_warnings():
            # one process without a process group is the point here, not a fallback worth a warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            warm_start(model, resolved)
        check_finite(resolved, model)
    return LoadedModel(model.eval(), cfg, str(resolved), meta, vocab, source)


def checkpoint_vocabulary(path: str | Path) -> Any:
    """The vocabulary a checkpoint folder carries, checked against its table, or None (ids are rows)."""
    from pipeline.data.vocab import VOCAB_FILE
    from serving.trust import check_vocabulary, read_train_json

    folder = Path(local_checkpoint(path))
    file = folder / VOCAB_FILE
    return check_vocabulary(file, read_train_json(folder)[1].model.num_items) if file.exists() else None


def evaluate_checkpoint(
    checkpoint: str | Path | LoadedModel,
    data: str | None = None,
    split: str = "valid",
    device: str = "cpu",
    data_overrides: list[str] | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of a checkpoint on a split of `data` (default: the data it was trained on).

    `data_overrides`: `data.*` settings replacing the checkpoint's (e.g. ["data.protocol=temporal",
    "data.cut=2024-01-05"] to score an older model on a newer window). Data with more item rows than the
    model's table (items that arrived after it was trained; rows are append-only) is scored with the table
    grown by fresh rows, as a warm start would begin (pipeline/train/grow.py)."""
    from pipeline.train.config import apply_overrides
    from pipeline.train.evaluate import evaluate
    from pipeline.train.run import build_batches, load_data

    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_checkpoint_model(checkpoint, device)
    cfg = copy.deepcopy(loaded.cfg)
    cfg.data.stream = False  # evaluation reads the data in memory (load_data): a run's streaming is moot
    if data:
        cfg.data.source = data
    if data_overrides:
        bad = [o for o in data_overrides if not o.startswith("data.")]
        if bad:
            raise ValueError(f"data_overrides may only set data.* fields, got {bad}")
        cfg = apply_overrides(cfg, list(data_overrides))
    seqs = load_data(cfg)
    if seqs.num_items > cfg.model.num_items:
        loaded = load_checkpoint_model(loaded.source or loaded.path, device, num_items=seqs.num_items)
        cfg.model = loaded.cfg.model
    batches = build_batches(cfg, seqs)
    if split not in batches:
        raise ValueError(
            f"split {split!r} does not exist under protocol {cfg.data.protocol!r}: {sorted(batches)}"
        )
    return evaluate(loaded.model, batches[split].epoch(), device)


RECENT_DAYS = 3  # "recent item": first seen in the RECENT_DAYS days before the window


def recent_item_topk(loaded: Any, data: str, date: str, users: int = 256, k: int = 10) -> dict[str, float]:
    """How new items fare in recommendations: the share of top-k slots (for up to `users` users active in
    the window, from their history before it) that hold items first seen in the RECENT_DAYS days before
    the window, beside those items' share of the window's events (what a well-calibrated model would
    roughly match)."""
    from pipeline.data.sequences import read_sequences

    cut = int(dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc).timestamp())
    seqs = read_sequences(data)
    lengths = seqs.lengths()
    items = seqs.table["item_ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    times = seqs.table["timestamps"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    first_seen = np.full(int(items.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_seen, items, times)
    recent = (first_seen >= cut - RECENT_DAYS * 86_400) & (first_seen < cut)
    in_window = (times >= cut) & (times < cut + 86_400)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    histories, stamps = [], []
    for s, n in zip(starts, lengths):
        before = int(np.searchsorted(times[s : s + n], cut))  # sequences are time-ordered
        if 0 < before < n and in_window[s + before]:
            histories.append(items[s : s + before][-loaded.cfg.model.max_sequence_length :].tolist())
            stamps.append(times[s : s + before][-loaded.cfg.model.max_sequence_length :].tolist())
        if len(histories) == users:
            break
    if not histories:
        return {}
    top, _ = loaded.top_k_rows(histories, stamps, [cut] * len(histories), k)
    return {
        "topk_recent_item_share": float(recent[top].mean()),
        "window_recent_item_share": float(recent[items[in_window]].mean()) if in_window.any() else 0.0,
        "recent_items": float(recent.sum()),
    }


def parameter_count(model_cfg: ModelConfig) -> int:
    """Trainable parameters of the model a config describes (built on the meta device: no memory)."""
    from model.recommender import build_model, count_parameters

    return count_parameters(build_model(model_cfg, device="meta"))
