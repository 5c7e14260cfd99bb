"""FuXi-alpha (arXiv 2502.03036): Adaptive Multi-channel Self-attention + Multi-stage FFN.

All of FuXi-alpha's encoder is in this file. It follows the official code (USTC-StarTeam/FuXi-alpha)
where the paper is vague; where they differ the paper's reading is a ModelConfig switch
(`time_delta`, `attn_norm`). No parallelism here: sharding is applied from outside.

Shapes: B batch, L longest history in the batch, D width, H heads, C active channels (3 by default).
Padding is right-sided; padded rows are zero on the way in and on the way out of every block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.fast_ams import (
    Dropout,
    FastPlan,
    Group,
    JaggedBlock,
    ams_channels,
    build_plan,
    core_dtype,
    encode_jagged,
    hstu_attention,
    inverse_n,
    last_token_outputs,
    scatter_groups,
)
from model.layers import (
    BatchContext,
    RelativePositionWeights,
    RelativeTimeWeights,
    SwiGLU,
    attention_denominator,
    batch_context,
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
            RelativeTimeWeights(cfg.num_time_buckets, cfg.time_bucket_divisor, cfg.time_delta)
            if needs_ts
            else None
        )

    def forward(
        self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor, ctx: BatchContext | FastPlan | None = None
    ) -> Tensor:
        if isinstance(ctx, FastPlan):
            return self._fast(x_BLD, valid_BL, ctx)
        cfg = self.cfg
        ctx = ctx or batch_context(valid_BL, ts_BL1, cfg.time_delta, cfg.num_time_buckets, cfg.time_bucket_divisor)
        b, length, _ = x_BLD.shape
        h, dv, dqk = cfg.num_heads, cfg.dv, cfg.dqk
        u, v, q, k = torch.split(F.silu(rms_norm(x_BLD) @ self.uvqk), self.split, dim=-1)
        v_BLHd = (v * valid_BL[..., None]).view(b, length, h, dv)
        q_BLHd, k_BLHd = q.view(b, length, h, dqk), k.view(b, length, h, dqk)
        mask_BLL = ctx.mask_BLL
        denom = attention_denominator(valid_BL, cfg.padded_length, cfg.attn_norm)

        scores_BHLL = torch.einsum("bihd,bjhd->bhij", q_BLHd, k_BLHd)
        if self.vanilla:
            scores_BHLL = scores_BHLL + self.pos_weights(length) + self.time_weights(ts_BL1, length, ctx.buckets_BLL)[:, None]
            a_BHLL = F.silu(scores_BHLL) / denom * mask_BLL[:, None]
            out = torch.einsum("bhij,bjhd->bihd", a_BHLL, v_BLHd)
            return u * rms_norm(out.reshape(b, length, h * dv))

        outs = []
        for channel in self.channels:
            if channel == "pos":
                a_BLL = self.pos_weights(length)[None] * mask_BLL
                outs.append(torch.einsum("bij,bjhd->bihd", a_BLL, v_BLHd))
            elif channel == "ts":
                a_BLL = self.time_weights(ts_BL1, length, ctx.buckets_BLL) * mask_BLL
                outs.append(torch.einsum("bij,bjhd->bihd", a_BLL, v_BLHd))
            else:
                a_BHLL = F.silu(scores_BHLL) / denom * mask_BLL[:, None]
                outs.append(torch.einsum("bhij,bjhd->bihd", a_BHLL, v_BLHd))
        concat = torch.cat(outs, dim=-1).reshape(b, length, self.u_width)  # [B, L, H*C*dv], head-major
        return u * rms_norm(concat)

    def _fast(self, x_BLD: Tensor, valid_BL: Tensor, plan: FastPlan) -> Tensor:
        """The same function through model/fast_ams.py (kernel="fast")."""
        cfg = self.cfg
        b, length, _ = x_BLD.shape
        u, v, q, k = torch.split(F.silu(rms_norm(x_BLD) @ self.uvqk), self.split, dim=-1)
        v = v * valid_BL[..., None]
        inv_n = inverse_n(valid_BL, cfg.padded_length, cfg.attn_norm)
        pos = self.pos_weights.weight if self.pos_weights is not None else None
        ts = self.time_weights.weight if self.time_weights is not None else None
        if self.vanilla:
            return u * rms_norm(hstu_attention(q, k, v, pos, ts, inv_n, plan, cfg.num_heads))
        out = ams_channels(q, k, v, pos, ts, inv_n, plan, self.channels, cfg.num_heads)
        return u * rms_norm(out.reshape(b, length, self.u_width))

    def forward_jagged(self, x_TD: Tensor, groups: list[Group]) -> Tensor:
        """Jagged tokens [T, D] in, [T, C*H*dv] out: projections on the real tokens only, attention per
        length group (kernel="fast"). The same function as `forward` on each row."""
        cfg = self.cfg
        u, vqk = torch.split(F.silu(rms_norm(x_TD) @ self.uvqk), (self.u_width, sum(self.split[1:])), dim=-1)
        pos = self.pos_weights.weight if self.pos_weights is not None else None
        ts = self.time_weights.weight if self.time_weights is not None else None
        outs = []
        for g in groups:
            v, q, k = torch.split(g.gather(vqk), self.split[1:], dim=-1)  # zero on padding: no key mask
            inv_n, dtype = inverse_n(g.valid, cfg.padded_length, cfg.attn_norm), core_dtype(g)
            if self.vanilla:
                out = hstu_attention(q, k, v, pos, ts, inv_n, g.plan, cfg.num_heads, dtype)
            else:
                out = ams_channels(q, k, v, pos, ts, inv_n, g.plan, self.channels, cfg.num_heads, dtype)
            outs.append(g.real(out))
        return u * rms_norm(scatter_groups(outs, groups, x_TD.shape[0]))

    def forward_last(self, x_TD: Tensor, groups: list[Group]) -> tuple[Tensor, Tensor]:
        """`forward_jagged` at each row's last history token only: ([B, C*H*dv], their jagged indices)."""
        pos = self.pos_weights.weight if self.pos_weights is not None else None
        ts = self.time_weights.weight if self.time_weights is not None else None
        u, out, last_tok = last_token_outputs(
            rms_norm(x_TD), self.uvqk, self.split, groups, self.cfg, pos, ts, self.channels, self.vanilla
        )
        return u * rms_norm(out), last_tok


class MFFN(nn.Module):
    """Multi-stage FFN.

    stage 1: o = Linear(Dropout(h)) + x                      (C*H*dv -> D, with bias)
    stage 2: out = SwiGLU(Dropout(RMSNorm(o))) + o            (skipped when ffn_single_stage)
    """

    def __init__(self, cfg: ModelConfig, in_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.dropout = Dropout(cfg.linear_dropout, cfg.kernel)
        self.proj = xavier_uniform_linear(in_width, cfg.embedding_dim, bias=True)
        self.swiglu = None if cfg.ffn_single_stage else SwiGLU(cfg.embedding_dim, cfg.d_ffn)

    def forward(self, h_BLX: Tensor, x_BLD: Tensor) -> Tensor:
        o = self.proj(self.dropout(h_BLX)) + x_BLD
        if self.swiglu is None:
            return o
        return self.swiglu(self.dropout(rms_norm(o))) + o


class FuXiBlock(JaggedBlock):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ams = AMS(cfg)
        self.mffn = MFFN(cfg, self.ams.u_width)

    def forward_padded(
        self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor, ctx: BatchContext | FastPlan | None = None
    ) -> Tensor:
        out = self.mffn(self.ams(x_BLD, valid_BL, ts_BL1, ctx), x_BLD)
        return out * valid_BL[..., None]

    def forward_jagged(self, x_TD: Tensor, groups: list[Group]) -> Tensor:
        return self.mffn(self.ams.forward_jagged(x_TD, groups), x_TD)

    def forward_last(self, x_TD: Tensor, groups: list[Group]) -> Tensor:
        h, last_tok = self.ams.forward_last(x_TD, groups)
        return self.mffn(h, x_TD[last_tok])


class FuXiStack(nn.Module):
    """num_layers FuXi blocks; no final norm (the output goes straight to L2 normalisation)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(FuXiBlock(cfg) for _ in range(cfg.num_layers))

    def _plan(self, ts_BW: Tensor, length: int) -> FastPlan:
        cfg = self.cfg
        vanilla = cfg.attention == "vanilla"
        return build_plan(
            ts_BW, length, "hstu" if vanilla else "fuxi", cfg.time_delta, cfg.num_time_buckets,
            cfg.time_bucket_divisor, cfg.padded_length, cfg.fast_chunk,
            with_time=vanilla or "ts" in cfg.channels,
        )

    def forward(self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.kernel == "fast":
            ctx: BatchContext | FastPlan = self._plan(ts_BL1, x_BLD.shape[1])
        else:
            ctx = batch_context(
                valid_BL, ts_BL1, cfg.time_delta, cfg.num_time_buckets, cfg.time_bucket_divisor
            )
        for block in self.blocks:
            x_BLD = block(x_BLD, valid_BL, ts_BL1, ctx)
        return x_BLD

    def forward_jagged(
        self, x_TD: Tensor, hist_lengths_B: Tensor, ts_T: Tensor, max_groups: int, last_only: bool = False
    ) -> Tensor:
        """Jagged execution (kernel="fast"): per-token layers on the T real tokens, attention on length
        groups each padded to its own longest row (`encode_jagged`). x_TD: history tokens, row-major; ts_T:
        history + target timestamps, jagged with lengths hist + 1. Returns [T, D], or with last_only
        (evaluation) [B, D]."""
        plan_for = lambda g: self._plan(g.ts, g.valid.shape[1])  # noqa: E731
        return encode_jagged(self.blocks, x_TD, hist_lengths_B, ts_T, max_groups, plan_for, last_only)
