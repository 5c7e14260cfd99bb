"""Sequence shards -> each rank's own stream of `Batch` (KeyedJaggedTensor): equal steps, bounded, resumable.

The only Ray Data streaming file. Two backends, picked by one enum, yield identical batches:
  ray      Ray Data: one read task per planned segment, streamed with backpressure and kept in plan order
           (`preserve_order`); the driver only cuts batches and collates (`pipeline.data.collate`).
  pyarrow  the reference: the same segments read in this process with pyarrow.

The plan of an epoch is pure numpy, computed identically by every rank from the manifest (no data read):
  units     one per (shard file, row group); the manifest records how many users of each row group have at
            least 2 + drop_last_items events (the rows that `collate_arrow` can use).
  windows   the epoch order of units (a permutation by (seed, epoch) when shuffling) cut into windows of
            `window_units` units; the eligible rows of a window are permuted by (seed, epoch, window).
  steps     N eligible rows, global batch B * W (W ranks): S = ceil(N / (B * W)) steps; a last global batch
            smaller than W rows is merged into the one before, so every row is used once per epoch and the
            last step's per-rank batches hold between 1 and B + 1 rows. Step s's global batch is split evenly
            over ranks (sizes differ by at most one). Every rank runs exactly S steps.
  ranks     rank r reads the contiguous range of the epoch order holding its rows (about 1/W of the data).
Position: (epoch, batches yielded in that epoch); `state_dict()` records it with the plan parameters and
`load_state_dict()` continues from it: the next batch is the first not yet yielded, so a resumed job neither
repeats nor skips a sequence. A different seed or data cannot continue and is an error; so is a different
world size or batch size mid-epoch (at an epoch boundary the next epoch is planned for the new ones). Memory:
Ray keeps a bounded number of segments in flight (`max_bytes_in_flight`); the driver holds at most one segment
plus one batch. The pyarrow backend reads `prefetch` segments ahead in background threads (so at most
prefetch + 1 segments are held), the Ray backend as many (`prefetch_batches`): on an object store a step then
waits on the network only when reading is slower than training (measured: docs/STORAGE.md, "Measured: S3
against local disk"). Training sets it with `data.stream_prefetch`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from pipeline.data.schema import SEQUENCE_SCHEMA
from pipeline.data.sequences import open_parquet, read_shard_manifest, shard_uris
from storage.errors import with_retries

if TYPE_CHECKING:  # torch is imported where batches are collated, not in Ray read workers
    from pipeline.data.collate import Batch

COLUMNS = [f.name for f in SEQUENCE_SCHEMA]
MANIFEST_MIN_LENGTHS = (2, 3, 4)  # `pipeline.data.build.MIN_LENGTHS`: counts stored per row group
PREFETCH_SEGMENTS = 2  # segments read ahead (pyarrow: background threads; ray: prefetch_batches)


class Backend(str, Enum):
    RAY = "ray"
    PYARROW = "pyarrow"


# ------------------------------------------------------------------------------------------------------------
# Ray runtime helpers


# Ray's switch for single-machine mode (its default on macOS and Windows): the node's address is loopback
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """`ray.init`: joins `address` (a cluster) when given, else starts a local Ray that listens on loopback
    only, with no dashboard.

    Ray's GCS, raylet, object manager and worker gRPC servers listen on every interface unless the node's
    address is loopback, and `ray.init(_node_ip_address="127.0.0.1")` is rewritten to the machine's
    address (`services.resolve_ip_for_localhost`). Ray's single-machine mode keeps loopback as the node's
    address; its switch is read when Ray is imported, so it is set for the processes Ray starts (the
    environment) and for this driver (the imported constant), then put back so a later `ray.init` of a
    cluster in this process is unaffected (the processes started keep what they were started with).
    """
    import ray

    if address and address != "local":
        ray.init(address=address, include_dashboard=False, **kwargs)
        return
    from ray._private import ray_constants

    saved = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", include_dashboard=False, **kwargs)
    finally:
        if saved[0] is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Start a local Ray instance (loopback only, `init_ray`) unless one is running (RAY_ADDRESS, when set,
    names a cluster to join)."""
    import ray

    if ray.is_initialized():
        return
    init_ray(os.environ.get("RAY_ADDRESS"), num_cpus=num_cpus, object_store_memory=object_store_memory)


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """A command's Ray lifetime: whatever Ray the block starts is shut down when it ends, also when the
    process is stopped with SIGTERM / SIGHUP / Ctrl-C (turned into SystemExit so this `finally` runs), so
    no raylet, GCS or worker outlives the driver."""
    import ray

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds to the `finally` below

    # A Python signal handler runs only when the main thread is back in the interpreter: one blocked in
    # Ray's C++ code (ray.init connecting, a shutdown) may never run it, or an executor may swallow the
    # SystemExit. The C-level handler still writes the signal's number to the wakeup fd, so a thread
    # reading it starts the watchdog: after a grace period it kills the Ray processes this driver started
    # and exits, so a stop always ends in bounded time.
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    stops = {int(signal.SIGTERM), int(signal.SIGHUP)}

    def watch() -> None:
        while data := reader.recv(64):
            signum = next((b for b in data if b in stops), None)
            if signum is not None:
                force_exit(128 + signum, STOP_GRACE_S)
                return

    threading.Thread(target=watch, name="ray-session-stop", daemon=True).start()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        if ray.is_initialized():
            ray.shutdown()
        writer.close()  # the watcher's recv returns b"" and it ends, unless a stop already armed it


STOP_GRACE_S = 20.0


def force_exit(code: int, grace_s: float = STOP_GRACE_S) -> None:
    """Kill this process's Ray children (raylet, GCS, workers) and exit, unless it exits first."""
    import psutil

    time.sleep(grace_s)
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)
    os._exit(code)


def quiet_context(ctx: Any) -> Any:
    """No Ray Data progress bars or per-run log lines (our callers print their own progress)."""
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    return ctx


# ------------------------------------------------------------------------------------------------------------
# units and the epoch plan (pure numpy)


@dataclass(frozen=True)
class Units:
    """The streaming units of a shard directory (or of one sequence file): one per (file, row group)."""

    files: tuple[str, ...]
    file: np.ndarray  # [U] index into files
    row_group: np.ndarray  # [U]
    rows: np.ndarray  # [U] users in the row group
    eligible: np.ndarray  # [U] users with >= 2 + drop_last_items events
    generation: int | None  # the manifest generation (None for a plain file)


def load_units(path: str | Path, drop_last_items: int) -> Units:
    """From the manifest of a shard directory (no data read); a plain sequence file is counted once. A
    local path or a URI (`s3://bucket/shards`)."""
    uri = os.fspath(path)
    need = 2 + drop_last_items
    if storage.is_file(uri):
        meta = open_parquet(uri).metadata
        rg = list(range(meta.num_row_groups))
        file = [0] * len(rg)
        rows = [meta.row_group(j).num_rows for j in rg]
        return Units(
            (uri,),
            np.asarray(file, np.int64),
            np.asarray(rg, np.int64),
            np.asarray(rows, np.int64),
            _count_eligible([uri], file, rg, need),
            None,
        )
    if not storage.exists(uri):
        raise FileNotFoundError(f"{storage.display(uri)}: no such sequence file or shard directory")
    try:
        manifest = read_shard_manifest(uri)
    except ValueError as e:
        raise FileNotFoundError(f"{e}; build it with `fuxi data build-sequences`") from None
    files = shard_uris(uri, manifest)
    file, rg, rows, elig = [], [], [], []
    for k, shard in enumerate(manifest["shards"]):
        for j, counts in enumerate(shard["row_groups"]):
            file.append(k)
            rg.append(j)
            rows.append(counts[0])
            elig.append(counts[1 + MANIFEST_MIN_LENGTHS.index(need)] if need in MANIFEST_MIN_LENGTHS else -1)
    elig_arr = np.asarray(elig, dtype=np.int64)
    if (elig_arr < 0).any():  # drop_last beyond what the manifest counts: count once
        elig_arr = _count_eligible(files, file, rg, need)
    return Units(
        tuple(files),
        np.asarray(file, np.int64),
        np.asarray(rg, np.int64),
        np.asarray(rows, np.int64),
        elig_arr,
        int(manifest["generation"]),
    )


def _count_eligible(files, file, rg, need: int) -> np.ndarray:
    out, opened = [], {}
    for f, g in zip(file, rg):
        if f not in opened:
            opened[f] = open_parquet(files[f])
        lengths = pc.list_value_length(opened[f].read_row_group(g, columns=["item_ids"])["item_ids"])
        out.append(int(pc.sum(pc.greater_equal(lengths, need)).as_py() or 0))
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class EpochPlan:
    windows: list[np.ndarray]  # unit ids of each window, in epoch order
    window_rows: np.ndarray  # eligible rows per window
    batch_sizes: np.ndarray  # [S, W] rows of each rank's batch at each step
    rank_start: np.ndarray  # [W + 1] first epoch-order row of each rank


def step_sizes(n_rows: int, batch_size: int, world_size: int) -> np.ndarray:
    """[S, W] per-rank batch sizes: every row once, equal step counts, global batches split evenly."""
    if n_rows < world_size:
        raise ValueError(f"{n_rows} eligible sequences cannot give each of {world_size} ranks a batch")
    step = batch_size * world_size
    steps = math.ceil(n_rows / step)
    if steps > 1 and n_rows - (steps - 1) * step < world_size:
        steps -= 1  # a tail smaller than one row per rank joins the previous global batch
    globals_ = np.full(steps, step, dtype=np.int64)
    globals_[-1] = n_rows - (steps - 1) * step
    ranks = np.arange(world_size)
    return globals_[:, None] // world_size + (ranks[None, :] < (globals_ % world_size)[:, None])


def plan_epoch(
    units: Units, epoch: int, seed: int, shuffle: bool, window_units: int, batch_size: int, world_size: int
) -> EpochPlan:
    order = np.arange(len(units.file))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(order))
    order = order[units.eligible[order] > 0]
    windows = [order[i : i + window_units] for i in range(0, len(order), window_units)]
    window_rows = np.asarray([units.eligible[w].sum() for w in windows], dtype=np.int64)
    sizes = step_sizes(int(window_rows.sum()), batch_size, world_size)
    return EpochPlan(windows, window_rows, sizes, np.r_[0, np.cumsum(sizes.sum(0))])


def segments(plan: EpochPlan, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(window, start, stop) pieces of epoch-order rows [lo, hi), in order."""
    bounds = np.r_[0, np.cumsum(plan.window_rows)]
    out = []
    w = int(np.searchsorted(bounds, lo, side="right")) - 1
    while lo < hi:
        stop = min(hi, int(bounds[w + 1]))
        out.append((w, lo - int(bounds[w]), stop - int(bounds[w])))
        lo, w = stop, w + 1
    return out


def read_segment(spec: dict) -> pa.Table:
    """The rows [start, stop) of one window in epoch order (the function both backends run). Shards are
    paths or URIs: a Ray worker reads an object store directly (its AWS_* environment is the driver's)."""
    opened: dict[str, pq.ParquetFile] = {}
    tables = []
    for f, g in spec["units"]:
        shown = storage.display(f)  # a store's error: retried while transient, then one line `<uri>: <cause>`
        if f not in opened:
            opened[f] = with_retries(shown, partial(open_parquet, f))
        tables.append(with_retries(shown, partial(opened[f].read_row_group, g, columns=COLUMNS)))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    lengths = pc.list_value_length(table["item_ids"]).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(lengths >= spec["min_length"])
    if len(rows) != spec["expect"]:
        raise RuntimeError(
            f"{spec['units']}: {len(rows)} eligible rows, the manifest says {spec['expect']}: "
            "the shards changed after the stream was planned"
        )
    if spec["perm_seed"] is not None:
        rows = rows[np.random.default_rng(spec["perm_seed"]).permutation(len(rows))]
    return table.take(pa.array(rows[spec["start"] : spec["stop"]])).combine_chunks()


def cut_batches(tables: Iterable[pa.Table], sizes: np.ndarray) -> Iterator[pa.Table]:
    """Re-cut an ordered stream of tables into consecutive batches of the given sizes."""
    buf, have, k = [], 0, 0
    for t in tables:
        if t.num_rows:
            buf.append(t)
            have += t.num_rows
        while k < len(sizes) and have >= sizes[k]:
            joined = pa.concat_tables(buf) if len(buf) > 1 else buf[0]
            n = int(sizes[k])
            rest = joined.slice(n)
            buf, have, k = ([rest] if rest.num_rows else []), have - n, k + 1
            yield joined.slice(0, n)
    if k != len(sizes) or have:
        raise RuntimeError(f"stream ended after {k} of {len(sizes)} batches with {have} rows left over")


# ------------------------------------------------------------------------------------------------------------
# the stream


class ShardBatches:
    """One rank's batches over a shard directory.

    The API of `pipeline.data.batches.SequenceBatches` plus a position.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        max_sequence_length: int,
        drop_last_items: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        backend: Backend | str = Backend.RAY,
        window_units: int = 4,
        max_bytes_in_flight: int | None = 512 << 20,
        prefetch: int = PREFETCH_SEGMENTS,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 segments, got {prefetch}")
        self.path = os.fspath(path)  # a local path or a URI
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        self.drop_last_items = drop_last_items
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.backend = Backend(backend)
        self.window_units = window_units
        self.max_bytes_in_flight = max_bytes_in_flight
        self.prefetch = prefetch
        self.units = load_units(self.path, drop_last_items)
        self.skipped_users = int(self.units.rows.sum() - self.units.eligible.sum())
        self._steps = len(step_sizes(self.num_rows(), batch_size, world_size))
        self._epoch, self._batch = 0, 0

    def __len__(self) -> int:
        return self._steps

    def num_rows(self) -> int:
        return int(self.units.eligible.sum())

    # -- position -------------------------------------------------------------------------------------------
    def _plan_key(self) -> dict[str, Any]:
        return {
            "rows": self.num_rows(),
            "generation": self.units.generation,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "window_units": self.window_units,
            "drop_last_items": self.drop_last_items,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batch": self._batch, **self._plan_key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        key = self._plan_key()
        if not int(
            state["batch"]
        ):  # an epoch boundary: the next epoch is planned for this batch and world size
            key.pop("batch_size"), key.pop("world_size")
        diff = {k: (state.get(k), v) for k, v in key.items() if state.get(k) != v}
        if diff:
            raise ValueError(
                f"cannot resume this stream exactly: the recorded plan differs in {diff} "
                "(recorded, now); resume with the same data, seed, batch size and world size"
            )
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    # -- iteration ------------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.units, epoch, self.seed, self.shuffle, self.window_units, self.batch_size, self.world_size
        )

    def segment_specs(self, epoch: int, start_batch: int = 0) -> tuple[list[dict], np.ndarray]:
        """This rank's read specs from batch `start_batch` on, and the sizes of its remaining batches."""
        plan = self.plan(epoch)
        sizes = plan.batch_sizes[:, self.rank]
        lo = int(plan.rank_start[self.rank] + sizes[:start_batch].sum())
        hi = int(plan.rank_start[self.rank + 1])
        specs = []
        for w, start, stop in segments(plan, lo, hi):
            ids = plan.windows[w]
            specs.append(
                {
                    "units": [
                        [self.units.files[self.units.file[u]], int(self.units.row_group[u])] for u in ids
                    ],
                    "min_length": 2 + self.drop_last_items,
                    "expect": int(plan.window_rows[w]),
                    "perm_seed": [self.seed, epoch, w] if self.shuffle else None,
                    "start": start,
                    "stop": stop,
                }
            )
        return specs, sizes[start_batch:]

    def epoch(self, epoch: int = 0, start_batch: int | None = None) -> Iterator[Batch]:
        """Batches of `epoch`; by default from the recorded position when it is in this epoch."""
        from pipeline.data.collate import collate_arrow

        if start_batch is None:
            start_batch = self._batch if self._epoch == epoch else 0
        specs, sizes = self.segment_specs(epoch, start_batch)
        if self.backend is Backend.RAY:
            tables = self._read_ray(specs)
        else:
            tables = prefetched(read_segment, specs, self.prefetch)
        for k, rows in enumerate(cut_batches(tables, sizes), start=start_batch + 1):
            self._epoch, self._batch = (epoch + 1, 0) if k == self._steps else (epoch, k)
            yield collate_arrow(rows, self.max_sequence_length, self.drop_last_items)

    def _read_ray(self, specs: list[dict]) -> Iterable[pa.Table]:
        import ray.data

        if not specs:
            return iter(())
        ensure_ray()
        ds = ray.data.from_items([{"spec": json.dumps(s)} for s in specs], override_num_blocks=len(specs))
        ds = ds.map_batches(_read_batch, batch_size=1, batch_format="pyarrow")
        ctx = quiet_context(ds.context)
        ctx.execution_options.preserve_order = True  # the plan's order is the contract
        if self.max_bytes_in_flight is not None:
            limits = ctx.execution_options.resource_limits
            ctx.execution_options.resource_limits = limits.copy(object_store_memory=self.max_bytes_in_flight)
        # batch_format="pyarrow": every batch is a pa.Table (Ray types it as any DataBatch)
        # one block per segment (map_batches above), so prefetch_batches counts segments, as `prefetch` does
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch)
        return cast("Iterable[pa.Table]", batches)


def prefetched(read: Callable[[dict], pa.Table], specs: list[dict], depth: int = 1) -> Iterator[pa.Table]:
    """`read(spec)` for each spec, yielded in order, with up to `depth` later specs read ahead in background
    threads (as many threads: an object store's reads are latency-bound and overlap well) while the caller
    uses the current one. A step waits on storage only when reading is slower than training on what is
    already read. At most depth + 1 segments are held; depth 0 reads each in the caller's thread. An error
    of a background read is raised by the `next()` that would have yielded its segment; reads not started
    when the caller stops are cancelled."""
    if depth == 0:
        yield from map(read, specs)
        return
    if not specs:
        return
    pool = concurrent.futures.ThreadPoolExecutor(min(depth, len(specs)), thread_name_prefix="shard-prefetch")
    try:
        ahead = collections.deque(pool.submit(read, spec) for spec in specs[:depth])
        for spec in specs[depth:]:
            table = ahead.popleft().result()
            ahead.append(pool.submit(read, spec))
            yield table
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_batch(spec_rows: pa.Table) -> pa.Table:
    return pa.concat_tables([read_segment(json.loads(s)) for s in spec_rows["spec"].to_pylist()])


def reference_batches(path: str | Path, **kwargs: Any) -> ShardBatches:
    """The pyarrow reference stream of the same shards (same plan, no Ray)."""
    return ShardBatches(path, backend=Backend.PYARROW, **kwargs)
