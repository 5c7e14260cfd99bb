"""kernel="reference": the attention cores as padded einsums, the slow twins of model/attention_fast.py.

Every [n, H, L, L] score, weight and mask tensor is materialised and autograd stores them. Tested against
the official indexing and a per-(i, j) loop (tests/unit/test_model.py); the fast core is tested against this.

Shapes: n rows of a group, L its width, H heads, C active channels, d per-head width, N = padded_length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from model.layers import time_buckets, time_deltas

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.jagged import Group


@dataclass
class ReferencePlan:
    """kernel="reference": per-group tensors every layer reuses, each [n, L, L] (or [L, L])."""

    mask: Tensor  # float [n, L, L]: key j visible to query i iff j <= i and j is a real item
    buckets: Tensor | None  # int64 [n, L, L]: time-gap bucket of every (query, key) pair
    pos_index: Tensor  # int64 [L, L]: (N-1) + (j - i), into the 2N-1 relative-position table


@torch.no_grad()
def reference_plan(group: Group, cfg: ModelConfig, kind: str, with_time: bool) -> ReferencePlan:
    valid = group.valid
    length = valid.shape[1]
    tril = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    mask = (tril[None] & valid[:, None, :]).to(torch.float32)
    buckets = None
    if with_time or kind == "hstu":
        dt = time_deltas(group.ts, length, cfg.time_delta)
        buckets = time_buckets(dt, cfg.num_time_buckets, cfg.time_bucket_divisor)
    idx = torch.arange(length, device=valid.device)
    pos_index = (cfg.padded_length - 1) + (idx[None, :] - idx[:, None])
    return ReferencePlan(mask, buckets, pos_index)


def ams_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_pos: Tensor | None,
    w_ts: Tensor | None,
    inv_n: Tensor,
    plan: ReferencePlan,
    channels: tuple[str, ...],
    heads: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """FuXi-alpha's channel outputs [n, L, H, C, dv] as einsums (`ams_channels`' slow twin):
    pos: w_pos[(N-1) + j - i] * causal;  ts: w_ts[b(dt(i, j))] * causal;  sem: SiLU(q_h k_h^T) / n * causal.
    `dtype` is accepted for the kernel interface; autocast alone decides the einsums' dtype here."""
    n, length, hdv = v.shape
    h = heads
    v_h = v.view(n, length, h, hdv // h)
    outs = []
    for channel in channels:
        if channel == "pos":
            assert w_pos is not None
            a = w_pos[plan.pos_index][None] * plan.mask
            outs.append(torch.einsum("bij,bjhd->bihd", a, v_h))
        elif channel == "ts":
            assert w_ts is not None and plan.buckets is not None
            a = w_ts[plan.buckets] * plan.mask
            outs.append(torch.einsum("bij,bjhd->bihd", a, v_h))
        else:
            s = torch.einsum("bihd,bjhd->bhij", q.view(n, length, h, -1), k.view(n, length, h, -1))
            a = F.silu(s) * inv_n.view(-1, 1, 1, 1) * plan.mask[:, None]
            outs.append(torch.einsum("bhij,bjhd->bihd", a, v_h))
    return torch.stack(outs, dim=3)


def hstu_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_pos: Tensor,
    w_ts: Tensor,
    inv_n: Tensor,
    plan: ReferencePlan,
    heads: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """SiLU(q_h k_h^T + w_pos + w_ts) / n * causal, times v_h: [n, L, H*dv] (`hstu_attention`'s slow twin)."""
    n, length, hdv = v.shape
    h = heads
    s = torch.einsum("bihd,bjhd->bhij", q.view(n, length, h, -1), k.view(n, length, h, -1))
    assert plan.buckets is not None
    s = s + w_pos[plan.pos_index] + w_ts[plan.buckets][:, None]
    a = F.silu(s) * inv_n.view(-1, 1, 1, 1) * plan.mask[:, None]
    return torch.einsum("bhij,bjhd->bihd", a, v.view(n, length, h, hdv // h)).reshape(n, length, hdv)


class ReferenceKernel:
    """kernel="reference" as a `model.attention.AttentionKernel`."""

    plan = staticmethod(reference_plan)
    ams = staticmethod(ams_reference)
    hstu = staticmethod(hstu_reference)
