"""`ShardBatches`' read-ahead (pyarrow backend) on local disk and on S3 (SeaweedFS, conftest.py): any prefetch
depth yields exactly the batches of reading each segment in turn, in the same order, and a read that fails in
a background thread surfaces, at the batch that needed it, as the storage layer's one line `<uri>: <cause>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import storage
from pipeline.data.build import BuildConfig
from pipeline.data.collate import Batch
from pipeline.data.stream import Backend, ShardBatches
from pipeline.data.synth_logs import LogConfig
from tests.helpers.shards import build_shards

ARGS = dict(batch_size=16, max_sequence_length=12, drop_last_items=1, seed=3, backend=Backend.PYARROW)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """Two shards of many small row groups: an epoch is many segments, so several are read ahead."""
    root = tmp_path_factory.mktemp("prefetch")
    logs = LogConfig(num_users=400, num_items=600, num_days=2, num_events=6000, seed=5, num_themes=5)
    return build_shards(root, logs, BuildConfig(max_length=30, num_partitions=2, row_group_rows=20))


def shards_at(root_uri: str, local_shards: Path) -> str:
    uri = storage.join(root_uri, "seq")
    storage.copy_tree(str(local_shards), uri)
    return uri


def same(a: Batch, b: Batch) -> bool:
    return (
        torch.equal(a.user_ids, b.user_ids)
        and torch.equal(a.seq.values(), b.seq.values())
        and torch.equal(a.seq.lengths(), b.seq.lengths())
    )


def test_every_prefetch_depth_yields_the_batches_read_in_turn(root_uri: str, local_shards: Path) -> None:
    uri = shards_at(root_uri, local_shards)
    plain = ShardBatches(uri, window_units=1, prefetch=0, **ARGS)
    assert len(plain.segment_specs(0)[0]) > 8  # enough segments to keep several reads in flight
    reference = {e: list(plain.epoch(e)) for e in (0, 1)}
    resumed_reference = list(plain.epoch(1, start_batch=5))
    assert len(reference[0]) == len(plain) > 10
    assert not all(same(a, b) for a, b in zip(reference[0], reference[1]))  # epochs are shuffled apart
    for depth in (1, 2, 5, 1000):
        stream = ShardBatches(uri, window_units=1, prefetch=depth, **ARGS)
        for e in (0, 1):
            batches = list(stream.epoch(e))
            assert len(batches) == len(reference[e])
            assert all(same(a, b) for a, b in zip(batches, reference[e])), (depth, e)
        resumed = list(stream.epoch(1, start_batch=5))
        assert len(resumed) == len(resumed_reference)
        assert all(same(a, b) for a, b in zip(resumed, resumed_reference)), depth


def test_a_failed_background_read_surfaces_as_one_storage_line(root_uri: str, local_shards: Path) -> None:
    uri = shards_at(root_uri, local_shards)
    stream = ShardBatches(uri, window_units=1, shuffle=False, prefetch=3, **ARGS)  # planned: shards in order
    first, last = stream.units.files[0], stream.units.files[-1]
    assert first != last
    storage.delete(last)  # gone after the plan: the reads of its row groups fail in the prefetch threads

    # the batches made only of the first shard's rows are yielded; the next `next()` raises the read's error
    rows_before = int(stream.units.eligible[stream.units.file == 0].sum())
    ends = np.cumsum(stream.plan(0).batch_sizes[:, 0])
    expected = int((ends <= rows_before).sum())
    assert 0 < expected < len(stream)
    yielded = 0
    with pytest.raises(storage.StorageError) as info:
        for _ in stream.epoch(0):
            yielded += 1
    assert yielded == expected
    assert str(info.value) == f"{storage.display(last)}: not found"
    assert "\n" not in str(info.value)


def test_a_negative_prefetch_is_refused(local_shards: Path) -> None:
    with pytest.raises(ValueError, match="prefetch must be >= 0 segments, got -1"):
        ShardBatches(local_shards, prefetch=-1, **ARGS)
