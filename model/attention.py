"""The attention kernel interface: how FuXi-alpha's AMS layer and HSTU compute attention per length group.

A forward, in the order a reader meets it:
  1. `FuXiStack` / `HSTUStack` (model/fuxi.py, model/hstu.py) build one plan per length group of the batch
     with `kernel.plan(...)` and hand the list to every block (`run_jagged_blocks`, model/jagged.py).
  2. Each block projects the jagged tokens, pads them per group (`Group.gather`) and calls
     `kernel.ams(...)` (FuXi-alpha's channels) or `kernel.hstu(...)` (HSTU, and FuXi's vanilla ablation)
     with that group's plan.
  3. The kernel `ModelConfig.kernel` picks (`KERNELS`) computes it:
     "reference": padded einsums (model/attention_reference.py), the slow twin;
     "fast" (the default): causal row chunks with a hand-written backward (model/attention_fast.py).
     Both compute the same function (tests/unit/test_fast_paths.py); they differ in speed and in their plans.

At evaluation the final block computes only each row's last query (`last_token_attention`, either kernel).

Shapes: n rows of a group, L its width, H heads, C active channels, d per-head width, N = padded_length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention_fast import FastKernel
from model.attention_reference import ReferenceKernel
from model.layers import time_buckets

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.jagged import Group, LengthGroups

PlanKind = Literal["fuxi", "hstu"]  # the core a plan serves: AMS channels, or HSTU-style attention
PlanT = TypeVar("PlanT")


class AttentionKernel(Protocol[PlanT]):
    """One way to compute attention on a length group: a plan builder and two cores that read the plan.

    Inputs of both cores: q, k [n, L, H*dqk] and v [n, L, H*dv], the group's padded projections with v
    zero on padding (so no key-padding mask is needed); w_pos [2N-1] and w_ts [num_buckets+1], the
    relative position and time-gap scalars shared by heads; inv_n [n] or [1], the 1/n of SiLU(qk)/n
    (`inverse_n`); dtype, the compute dtype (`core_dtype`; None: v's), which the fast cores cast to and
    return v's dtype from (the reference einsums leave dtypes to autocast).
    """

    def plan(self, group: Group, cfg: ModelConfig, kind: PlanKind, with_time: bool) -> PlanT:
        """What every layer reuses for this group (masks, bucket indices), built once per batch.
        with_time=False: no temporal channel, so no time buckets (an HSTU plan always has them)."""
        ...

    def ams(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        w_pos: Tensor | None,
        w_ts: Tensor | None,
        inv_n: Tensor,
        plan: PlanT,
        channels: tuple[str, ...],
        heads: int,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """FuXi-alpha's channel outputs [n, L, H, C, dv], channels in `channels` order (of pos, ts, sem):
        pos: w_pos[(N-1) + j - i];  ts: w_ts[b(dt(i, j))];  sem: SiLU(q_h k_h^T) / n;  each causal, times v_h.
        `plan` was built with kind "fuxi"; w_pos / w_ts may be None when their channel is off."""
        ...

    def hstu(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        w_pos: Tensor,
        w_ts: Tensor,
        inv_n: Tensor,
        plan: PlanT,
        heads: int,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """SiLU(q_h k_h^T + w_pos[(N-1) + j - i] + w_ts[b(dt(i, j))]) / n, causal, times v_h: [n, L, H*dv],
        head-major. `plan` was built with kind "hstu"."""
        ...


# what `ModelConfig.kernel` selects
KERNELS: dict[str, AttentionKernel[Any]] = {"reference": ReferenceKernel(), "fast": FastKernel()}


def inverse_n(valid_BL: Tensor, padded_length: int, mode: str) -> Tensor:
    """1/n of SiLU(qk)/n as [B] or [1] (the official code divides by n)."""
    if mode == "padded":
        return torch.full((1,), 1.0 / padded_length, device=valid_BL.device)
    if mode == "length":
        return 1.0 / valid_BL.sum(1).clamp(min=1).to(torch.float32)
    raise ValueError(f"unknown attn_norm {mode!r}; expected 'padded' or 'length'")


# Jagged batches give the attention cores new shapes every step (each length group's rows and width).
# On CPU, bf16 matmuls go through oneDNN, which builds (and caches) a primitive per shape: ~0.3-0.6 ms for
# each new bmm shape. fp32 matmuls (MKL) have no per-shape cost. Under autocast a small group therefore
# runs its core faster in fp32 (8 rows x L~128, one layer fwd+bwd on new shapes: fp32 5.8 ms, bf16 9.8);
# around 32 rows the two break even (bf16/fp32 0.87x to 1.05x across runs; benchmarks/bench_kernels.py).
BF16_CORE_MIN_SLOTS = 2048  # padded slots (rows x L_g) from which a group's core keeps the autocast dtype


def core_dtype(group: Group) -> torch.dtype | None:
    """Compute dtype for a length group's attention core: on CPU fp32 for small groups, else the input's."""
    small = group.valid.numel() < BF16_CORE_MIN_SLOTS
    return torch.float32 if small and group.valid.device.type == "cpu" else None


# --------------------------------------------------------------------------------------------------
# evaluation: each row's last query only (both kernels)


def last_row_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_pos: Tensor | None,
    w_ts: Tensor | None,
    inv_n: Tensor,
    group: Group,
    channels: tuple[str, ...],
    heads: int,
    padded_length: int,
    time_delta: str,
    num_buckets: int,
    divisor: float,
    vanilla: bool = False,
) -> Tensor:
    """Attention output of each row's *last* history slot only (evaluation needs no other query in the
    final block): [n, H * C * dv], head-major, channels in `channels` order, as ams_channels; or, with
    vanilla=True, HSTU's SiLU(q k^T + w_pos + w_ts) / n attention, [n, H * dv], as hstu_attention.

    q, k, v: the group's padded [n, L, H*d] projections (v zero on padding). A row's keys j <= last are
    exactly its valid slots, so the causal mask is `group.valid`. O(L) per row instead of O(L^2).
    """
    n, length, _ = v.shape
    h = heads
    rows = torch.arange(n, device=v.device)
    last = group.valid.sum(1) - 1
    keys = torch.arange(length, device=v.device)
    kh, vh = k.reshape(n, length, h, -1), v.reshape(n, length, h, -1)
    mask = group.valid.to(v.dtype)  # [n, L]
    pos = ts_w = None
    if w_pos is not None:  # w[(N-1) + j - i] with i = last; j > last is masked
        pos = w_pos[(padded_length - 1) - (last[:, None] - keys[None, :]).clamp(min=0)].to(v.dtype)
    if w_ts is not None:
        t_query = group.ts[rows, last + 1] if time_delta == "next" else group.ts[rows, last]
        ts_w = w_ts[time_buckets(t_query[:, None] - group.ts[:, :length], num_buckets, divisor)].to(v.dtype)
    s = torch.einsum("nhd,nlhd->nhl", q[rows, last].reshape(n, h, -1), kh)
    scale = inv_n.to(v.dtype).view(-1, 1, 1)
    if vanilla:
        assert pos is not None and ts_w is not None, "the vanilla channel needs both tables"
        a = F.silu(s + pos[:, None] + ts_w[:, None]) * scale * mask[:, None]
        return torch.einsum("nhl,nlhd->nhd", a, vh).reshape(n, -1)
    outs = []
    for channel in channels:
        if channel == "sem":
            outs.append(torch.einsum("nhl,nlhd->nhd", F.silu(s) * scale * mask[:, None], vh))
        else:
            w = pos if channel == "pos" else ts_w
            assert w is not None, f"channel {channel!r} has no weight table"
            w = w * mask
            outs.append(torch.einsum("nl,nlhd->nhd", w, vh))
    return torch.stack(outs, dim=2).reshape(n, -1)  # [n, H, C, dv]


def last_token_attention(
    x_norm: Tensor,
    uvqk: Tensor,
    split: tuple[int, int, int, int],
    batch: LengthGroups,
    cfg: ModelConfig,
    w_pos: Tensor | None,
    w_ts: Tensor | None,
    channels: tuple[str, ...],
    vanilla: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The final block's attention at each row's last history token only (evaluation), for FuXi-alpha's AMS
    and HSTU alike: (u [B, split[0]], attention output [B, ...], those tokens' jagged indices [B]), rows in
    batch order. x_norm: the normalised block input of every token [T, D]; uvqk: the fused projection whose
    columns `split` = (u, v, q, k). k and v are projected for every token, u only for the last ones."""
    u_width = split[0]
    vqk = F.silu(x_norm @ uvqk[:, u_width:])
    outs = []
    for g in batch:
        v, q, k = torch.split(g.gather(vqk), list(split[1:]), dim=-1)  # zero on padding: no key mask
        inv_n = inverse_n(g.valid, cfg.padded_length, cfg.attn_norm)
        outs.append(
            last_row_attention(
                q,
                k,
                v,
                w_pos,
                w_ts,
                inv_n,
                g,
                channels,
                cfg.num_heads,
                cfg.padded_length,
                cfg.time_delta,
                cfg.num_time_buckets,
                cfg.time_bucket_divisor,
                vanilla=vanilla,
            )
        )
    last_tok, order = batch.last()
    u = F.silu(x_norm[last_tok] @ uvqk[:, :u_width])
    return u, torch.cat(outs)[order], last_tok
