"""eSASRec (Tikhonovich et al., 2025, arXiv 2508.06450): SASRec with LiGR transformer layers.

The eSASRec paper's best "simple" model is SASRec + LiGR layers + sampled softmax. The layer is LinkedIn's
LiGR block (arXiv 2502.03417); the code this file follows is the paper's own (RecTools' SASRec backbone with
`transformer_layers_type=...ligr.LiGRLayers` in blondered/transformer_benchmark). One LiGR block:

    z = LayerNorm_1(x)                                  # pre-norm, affine, eps 1e-5 (nn.LayerNorm defaults)
    a = MHA(z, z, z, causal)                            # softmax attention; dropout p on its probabilities
    x = x + sigmoid(G_1 x + c_1) * Dropout(a)           # gated residual: the gate reads the block input x
    z = LayerNorm_2(x)
    f = W_2 Dropout(SiLU(W_1 z) * W_3 z)                # SwiGLU, width D * ff_factors_multiplier, no biases
    x = x + sigmoid(G_2 x + c_2) * Dropout(f)

MHA is torch's nn.MultiheadAttention: one fused q/k/v projection with a bias (zero at init), an output
projection with a bias (zero at init), per-head width D / H. No norm after the last block (LiGRLayers has
none; the harness L2-normalises the output anyway). Every matrix is xavier-normal at init (RecTools'
`_xavier_normal_init` over all parameters of more than one dimension); gate biases keep nn.Linear's init.

Settings on this harness (ModelConfig):
  num_layers, num_heads      n_blocks, n_heads (paper: ML-1M 2 blocks, 1 head; BeerAdvocate 4, 2)
  dqk, dv                    per-head q/k and v widths; RecTools has D / H for both: set them so
  ffn_multiply               ff_factors_multiplier (RecTools default and the paper's ML-1M value: 4; the
                             harness default is 1.0, FuXi-alpha's ML-1M width)
  linear_dropout             dropout_rate inside the block (attention probabilities, both residual
                             branches, inside the SwiGLU); input_dropout: RecTools' embedding dropout
  kernel                     "fast": F.scaled_dot_product_attention; "reference": the padded softmax
                             einsums, its slow twin (same function; attention-probability dropout draws
                             differ)
The paper trains it with sampled softmax over n_negatives = 256 ids drawn uniformly per position from the
whole catalogue (RecTools' collate: randint per position; a draw may equal the positive): here
`loss.negatives=per_position loss.num_negatives=256`.

Where the harness differs from RecTools, for every model alike: the shared item table (truncated normal,
scaled by sqrt(D) on input), learned absolute positions counted from the first item (RecTools counts them
from the last: `LearnableInversePositionalEncoding`), and cosine logits over a temperature (RecTools scores
raw dot products; a negative equal to the positive is masked here, kept there).

Execution: per-token layers (norms, gates, projections, SwiGLU) run on the T real tokens of the jagged
batch; attention runs per length group on its padded view (model/jagged.py). Padding is right-sided, so
the causal mask alone hides it from real queries. At evaluation every token is computed and each row's
last kept (as SASRec and LLaMa do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.jagged import LengthGroups, pad_rows
from model.layers import Dropout


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, dropout: nn.Module) -> Tensor:
    """softmax(q k^T / sqrt(d) + causal) v on [n, H, L, d], every [n, H, L, L] tensor materialised."""
    length = q.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = torch.einsum("nhid,nhjd->nhij", q, k) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("nhij,nhjd->nhid", dropout(probs), v)


class LiGRBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.embedding_dim, cfg.num_heads
        self.cfg = cfg
        self.split = [h * cfg.dqk, h * cfg.dqk, h * cfg.dv]  # q, k, v
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, sum(self.split))  # nn.MultiheadAttention's in_proj
        self.out = nn.Linear(h * cfg.dv, d)  # its out_proj
        self.attn_gate = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.w1 = nn.Linear(d, cfg.d_ffn, bias=False)
        self.w3 = nn.Linear(d, cfg.d_ffn, bias=False)
        self.w2 = nn.Linear(cfg.d_ffn, d, bias=False)
        self.ffn_gate = nn.Linear(d, d)
        self.dropout = Dropout(cfg.linear_dropout, cfg.dropout_impl)
        self.attn_dropout = nn.Dropout(cfg.linear_dropout)  # reference kernel; SDPA draws its own
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def attention(self, z_TD: Tensor, batch: LengthGroups) -> Tensor:
        """Causal multi-head softmax attention of jagged tokens [T, D] -> [T, H * dv], per length group."""
        cfg, h = self.cfg, self.cfg.num_heads
        qkv = self.qkv(z_TD)
        outs = []
        for g in batch:
            n, length = g.tok.shape
            q, k, v = (
                t.view(n, length, h, -1).transpose(1, 2) for t in torch.split(g.gather(qkv), self.split, -1)
            )
            if cfg.kernel == "fast":
                p = cfg.linear_dropout if self.training else 0.0
                a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                a = causal_attention_reference(q, k, v, self.attn_dropout)
            outs.append(g.real(a.transpose(1, 2)))
        return batch.scatter(outs, z_TD.shape[0])

    def forward(self, x_TD: Tensor, batch: LengthGroups) -> Tensor:
        a = self.out(self.attention(self.attn_norm(x_TD), batch))
        x_TD = x_TD + torch.sigmoid(self.attn_gate(x_TD)) * self.dropout(a)
        z = self.ffn_norm(x_TD)
        f = self.w2(self.dropout(F.silu(self.w1(z)) * self.w3(z)))
        return x_TD + torch.sigmoid(self.ffn_gate(x_TD)) * self.dropout(f)


class ESASRecStack(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LiGRBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, x_TD: Tensor, batch: LengthGroups, last_only: bool = False) -> Tensor:
        """Jagged tokens [T, D] -> [T, D] (or each row's last [B, D]). Token rows are padded to
        `gemm_rows` while training (the padded rows never reach attention: groups gather real tokens)."""
        x = x_TD if last_only else pad_rows(x_TD)
        for block in self.blocks:  # called as modules: FSDP2 unshards in the forward pre-hook
            x = block(x, batch)
        return x[batch.last()[0]] if last_only else x[: batch.num_tokens]
