"""Jagged <-> padded conversions in plain PyTorch (differentiable, any device).

A jagged tensor is `values_TX` (T = sum of lengths) plus `lengths_B`; its padded form is [B, W, X] with
rows right-padded by zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_offsets(lengths_B: Tensor) -> Tensor:
    offsets = torch.zeros(lengths_B.numel() + 1, dtype=torch.long, device=lengths_B.device)
    offsets[1:] = torch.cumsum(lengths_B.long(), 0)
    return offsets


def _row_col(lengths_B: Tensor) -> tuple[Tensor, Tensor]:
    lengths_B = lengths_B.long()
    rows = torch.repeat_interleave(torch.arange(lengths_B.numel(), device=lengths_B.device), lengths_B)
    starts = lengths_to_offsets(lengths_B)[:-1]
    cols = torch.arange(rows.numel(), device=lengths_B.device) - starts[rows]
    return rows, cols


def jagged_to_padded(values_TX: Tensor, lengths_B: Tensor, width: int) -> Tensor:
    """[T, X] -> [B, width, X]; rows longer than width are an error."""
    rows, cols = _row_col(lengths_B)
    out = values_TX.new_zeros((lengths_B.numel(), width) + tuple(values_TX.shape[1:]))
    out[rows, cols] = values_TX
    return out


def padded_to_jagged(padded_BWX: Tensor, lengths_B: Tensor) -> Tensor:
    rows, cols = _row_col(lengths_B)
    return padded_BWX[rows, cols]
