"""Shared test helpers: tiny configs, hand-made jagged batches, a local Ray per test module."""

from __future__ import annotations

import os

import pytest
import torch
from torchrec import KeyedJaggedTensor

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_seq(items: list[list[int]], times: list[list[int]]) -> KeyedJaggedTensor:
    """KJT (item_id, timestamp) from python lists; each row = history + target."""
    lengths = torch.tensor([len(r) for r in items] * 2, dtype=torch.int32)
    values = torch.tensor([v for r in items for v in r] + [t for r in times for t in r], dtype=torch.long)
    return KeyedJaggedTensor.from_lengths_sync(["item_id", "timestamp"], values, lengths)


def padded_as_jagged(
    x_BLD, valid_BL, ts_BL1, cfg, kind: str = "fuxi", kernel: str | None = None, max_groups: int = 1
):
    """A padded layer input as what every layer takes: the real tokens x_TD (row-major), their length
    groups, and each group's attention plan built by `kernel` (default cfg.kernel). With max_groups=1 the
    one group is as wide as the padded input."""
    from model.attention import KERNELS
    from model.jagged import length_groups

    hist = valid_BL.sum(1)
    ts_T = torch.cat([ts_BL1[b, : int(hist[b]) + 1] for b in range(len(hist))])
    width = x_BLD.shape[1] if max_groups == 1 else 0
    batch = length_groups(hist, ts_T, max_groups, min_width=width)
    plans = [KERNELS[kernel or cfg.kernel].plan(g, cfg, kind, True) for g in batch]
    return x_BLD[valid_BL], batch, plans


def random_rows(
    n_users: int, num_items: int, max_len: int, seed: int = 0
) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    items, times = [], []
    for _ in range(n_users):
        n = int(torch.randint(2, max_len + 1, (1,), generator=g))
        items.append(torch.randint(1, num_items, (n,), generator=g).tolist())
        gaps = torch.randint(1, 10**6, (n,), generator=g)
        times.append((1_600_000_000 + torch.cumsum(gaps, 0)).tolist())
    return items, times


@pytest.fixture
def seq_factory():
    return make_seq


@pytest.fixture(scope="module")
def ray_local():
    """Ray in local mode for one test module (modules opt in with pytest.mark.usefixtures("ray_local"))."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def deterministic():
    """Bit-reproducible CPU training for one test. With more than one thread an accumulating index_put_
    (the backward of gathering the time-bucket weights, model/attention.py) adds with float atomics in
    thread order, so two identical runs differ in the last bits from the first steps on; deterministic
    mode makes it add serially."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
