"""SASRec (Kang & McAuley, 2018) as in the official HSTU/FuXi research code.

Block: Q = LayerNorm(x); a = MHA(Q, x, x, causal); h = LayerNorm(Q + a);
       x = (h + Dropout(W2 Dropout(ReLU(W1 h)))) * valid.   No time information at all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import ModelConfig
from model.jagged import LengthGroups, run_padded_groups


class SASRecBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.norm_q = nn.LayerNorm(d, eps=1e-8, elementwise_affine=False)
        self.norm_h = nn.LayerNorm(d, eps=1e-8, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.linear_dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.sasrec_ffn_hidden),
            nn.ReLU(),
            nn.Dropout(cfg.linear_dropout),
            nn.Linear(cfg.sasrec_ffn_hidden, d),
            nn.Dropout(cfg.linear_dropout),
        )
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)

    def forward(self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor) -> Tensor:
        length = x_BLD.shape[1]
        # True = not allowed. Padding is right-sided, so the causal mask alone hides it from real queries.
        future = torch.ones(length, length, dtype=torch.bool, device=x_BLD.device).triu(1)
        q = self.norm_q(x_BLD)
        a, _ = self.attn(q, x_BLD, x_BLD, attn_mask=future, need_weights=False)
        h = self.norm_h(q + a)
        return (h + self.ffn(h)) * valid_BL[..., None]


class SASRecStack(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, x_TD: Tensor, batch: LengthGroups, last_only: bool = False) -> Tensor:
        """Jagged tokens [T, D] -> [T, D] (or each row's last [B, D]), each length group run padded."""
        return run_padded_groups(self.padded, x_TD, batch, last_only)

    def padded(self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor) -> Tensor:
        for block in self.blocks:
            x_BLD = block(x_BLD, valid_BL, ts_BL1)
        return x_BLD
