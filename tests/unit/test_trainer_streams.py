"""The trainer's per-step random streams (pipeline/train/trainer.py): pure functions of (seed, step, rank)."""

from __future__ import annotations

import torch

from pipeline.train.trainer import NEGATIVES_STREAM, step_seed


def test_dropout_and_negative_streams_are_independent():
    """step_seed gives each (seed, step, rank) two different streams: seeded alike, the dropout generator
    and the negatives generator would draw the same numbers."""
    assert step_seed(3, 7, 0) == step_seed(3, 7, 0)  # a pure function: resuming needs no generator state
    assert step_seed(3, 7, 0) != step_seed(3, 7, 0, NEGATIVES_STREAM)
    assert len({step_seed(3, k, r) for k in range(50) for r in range(4)}) == 200
    a = torch.Generator().manual_seed(step_seed(3, 7, 0))
    b = torch.Generator().manual_seed(step_seed(3, 7, 0, NEGATIVES_STREAM))
    assert not torch.equal(
        torch.randint(1 << 30, (64,), generator=a), torch.randint(1 << 30, (64,), generator=b)
    )
