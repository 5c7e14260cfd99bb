"""`data.stream_prefetch`: the config field reaches the training stream (`ShardBatches.prefetch`, on both
backends), changes nothing about the batches, and a value below 0 is refused in one line naming the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.cli import main
from pipeline.data.build import BuildConfig
from pipeline.data.stream import PREFETCH_SEGMENTS, ShardBatches
from pipeline.data.synth_logs import LogConfig
from pipeline.train.config import TrainConfig, validate
from pipeline.train.presets import tiny
from pipeline.train.run import build_batches, load_data
from tests.helpers.shards import build_shards

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefetch-config")
    logs = LogConfig(num_users=120, num_items=150, num_days=2, num_events=2400, seed=7, num_themes=3)
    return build_shards(root, logs, BuildConfig(max_length=30, num_partitions=2, row_group_rows=16))


def train_stream(shards: Path, backend: str, prefetch: int | None) -> ShardBatches:
    cfg = tiny()
    cfg.data.source = str(shards)
    cfg.data.stream, cfg.data.stream_backend = True, backend
    cfg.batch_size = 16
    if prefetch is not None:
        cfg.data.stream_prefetch = prefetch
    validate(cfg)
    stream = build_batches(cfg, load_data(cfg))["train"]
    assert isinstance(stream, ShardBatches)
    return stream


def test_default_is_the_streams_own() -> None:
    assert TrainConfig().data.stream_prefetch == PREFETCH_SEGMENTS


@pytest.mark.parametrize("backend", ["pyarrow", "ray"])
def test_stream_prefetch_reaches_shard_batches(shards: Path, backend: str) -> None:
    assert train_stream(shards, backend, None).prefetch == PREFETCH_SEGMENTS
    streams = {p: train_stream(shards, backend, p) for p in (0, 5)}
    assert {p: s.prefetch for p, s in streams.items()} == {0: 0, 5: 5}
    # reading ahead or not, the same batches in the same order (0 is accepted by both backends)
    epochs = {p: [b.user_ids for b in s.epoch(0)] for p, s in streams.items()}
    assert len(epochs[0]) == len(streams[0]) > 3
    assert all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[5], strict=True))


@pytest.mark.parametrize("value", ["-1", "two"])
def test_invalid_stream_prefetch_is_one_line_naming_the_field(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train",
        "--preset",
        "tiny",
        "--set",
        "tracking.enabled=false",
        "--set",
        f"data.stream_prefetch={value}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuxi: error: data.stream_prefetch"), err
    expected = (
        "data.stream_prefetch must be >= 0 (got -1)"
        if value == "-1"
        else "data.stream_prefetch: cannot use 'two'"
    )
    assert expected in err[0], err[0]
