"""A LLaMa-style block on the same harness (the paper's "LLaMa" baseline has no released code).

Pre-norm block: h = x + Wo(softmax-attention(RMSNorm(x)))  with rotary q/k (or the harness's learned
absolute positions), then x = h + SwiGLU(RMSNorm(h)); a final RMSNorm after the stack. RMSNorms have
learnable gains, as in LLaMa.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.jagged import LengthGroups, run_padded_groups
from model.layers import SwiGLU, rotary, xavier_uniform_linear


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h, dqk = cfg.embedding_dim, cfg.num_heads, cfg.dqk
        self.cfg = cfg
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(d, eps=1e-6)
        self.wq = xavier_uniform_linear(d, h * dqk, bias=False)
        self.wk = xavier_uniform_linear(d, h * dqk, bias=False)
        self.wv = xavier_uniform_linear(d, h * cfg.dv, bias=False)
        self.wo = xavier_uniform_linear(h * cfg.dv, d, bias=False)
        self.ffn = SwiGLU(d, cfg.d_ffn)
        self.dropout = nn.Dropout(cfg.linear_dropout)

    def forward(self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor) -> Tensor:
        cfg = self.cfg
        b, length, _ = x_BLD.shape
        z = self.attn_norm(x_BLD)
        q = self.wq(z).view(b, length, cfg.num_heads, cfg.dqk)
        k = self.wk(z).view(b, length, cfg.num_heads, cfg.dqk)
        v = self.wv(z).view(b, length, cfg.num_heads, cfg.dv)
        if cfg.llama_positions == "rope":
            q, k = rotary(q), rotary(k)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        h = x_BLD + self.dropout(self.wo(a.transpose(1, 2).reshape(b, length, -1)))
        out = h + self.dropout(self.ffn(self.ffn_norm(h)))
        return out * valid_BL[..., None]


class LlamaStack(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.embedding_dim, eps=1e-6)

    def forward(self, x_TD: Tensor, batch: LengthGroups, last_only: bool = False) -> Tensor:
        """Jagged tokens [T, D] -> [T, D] (or each row's last [B, D]), each length group run padded."""
        return run_padded_groups(self.padded, x_TD, batch, last_only)

    def padded(self, x_BLD: Tensor, valid_BL: Tensor, ts_BL1: Tensor) -> Tensor:
        for block in self.blocks:
            x_BLD = block(x_BLD, valid_BL, ts_BL1)
        return self.norm(x_BLD) * valid_BL[..., None]
