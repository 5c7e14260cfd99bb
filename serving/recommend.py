"""Batch recommendations: the top-k of every user of a sequence data set, through Ray Data.

    fuxi recommend --model models:/fuxi-alpha@champion --sequences data/shards --out recs.parquet --k 100

The sequence rows (a shard directory's files, or one sequence Parquet file) are read by Ray Data and
streamed to an actor pool of `Scorer`s (callable classes: each loads the model once) with backpressure,
so memory is bounded by the blocks in flight, not by the number of users. Each user's vector is computed
once from the whole sequence (the model reads its last max_sequence_length items; the request time is
the last event's), and its exact top-k over the item table is taken in chunks with every item of the
sequence filtered (`serving.item_index.exact_top_k`, the same function the served model uses), or from the
faiss index (`use_index`). The driver writes the results to one Parquet file as they arrive:

    user_id | item_ids (list of raw ids, best first) | scores (list<float32>) | ignored | model_version

Every location may be a URI (`s3://...`): the sequences are read by the Ray workers through the storage
layer's filesystem, a checkpoint on a store is staged by each actor (serving.loading.local_checkpoint), and
the results are written to a local temporary file that is renamed (local disk) or uploaded whole (object
store) at the end, so `--out` is never seen half-written.

Item ids in the sequences are rows of the data's vocabulary; the vocabulary is append-only, so they are
the model's rows where the model has them: rows beyond the model's table (items it never saw) are
dropped from the history and counted in `ignored`. A user left with no known item gets empty lists.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from pipeline.data.schema import SHARD_MANIFEST

COLUMNS = ["user_id", "item_ids", "timestamps"]
STORES = ("s3", "gs", "hdfs")  # `--model` URIs of a checkpoint on an object store


@dataclass
class ResolvedModel:
    checkpoint: str | Path  # a checkpoint (URI) or a registered version's local copy
    version: str  # "NAME/3" for a registered version, else the checkpoint folder


def resolve_model(
    ref: str, tracking_uri: str | None = None, cache: str | Path | None = None
) -> ResolvedModel:
    """models:/NAME@alias, models:/NAME/3 (downloaded once into `cache`), runs:/RUN_ID (the run's latest
    checkpoint), a model folder, or a checkpoint folder / root. Names, aliases and versions are plain
    (they name the cache folder); what is found is checked before anything loads it (serving/trust.py)."""
    from serving.trust import check_checkpoint_folder, check_name, resolve_served_checkpoint

    if ref.startswith("models:/") or ref.startswith("runs:/"):
        from pipeline.train.tracking import mlflow_client
        from serving import registry

        if ref.startswith("runs:/"):
            run_id = check_name(ref[len("runs:/") :].strip("/"), f"{ref[:80]}: run id")
            ckpt = registry.run_checkpoint(mlflow_client(tracking_uri), run_id)
            return ResolvedModel(check_checkpoint_folder(ckpt), ref)
        spec = ref[len("models:/") :]
        alias: str | None = None
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = ""
        else:
            name, _, version = spec.partition("/")
        check_name(name, f"{ref[:80]}: model name")  # every part is checked before MLflow is asked
        if alias is not None:
            check_name(alias, f"{ref[:80]}: alias")
        elif not version.isascii() or not version.isdigit() or len(version) > 12:
            raise ValueError(f"{ref[:80]}: expected models:/NAME/VERSION (a number) or models:/NAME@ALIAS")
        client = mlflow_client(tracking_uri)
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        root = storage.join(os.fspath(cache or os.path.join("runs", "models")), name, f"v{version}")
        return ResolvedModel(registry.version_checkpoint(client, name, version, root), f"{name}/{version}")
    on_store = ref.partition("://")[0].lower() in STORES
    if ref.startswith(("models:", "runs:")) or ("://" in ref and not on_store):
        raise ValueError(
            f"{ref[:80]}: expected models:/..., runs:/..., a checkpoint on s3:// or a local folder"
        )
    if on_store:  # a checkpoint root, pointer or generation on an object store
        from pipeline.train.checkpoint import resolve_checkpoint

        generation = resolve_checkpoint(ref)  # checked where each actor stages it
        return ResolvedModel(generation, storage.display(generation))
    path = resolve_served_checkpoint(ref)
    return ResolvedModel(path, str(path))


def sequence_files(path: str | Path) -> tuple[list[str], int | None]:
    """(Parquet files as URIs, users if known) of a shard directory (its manifest; every shard name
    confined to it) or one sequence file; a path or a URI."""
    from pipeline.data.sequences import open_parquet, read_shard_manifest, shard_uris

    uri = os.fspath(path)
    if storage.is_file(uri):
        return [uri], open_parquet(uri).metadata.num_rows
    if not storage.exists(uri):
        raise FileNotFoundError(f"sequence file {storage.display(uri)} does not exist")
    if not storage.is_file(storage.join(uri, SHARD_MANIFEST)):
        raise FileNotFoundError(
            f"{storage.display(uri)}: no {SHARD_MANIFEST}; build it with `fuxi data build-sequences`"
        )
    manifest = read_shard_manifest(uri)
    users = sum(sum(rg[0] for rg in s["row_groups"]) for s in manifest["shards"])
    return shard_uris(uri, manifest), users


class Scorer:
    """Ray Data actor: loads the checkpoint once, then maps Arrow batches of sequence rows to top-k rows."""

    def __init__(
        self,
        checkpoint: str,
        k: int,
        version: str,
        use_index: bool = False,
        chunk: int | None = None,
        threads: int = 1,
        ef_search: int = 128,
    ) -> None:
        import torch

        from serving.item_index import DEFAULT_CHUNK, read_index
        from serving.loading import load_checkpoint_model

        torch.set_num_threads(threads)  # one actor per core: intra-op threads would oversubscribe
        self.loaded = load_checkpoint_model(checkpoint, device="cpu")
        self.items_VD = self.loaded.item_vectors()
        self.k, self.version, self.chunk = k, version, chunk or DEFAULT_CHUNK
        self.ef_search = ef_search
        self.index = None
        if use_index:
            found = read_index(self.loaded.path, self.items_VD)  # checked against the table
            if found is None:
                raise FileNotFoundError(f"{checkpoint}: no item index; build it with `fuxi index`")
            self.index = found[0]
        vocab = self.loaded.vocab
        self.item_type = pa.string() if vocab is not None and vocab.key_type == "string" else pa.int64()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from serving.item_index import exact_top_k, index_top_k, valid_slots

        num_items = self.loaded.cfg.model.num_items
        items = batch.column("item_ids").to_pylist()
        times = batch.column("timestamps").to_pylist()
        rows, stamps, ignored, keep = [], [], [], []
        for u, (h, t) in enumerate(zip(items, times)):
            known = [(int(i), int(s)) for i, s in zip(h, t) if 0 < i < num_items]
            ignored.append(len(h) - len(known))
            if known:
                keep.append(u)
                rows.append([i for i, _ in known])
                stamps.append([s for _, s in known])
        n = batch.num_rows
        out_ids: list[list[Any]] = [[] for _ in range(n)]
        out_scores: list[list[float]] = [[] for _ in range(n)]
        if keep:
            nows = [int(times[u][-1]) for u in keep]  # the request time: the user's last event
            user_BD = self.loaded.user_vectors(rows, stamps, nows)
            if self.index is not None:
                scores, top = index_top_k(self.index, user_BD, rows, self.k, self.ef_search)
            else:
                scores, top = exact_top_k(user_BD, self.items_VD, rows, self.k, self.chunk)
            for j, u in enumerate(keep):
                kept_s, kept_r = valid_slots(scores[j], top[j])  # no padding row, seen item or -inf
                out_ids[u] = self.loaded.raw_ids(kept_r)
                out_scores[u] = kept_s.astype(np.float32).tolist()
        return pa.table(
            {
                "user_id": batch.column("user_id"),
                "item_ids": pa.array(out_ids, pa.list_(self.item_type)),
                "scores": pa.array(out_scores, pa.list_(pa.float32())),
                "ignored": pa.array(ignored, pa.int64()),
                "model_version": pa.array([self.version] * n, pa.string()),
            }
        )


@dataclass
class RecommendReport:
    out: str  # a path or a URI
    users: int
    seconds: float
    workers: int
    model_version: str
    first_block_seconds: float = float("nan")  # until the first results arrived (actors loading the model)
    first_block_users: int = 0

    @property
    def steady_users_per_second(self) -> float:
        """The rate after the first results: without the actors' start (Ray workers, torch, the model)."""
        return (self.users - self.first_block_users) / max(self.seconds - self.first_block_seconds, 1e-9)

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"wrote {storage.display(self.out)}: {self.users:,} users in {self.seconds:.1f}s "
            f"({self.users_per_second:,.0f} users/s, {self.workers} workers), model {self.model_version}"
        )


def recommend(
    checkpoint: str | Path,
    sequences: str | Path,
    out: str | Path,
    k: int = 100,
    *,
    version: str | None = None,
    workers: int = 1,
    batch_size: int = 256,
    use_index: bool = False,
    chunk: int | None = None,
    ray_address: str | None = None,
    threads_per_worker: int = 1,
    progress: bool = True,
    progress_every: float = 10.0,
) -> RecommendReport:
    """Top-k of every user in `sequences` by the checkpoint's model, to the Parquet file `out`.

    Ray: joins `ray_address` when given, else starts a local instance with `workers + 1` CPUs (the actors
    and one read task) and shuts it down in the end, success or not."""
    import ray
    import ray.data

    from pipeline.data.stream import init_ray

    if not 1 <= k <= 100_000:
        raise ValueError(f"--k {k}: expected 1..100000")
    if not 1 <= workers <= 1024 or not 1 <= batch_size <= 1_000_000:
        raise ValueError(f"--workers {workers} / --batch-size {batch_size}: expected 1..1024 / 1..1000000")
    files, total = sequence_files(sequences)
    started = False
    if not ray.is_initialized():
        init_ray(ray_address, num_cpus=None if ray_address else workers + 1, log_to_driver=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver prints its own progress
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        fs, _ = storage.resolve(files[0])  # one data set: every shard on the same store
        paths = [storage.resolve(f)[1] for f in files]
        ds = ray.data.read_parquet(paths, columns=COLUMNS, filesystem=fs).map_batches(
            Scorer,
            fn_constructor_kwargs={
                "checkpoint": str(checkpoint),
                "k": k,
                "version": version or str(checkpoint),
                "use_index": use_index,
                "chunk": chunk,
                "threads": threads_per_worker,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=workers,  # an actor pool of this size
            num_cpus=1,
        )
        out = os.fspath(out)
        local = storage.is_local(out)
        target = storage.parse(out).path
        staging = tempfile.TemporaryDirectory(prefix="fuxi-recommend-")
        if local:  # a temporary file beside it, renamed over it
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = storage.join(storage.parent(target), f".{storage.name_of(target)}.tmp", field="--out")
        else:  # a local temporary file, uploaded whole at the end
            tmp = os.path.join(staging.name, "recommendations.parquet")
        start = last = time.perf_counter()
        done, first, first_n = 0, float("nan"), 0
        writer = None
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                assert isinstance(block, pa.Table)  # batch_format="pyarrow"
                if writer is None:
                    writer = pq.ParquetWriter(tmp, block.schema, compression="zstd")
                    first, first_n = time.perf_counter() - start, block.num_rows
                writer.write_table(block)
                done += block.num_rows
                now = time.perf_counter()
                if progress and now - last >= progress_every:
                    of = f"/{total:,}" if total else ""
                    rate = done / (now - start)
                    print(f"recommend: {done:,}{of} users, {rate:,.0f} users/s", file=sys.stderr, flush=True)
                    last = now
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"{storage.display(os.fspath(sequences))}: no users")
        if local:
            os.replace(tmp, target)
        else:
            storage.copy_file(tmp, out)  # one upload: the object appears whole when it completes
        staging.cleanup()
        seconds = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    return RecommendReport(out, done, seconds, workers, version or str(checkpoint), first, first_n)


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)
