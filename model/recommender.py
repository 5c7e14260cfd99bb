"""SequentialRecommender: TorchRec item table + shared input/output + one of the encoder stacks.

The item table is an unsharded torchrec `EmbeddingCollection` (table `item_table`, features `item_id`
for the sequences and `neg_id` for sampled negatives), so `pipeline/train/parallelize.py` can shard it from
outside without touching this file.

Input: a `KeyedJaggedTensor` with keys ("item_id", "timestamp"); each user's row holds its history
followed by its target (length L_b + 1). The encoder sees the history only; position i predicts the item
at i + 1; the temporal channel may read the target's timestamp (official Δt = t[i+1] - t[j]).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor

from model.config import ModelConfig
from model.esasrec import ESASRecStack
from model.fuxi import FuXiStack
from model.hstu import HSTUStack
from model.jagged import fixed_length_groups, length_groups, row_col
from model.layers import Dropout
from model.llama import LlamaStack
from model.sasrec import SASRecStack
from pipeline.features import ITEM_FEATURE, TIME_FEATURE

ITEM_TABLE = "item_table"  # not "items": that collides with nn.ModuleDict.items
NEG_FEATURE = "neg_id"  # sampled negatives: a model-internal key of the item table

ENCODERS = {
    "fuxi": FuXiStack,
    "hstu": HSTUStack,
    "sasrec": SASRecStack,
    "llama": LlamaStack,
    "esasrec": ESASRecStack,
}


@dataclass
class SequenceOutput:
    """Everything the loss needs, at the supervised positions only (T = sum of history lengths)."""

    user_TD: Tensor  # L2-normalised encoder output at each history position
    target_TD: Tensor  # L2-normalised embedding of the next item
    target_ids_T: Tensor
    negatives_XD: Tensor | None  # L2-normalised negatives, as laid out by the sampler
    history_lengths_B: Tensor


def l2_normalize(x: Tensor, eps: float) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


class SequentialRecommender(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embedding_dim
        std = 0.02
        self.item_embedding = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=ITEM_TABLE,
                    num_embeddings=cfg.num_items,
                    embedding_dim=d,
                    feature_names=[ITEM_FEATURE, NEG_FEATURE],
                    init_fn=partial(nn.init.trunc_normal_, std=std, a=-2 * std, b=2 * std),
                )
            ],
            device=torch.device(device) if device is not None else None,
        )
        self.use_abs_positions = not (cfg.architecture == "llama" and cfg.llama_positions == "rope")
        self.position_embedding = nn.Embedding(cfg.padded_length, d, device=device)
        if cfg.architecture == "sasrec":
            nn.init.trunc_normal_(self.position_embedding.weight, std=(1.0 / d) ** 0.5)
        else:  # the official reset_params leaves the positional table xavier-normal
            nn.init.xavier_normal_(self.position_embedding.weight)
        self.input_dropout = Dropout(cfg.input_dropout, cfg.dropout_impl)
        self.encoder = ENCODERS[cfg.architecture](cfg)
        if device is not None:
            self.encoder.to(device)

    # ------------------------------------------------------------------------------------------
    def _lookup(self, seq: KeyedJaggedTensor, negatives: JaggedTensor | None) -> tuple[Tensor, Tensor | None]:
        """One embedding lookup for the sequences and the negatives (one all-to-all when sharded)."""
        ids = seq[ITEM_FEATURE]
        neg_values = negatives.values() if negatives is not None else ids.values()[:0]
        neg_lengths = negatives.lengths() if negatives is not None else torch.zeros_like(ids.lengths())
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[ITEM_FEATURE, NEG_FEATURE],
            values=torch.cat([ids.values(), neg_values]),
            lengths=torch.cat([ids.lengths(), neg_lengths]).int(),
        )
        out = self.item_embedding(kjt)
        negs = out[NEG_FEATURE].values() if negatives is not None else None
        return out[ITEM_FEATURE].values(), negs

    def _encode(
        self, seq: KeyedJaggedTensor, emb_TD: Tensor, last_only: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder on the batch's history tokens, jagged, in length groups (model/jagged.py).

        Returns the normalised encoder output of every history token [T, D] (row-major), the index of each
        history token in the jagged values (its target is the next value), and the history lengths [B].
        With last_only the output is each row's last token [B, D] (the final block computes only those)."""
        cfg = self.cfg
        lengths_B = seq[ITEM_FEATURE].lengths().long()  # history + target
        rows, cols = row_col(lengths_B)
        hist_tok = torch.nonzero(cols < (lengths_B - 1)[rows])[:, 0]
        x = emb_TD[hist_tok] * (cfg.embedding_dim**0.5)
        if self.use_abs_positions:
            x = x + self.position_embedding.weight[cols[hist_tok]]
        x = self.input_dropout(x)
        # padding="fixed": every group as wide as the official code's padded batches (N slots)
        min_width = cfg.padded_length if cfg.padding == "fixed" else 0
        batch = length_groups(
            lengths_B - 1, seq[TIME_FEATURE].values(), max(cfg.length_buckets, 1), min_width
        )
        y = self.encoder(x, batch, last_only=last_only)
        return l2_normalize(y, cfg.l2_norm_eps), hist_tok, lengths_B - 1

    def forward(self, seq: KeyedJaggedTensor, negatives: JaggedTensor | None = None) -> SequenceOutput:
        emb_TD, neg_XD = self._lookup(seq, negatives)
        user_TD, hist_tok, hist_B = self._encode(seq, emb_TD)
        return SequenceOutput(
            user_TD=user_TD,
            target_TD=l2_normalize(emb_TD[hist_tok + 1], self.cfg.l2_norm_eps),
            target_ids_T=seq[ITEM_FEATURE].values()[hist_tok + 1],
            negatives_XD=l2_normalize(neg_XD, self.cfg.l2_norm_eps) if neg_XD is not None else None,
            history_lengths_B=hist_B,
        )

    @torch.no_grad()
    def encode_last(self, seq: KeyedJaggedTensor) -> Tensor:
        """User vectors [B, D] at each history's last position (they predict the target)."""
        emb_TD, _ = self._lookup(seq, None)
        return self._encode(seq, emb_TD, last_only=True)[0]

    @torch.no_grad()
    def encode_fixed(self, items_BL: Tensor, times_BL1: Tensor) -> Tensor:
        """`encode_last` for B histories of exactly L items, padded tensors in and out: items [B, L],
        timestamps [B, L + 1] (history + request time) -> user vectors [B, D]. Shapes come from the
        inputs' sizes only, so `torch.export` can trace it (the jagged path plans length groups on the
        host); the result equals encode_last's on the same rows."""
        cfg = self.cfg
        num_rows, length = items_BL.shape
        x = self.item_table_weight()[items_BL.reshape(-1)] * (cfg.embedding_dim**0.5)
        if self.use_abs_positions:
            x = x + self.position_embedding.weight[:length].repeat(num_rows, 1)
        x = self.input_dropout(x)
        min_width = cfg.padded_length if cfg.padding == "fixed" else 0
        batch = fixed_length_groups(num_rows, length, times_BL1.reshape(-1), min_width)
        return l2_normalize(self.encoder(x, batch, last_only=True), cfg.l2_norm_eps)

    def item_table_weight(self) -> Tensor:
        """The raw (unsharded) item table [num_items, D]."""
        table = self.item_embedding.embeddings[ITEM_TABLE]
        assert isinstance(table, nn.Embedding)
        return table.weight

    def normalized_item_embeddings(self) -> Tensor:
        return l2_normalize(self.item_table_weight(), self.cfg.l2_norm_eps)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> SequentialRecommender:
    return SequentialRecommender(cfg, device=device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "SequentialRecommender",
    "SequenceOutput",
    "build_model",
    "count_parameters",
]
