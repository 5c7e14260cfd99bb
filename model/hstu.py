"""HSTU (Zhai et al., 2024) as in the official research code, on the same harness as FuXi-alpha.

Block: [u, v, q, k] = SiLU(LayerNorm(x) W);  A = SiLU(q k^T + w_pos + w_ts) / n * causal;
       y = x + Linear(Dropout(u * LayerNorm(A v))).  No FFN. Position/time biases are shared by heads
and indexed exactly like FuXi-alpha's positional and temporal channels. Like FuXi-alpha it runs on jagged
tokens with attention per length group (model/jagged.py) on the kernel `ModelConfig.kernel` picks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import KERNELS, AttentionKernel, core_dtype, inverse_n, last_token_attention
from model.config import ModelConfig
from model.jagged import LengthGroups, run_jagged_blocks
from model.layers import (
    Dropout,
    RelativePositionWeights,
    RelativeTimeWeights,
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
        self.dropout = Dropout(cfg.linear_dropout, cfg.dropout_impl)
        self.out = xavier_uniform_linear(h * dv, cfg.embedding_dim, bias=True)
        self.kernel: AttentionKernel[Any] = KERNELS[cfg.kernel]

    def forward(self, x_TD: Tensor, batch: LengthGroups, plans: list[Any], last_only: bool = False) -> Tensor:
        """Jagged tokens [T, D] -> [T, D] (with last_only, each row's last token: [B, D]). plans[i]: group
        i's `kernel.plan` of kind "hstu" (see AMS.forward)."""
        cfg = self.cfg
        w_pos, w_ts = self.pos_weights.weight, self.time_weights.weight
        if last_only:
            u, attn, last_tok = last_token_attention(
                layer_norm(x_TD), self.uvqk, self.split, batch, cfg, w_pos, w_ts, ("sem",), vanilla=True
            )
            return x_TD[last_tok] + self.out(self.dropout(u * layer_norm(attn)))
        hdv = cfg.num_heads * cfg.dv
        u, vqk = torch.split(F.silu(layer_norm(x_TD) @ self.uvqk), [hdv, sum(self.split[1:])], dim=-1)
        outs = []
        for g, plan in zip(batch, plans, strict=True):
            v, q, k = torch.split(g.gather(vqk), list(self.split[1:]), dim=-1)  # zero on padding: no key mask
            inv_n = inverse_n(g.valid, cfg.padded_length, cfg.attn_norm)
            outs.append(
                g.real(self.kernel.hstu(q, k, v, w_pos, w_ts, inv_n, plan, cfg.num_heads, core_dtype(g)))
            )
        attn = batch.scatter(outs, x_TD.shape[0])
        return x_TD + self.out(self.dropout(u * layer_norm(attn)))


class HSTUStack(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(HSTUBlock(cfg) for _ in range(cfg.num_layers))
        self.kernel: AttentionKernel[Any] = KERNELS[cfg.kernel]

    def forward(self, x_TD: Tensor, batch: LengthGroups, last_only: bool = False) -> Tensor:
        """See FuXiStack.forward."""
        plans = [self.kernel.plan(g, self.cfg, "hstu", True) for g in batch]
        return run_jagged_blocks(self.blocks, x_TD, batch, plans, last_only)
