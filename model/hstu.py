"""HSTU (Zhai et al., 2024) as in the official research code, on the same harness as FuXi-alpha.

Block: [u, v, q, k] = SiLU(LayerNorm(x) W);  A = SiLU(q k^T + w_pos + w_ts) / n * causal;
       y = x + Linear(Dropout(u * LayerNorm(A v))).  No FFN. Position/time biases are shared by heads
and indexed exactly like FuXi-alpha's positional and temporal channels.
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
    attention_denominator,
    batch_context,
    layer_norm,
    xavier_uniform_linear,
)


class HSTUBlock(JaggedBlock):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, dv, dqk = cfg.num_heads, cfg.dv, cfg.dqk
        self.split = (h * dv, h * dv, h * dqk, h * dqk)  # u, v, q, k
        self.uvqk = nn.Parameter(torch.empty(cfg.embedding_dim, sum(self.split)).normal_(0, 0.02))
        self.pos_weights = RelativePositionWeights(cfg.padded_length)
        self.time_weights = RelativeTimeWeights(cfg.num_time_buckets, cfg.time_bucket_divisor, cfg.time_delta)
        self.dropout = Dropout(cfg.linear_dropout, cfg.kernel)
        self.out = xavier_uniform_linear(h * dv, cfg.embedding_dim, bias=True)

    def forward_padded(
        self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor, ctx: BatchContext | FastPlan | None = None
    ) -> Tensor:
        if isinstance(ctx, FastPlan):
            return self._fast(x_BLD, valid_BL, ctx)
        cfg = self.cfg
        ctx = ctx or batch_context(valid_BL, ts_BL1, cfg.time_delta, cfg.num_time_buckets, cfg.time_bucket_divisor)
        b, length, _ = x_BLD.shape
        h, dv, dqk = cfg.num_heads, cfg.dv, cfg.dqk
        u, v, q, k = torch.split(F.silu(layer_norm(x_BLD) @ self.uvqk), self.split, dim=-1)
        v_BLHd = (v * valid_BL[..., None]).view(b, length, h, dv)
        scores = torch.einsum("bihd,bjhd->bhij", q.view(b, length, h, dqk), k.view(b, length, h, dqk))
        scores = scores + self.pos_weights(length) + self.time_weights(ts_BL1, length, ctx.buckets_BLL)[:, None]
        denom = attention_denominator(valid_BL, cfg.padded_length, cfg.attn_norm)
        a = F.silu(scores) / denom * ctx.mask_BLL[:, None]
        attn = torch.einsum("bhij,bjhd->bihd", a, v_BLHd).reshape(b, length, h * dv)
        y = x_BLD + self.out(self.dropout(u * layer_norm(attn)))
        return y * valid_BL[..., None]

    def _fast(self, x_BLD: Tensor, valid_BL: Tensor, plan: FastPlan) -> Tensor:
        """The same function through model/fast_ams.py (kernel="fast")."""
        cfg = self.cfg
        u, v, q, k = torch.split(F.silu(layer_norm(x_BLD) @ self.uvqk), self.split, dim=-1)
        v = v * valid_BL[..., None]
        inv_n = inverse_n(valid_BL, cfg.padded_length, cfg.attn_norm)
        attn = hstu_attention(
            q, k, v, self.pos_weights.weight, self.time_weights.weight, inv_n, plan, cfg.num_heads
        )
        y = x_BLD + self.out(self.dropout(u * layer_norm(attn)))
        return y * valid_BL[..., None]

    def forward_jagged(self, x_TD: Tensor, groups: list[Group]) -> Tensor:
        """Jagged tokens [T, D]: projections on the real tokens only, attention per length group."""
        cfg = self.cfg
        hdv = cfg.num_heads * cfg.dv
        u, vqk = torch.split(F.silu(layer_norm(x_TD) @ self.uvqk), (hdv, sum(self.split[1:])), dim=-1)
        outs = []
        for g in groups:
            v, q, k = torch.split(g.gather(vqk), self.split[1:], dim=-1)  # zero on padding: no key mask
            inv_n = inverse_n(g.valid, cfg.padded_length, cfg.attn_norm)
            w_pos, w_ts = self.pos_weights.weight, self.time_weights.weight
            attn_g = hstu_attention(q, k, v, w_pos, w_ts, inv_n, g.plan, cfg.num_heads, core_dtype(g))
            outs.append(g.real(attn_g))
        attn = scatter_groups(outs, groups, x_TD.shape[0])
        return x_TD + self.out(self.dropout(u * layer_norm(attn)))

    def forward_last(self, x_TD: Tensor, groups: list[Group]) -> Tensor:
        """`forward_jagged` at each row's last history token only: [B, D] (see FuXiBlock.forward_last)."""
        w_pos, w_ts = self.pos_weights.weight, self.time_weights.weight
        u, attn, last_tok = last_token_outputs(
            layer_norm(x_TD), self.uvqk, self.split, groups, self.cfg, w_pos, w_ts, ("sem",), vanilla=True
        )
        return x_TD[last_tok] + self.out(self.dropout(u * layer_norm(attn)))


class HSTUStack(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(HSTUBlock(cfg) for _ in range(cfg.num_layers))

    def _plan(self, ts_BW: Tensor, length: int) -> FastPlan:
        cfg = self.cfg
        return build_plan(
            ts_BW, length, "hstu", cfg.time_delta, cfg.num_time_buckets, cfg.time_bucket_divisor,
            cfg.padded_length, cfg.fast_chunk,
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
        """Jagged execution (kernel="fast"); see FuXiStack.forward_jagged."""
        plan_for = lambda g: self._plan(g.ts, g.valid.shape[1])  # noqa: E731
        return encode_jagged(self.blocks, x_TD, hist_lengths_B, ts_T, max_groups, plan_for, last_only)
