"""FuXi-alpha (arXiv 2502.03036): Adaptive Multi-channel Self-attention + Multi-stage FFN.

All of FuXi-alpha's encoder is in this file. It follows the official code (USTC-StarTeam/FuXi-alpha)
where the paper is vague; where they differ the paper's reading is a ModelConfig switch
(`time_delta`, `attn_norm`). No parallelism here: sharding is applied from outside.

Every layer takes a jagged batch (model/jagged.py): the history tokens x_TD of all rows plus their
length groups. Per-token layers run on the T real tokens, attention per length group on the kernel that
`ModelConfig.kernel` picks (model/attention.py), with the group's plan that the stack builds once per batch.

Shapes: T history tokens, B rows, D width, H heads, C active channels (3 by default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import KERNELS, AttentionKernel, PlanKind, core_dtype, inverse_n, last_token_attention
from model.config import ModelConfig
from model.jagged import LengthGroups, run_jagged_blocks
from model.layers import (
    Dropout,
    RelativePositionWeights,
    RelativeTimeWeights,
    SwiGLU,
    rms_norm,
    xavier_uniform_linear,
)


class AMS(nn.Module):
    """Adaptive Multi-channel Self-attention.

    One fused projection gives u (one slice per channel), a single v shared by the channels, q and k;
    all go through SiLU after a gain-free RMSNorm of the input.
      semantic:   A_sem[h] = SiLU(q_h k_h^T) / n   (no 1/sqrt(d), no softmax)
      positional: A_pos    = w_pos[(N-1) + j - i]  (raw learned scalars, shared by heads)
      temporal:   A_ts     = w_ts[bucket(dt(i,j))] (raw learned scalars, shared by heads)
    each times the causal mask (diagonal included). Per head the channel outputs A v_h are concatenated
    in the official order [pos, ts, sem], then h = u * RMSNorm(concat).

    `attention="vanilla"` replaces the channels by one HSTU-style channel,
    SiLU(q k^T + w_pos + w_ts) / n, which is the paper's "w/o AMS" ablation.
    """

    ORDER = ("pos", "ts", "sem")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vanilla = cfg.attention == "vanilla"
        self.channels = ("sem",) if self.vanilla else tuple(c for c in self.ORDER if c in cfg.channels)
        h, dv, dqk = cfg.num_heads, cfg.dv, cfg.dqk
        self.u_width = len(self.channels) * h * dv
        self.split = (self.u_width, h * dv, h * dqk, h * dqk)  # u, v, q, k
        self.uvqk = nn.Parameter(torch.empty(cfg.embedding_dim, sum(self.split)).normal_(0, 0.02))
        needs_pos = self.vanilla or "pos" in self.channels
        needs_ts = self.vanilla or "ts" in self.channels
        self.pos_weights = RelativePositionWeights(cfg.padded_length) if needs_pos else None
        self.time_weights = (
            RelativeTimeWeights(
                cfg.num_time_buckets, cfg.time_bucket_divisor, cfg.time_delta, cfg.time_weight_init_scale
            )
            if needs_ts
            else None
        )
        # the attention core: reference einsums or the fast chunked core
        self.kernel: AttentionKernel[Any] = KERNELS[cfg.kernel]

    def forward(self, x_TD: Tensor, batch: LengthGroups, plans: list[Any], last_only: bool = False) -> Tensor:
        """Jagged tokens [T, D] in, [T, H*C*dv] out (with last_only, each row's last token only: [B, ...]).
        Projections run on the real tokens; attention runs per length group on `kernel`, plans[i] being
        group i's `kernel.plan` (unused with last_only, which reads every row's last query only)."""
        cfg = self.cfg
        pos = self.pos_weights.weight if self.pos_weights is not None else None
        ts = self.time_weights.weight if self.time_weights is not None else None
        if last_only:
            u, out, _ = last_token_attention(
                rms_norm(x_TD), self.uvqk, self.split, batch, cfg, pos, ts, self.channels, self.vanilla
            )
            return u * rms_norm(out)
        u, vqk = torch.split(F.silu(rms_norm(x_TD) @ self.uvqk), [self.u_width, sum(self.split[1:])], dim=-1)
        outs = []
        for g, plan in zip(batch, plans, strict=True):
            v, q, k = torch.split(g.gather(vqk), list(self.split[1:]), dim=-1)  # zero on padding: no key mask
            inv_n, dtype = inverse_n(g.valid, cfg.padded_length, cfg.attn_norm), core_dtype(g)
            if self.vanilla:
                assert pos is not None and ts is not None  # the vanilla channel has both tables
                out = self.kernel.hstu(q, k, v, pos, ts, inv_n, plan, cfg.num_heads, dtype)
            else:
                out = self.kernel.ams(q, k, v, pos, ts, inv_n, plan, self.channels, cfg.num_heads, dtype)
            outs.append(g.real(out))
        return u * rms_norm(batch.scatter(outs, x_TD.shape[0]))


class MFFN(nn.Module):
    """Multi-stage FFN.

    stage 1: o = Linear(Dropout(h)) + x                      (C*H*dv -> D, with bias)
    stage 2: out = SwiGLU(Dropout(RMSNorm(o))) + o            (skipped when ffn_single_stage)
    `ffn_out_init_scale` scales stage 2's down projection at init (1.0 official, 0.0 identity at start).
    """

    def __init__(self, cfg: ModelConfig, in_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.dropout = Dropout(cfg.linear_dropout, cfg.dropout_impl)
        self.proj = xavier_uniform_linear(in_width, cfg.embedding_dim, bias=True)
        self.swiglu = (
            None
            if cfg.ffn_single_stage
            else SwiGLU(cfg.embedding_dim, cfg.d_ffn, out_scale=cfg.ffn_out_init_scale)
        )

    def forward(self, h_TX: Tensor, x_TD: Tensor) -> Tensor:
        o = self.proj(self.dropout(h_TX)) + x_TD
        if self.swiglu is None:
            return o
        return self.swiglu(self.dropout(rms_norm(o))) + o


class FuXiBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ams = AMS(cfg)
        self.mffn = MFFN(cfg, self.ams.u_width)

    def forward(self, x_TD: Tensor, batch: LengthGroups, plans: list[Any], last_only: bool = False) -> Tensor:
        h = self.ams(x_TD, batch, plans, last_only)
        return self.mffn(h, x_TD[batch.last()[0]] if last_only else x_TD)


class FuXiStack(nn.Module):
    """num_layers FuXi blocks; no final norm (the output goes straight to L2 normalisation)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(FuXiBlock(cfg) for _ in range(cfg.num_layers))
        vanilla = cfg.attention == "vanilla"
        self.kernel: AttentionKernel[Any] = KERNELS[cfg.kernel]
        self.plan_kind: PlanKind = "hstu" if vanilla else "fuxi"
        self.with_time = vanilla or "ts" in cfg.channels

    def forward(self, x_TD: Tensor, batch: LengthGroups, last_only: bool = False) -> Tensor:
        """x_TD: history tokens [T, D], row-major. Returns [T, D], or with last_only (evaluation) each
        row's last token [B, D], the final block computing only those. Each length group's attention plan
        is built here, once per batch, and every block reads it."""
        plans = [self.kernel.plan(g, self.cfg, self.plan_kind, self.with_time) for g in batch]
        return run_jagged_blocks(self.blocks, x_TD, batch, plans, last_only)
