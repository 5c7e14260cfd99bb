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
from model.layers import (
    RelativePositionWeights,
    RelativeTimeWeights,
    attention_denominator,
    causal_mask,
    layer_norm,
    xavier_uniform_linear,
)


class HSTUBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, dv, dqk = cfg.num_heads, cfg.dv, cfg.dqk
        self.split = (h * dv, h * dv, h * dqk, h * dqk)  # u, v, q, k
        self.uvqk = nn.Parameter(torch.empty(cfg.embedding_dim, sum(self.split)).normal_(0, 0.02))
        self.pos_weights = RelativePositionWeights(cfg.padded_length)
        self.time_weights = RelativeTimeWeights(cfg.num_time_buckets, cfg.time_bucket_divisor, cfg.time_delta)
        self.dropout = nn.Dropout(cfg.linear_dropout)
        self.out = xavier_uniform_linear(h * dv, cfg.embedding_dim, bias=True)

    def forward(self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor) -> Tensor:
        cfg = self.cfg
        b, length, _ = x_BLD.shape
        h, dv, dqk = cfg.num_heads, cfg.dv, cfg.dqk
        u, v, q, k = torch.split(F.silu(layer_norm(x_BLD) @ self.uvqk), self.split, dim=-1)
        v_BLHd = (v * valid_BL[..., None]).view(b, length, h, dv)
        scores = torch.einsum("bihd,bjhd->bhij", q.view(b, length, h, dqk), k.view(b, length, h, dqk))
        scores = scores + self.pos_weights(length) + self.time_weights(ts_BL1, length)[:, None]
        denom = attention_denominator(valid_BL, cfg.padded_length, cfg.attn_norm)
        a = F.silu(scores) / denom * causal_mask(valid_BL)[:, None]
        attn = torch.einsum("bhij,bjhd->bihd", a, v_BLHd).reshape(b, length, h * dv)
        y = x_BLD + self.out(self.dropout(u * layer_norm(attn)))
        return y * valid_BL[..., None]


class HSTUStack(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(HSTUBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor) -> Tensor:
        for block in self.blocks:
            x_BLD = block(x_BLD, valid_BL, ts_BL1)
        return x_BLD
