"""Streaming shards to training: equal steps per rank, exact coverage, exact resume, Ray == pyarrow reference.

One local Ray instance for the module; the shards come from small synthetic logs built with tiny row groups,
so an epoch spans many units, windows and rank boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data.build import BuildConfig
from pipeline.data.collate import Batch, collate_arrow
from pipeline.data.sequences import read_sequences
from pipeline.data.stream import Backend, ShardBatches, step_sizes
from pipeline.data.synth_logs import LogConfig
from pipeline.train.checkpoint import Checkpointer
from tests.helpers.shards import build_shards

MAX_LEN = 12
BATCH = 16


pytestmark = pytest.mark.usefixtures("ray_local")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    cfg = LogConfig(
        num_users=700,
        num_items=2000,
        num_days=2,
        num_events=14_000,
        seed=2,
        num_themes=10,
        activity_sigma=1.5,
    )  # many users with 1-3 events: eligibility depends on drop_last
    return build_shards(root, cfg, BuildConfig(max_length=40, num_partitions=3, row_group_rows=24))


def stream(shards: Path, **kw) -> ShardBatches:
    args = dict(
        batch_size=BATCH, max_sequence_length=MAX_LEN, drop_last_items=1, shuffle=True, seed=7, window_units=2
    )
    return ShardBatches(shards, **{**args, **kw})


def same(a: Batch, b: Batch) -> bool:
    return (
        torch.equal(a.user_ids, b.user_ids)
        and torch.equal(a.seq.values(), b.seq.values())
        and torch.equal(a.seq.lengths(), b.seq.lengths())
    )


def test_step_sizes_split_every_row_evenly():
    assert step_sizes(11, 2, 2).tolist() == [[2, 2], [2, 2], [2, 1]]
    assert step_sizes(10, 3, 3).tolist() == [[4, 3, 3]]  # a 1-row tail joins the previous global batch
    assert step_sizes(19, 3, 3).tolist() == [[3, 3, 3], [4, 3, 3]]
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        step_sizes(3, 8, 4)


@pytest.mark.parametrize("drop_last", [0, 2])
def test_ranks_get_equal_steps_and_together_every_sequence_once(shards, drop_last):
    data = read_sequences(shards)
    eligible = set(data.table["user_id"].to_numpy()[data.lengths() >= 2 + drop_last].tolist())
    assert 0 < len(eligible) < data.num_users  # some users are too short for this split
    for world in (1, 2, 3):
        for epoch in (0, 1):
            ranks = [
                list(
                    stream(
                        shards, drop_last_items=drop_last, rank=r, world_size=world, backend=Backend.PYARROW
                    ).epoch(epoch)
                )
                for r in range(world)
            ]
            steps = {len(b) for b in ranks}
            assert steps == {len(stream(shards, drop_last_items=drop_last, world_size=world))}
            users = [u for batches in ranks for b in batches for u in b.user_ids.tolist()]
            assert len(users) == len(eligible) and set(users) == eligible
            assert max(b.size for batches in ranks for b in batches) <= BATCH + 1


def test_batches_hold_the_same_windows_as_the_in_memory_rows(shards):
    data = read_sequences(shards)
    row_of = {u: k for k, u in enumerate(data.table["user_id"].to_pylist())}
    for batch in stream(shards, drop_last_items=2, backend=Backend.PYARROW).epoch(0):
        rows = data.table.take(pa.array([row_of[u] for u in batch.user_ids.tolist()]))
        assert same(batch, collate_arrow(rows, MAX_LEN, 2))


def test_ray_stream_equals_the_pyarrow_reference(shards):
    for world in (1, 2):
        for rank in range(world):
            for epoch in (0, 1):
                ray_batches = list(
                    stream(shards, rank=rank, world_size=world, backend=Backend.RAY).epoch(epoch)
                )
                ref = list(stream(shards, rank=rank, world_size=world, backend=Backend.PYARROW).epoch(epoch))
                assert len(ray_batches) == len(ref) > 3
                assert all(same(a, b) for a, b in zip(ray_batches, ref))
    order = [b.user_ids[0].item() for b in stream(shards, backend=Backend.PYARROW).epoch(0)]
    assert order != [b.user_ids[0].item() for b in stream(shards, backend=Backend.PYARROW).epoch(1)]
    no_shuffle = [b.user_ids for b in stream(shards, shuffle=False, backend=Backend.PYARROW).epoch(0)]
    assert (np.diff(torch.cat(no_shuffle).numpy()) != 0).all()


@pytest.mark.parametrize("stop_after", [5, "epoch_end"])
def test_resume_from_a_checkpointed_position_continues_exactly(shards, tmp_path, stop_after):
    world = 2
    full = {
        r: [b for e in (0, 1) for b in stream(shards, rank=r, world_size=world, backend="pyarrow").epoch(e)]
        for r in range(world)
    }
    steps = len(stream(shards, world_size=world))
    k = steps if stop_after == "epoch_end" else stop_after
    for rank in range(world):
        first = stream(shards, rank=rank, world_size=world, backend=Backend.RAY)
        it = first.epoch(0)
        seen = [next(it) for _ in range(k)]  # the trainer stepped on k batches, then checkpointed
        ckpt = Checkpointer(tmp_path / f"rank{rank}")
        ckpt.save(k, {"data": first.state_dict()})
        del it

        resumed = stream(shards, rank=rank, world_size=world, backend=Backend.RAY)
        state = {"data": resumed.state_dict()}
        ckpt.load(state)
        resumed.load_state_dict(state["data"])
        epoch = state["data"]["epoch"]
        assert (epoch, state["data"]["batch"]) == ((1, 0) if k == steps else (0, k))
        rest = [b for e in range(epoch, 2) for b in resumed.epoch(e)]
        assert len(seen) + len(rest) == len(full[rank])
        assert all(same(a, b) for a, b in zip(seen + rest, full[rank]))


def test_resume_refuses_a_different_plan(shards):
    first = stream(shards, world_size=2, backend=Backend.PYARROW)
    next(iter(first.epoch(0)))
    state = first.state_dict()  # mid-epoch: batch 1 of epoch 0
    with pytest.raises(ValueError, match="world_size"):
        stream(shards, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        stream(shards, world_size=2, batch_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        stream(shards, world_size=2, seed=8).load_state_dict(state)
    # at an epoch boundary the next epoch is planned for the new world size; other data is still refused
    boundary = {**state, "epoch": 1, "batch": 0}
    stream(shards, world_size=3).load_state_dict(boundary)
    with pytest.raises(ValueError, match="seed"):
        stream(shards, world_size=3, seed=8).load_state_dict(boundary)
