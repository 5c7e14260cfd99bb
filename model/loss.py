"""Sampled softmax with N uniformly drawn negatives over the whole catalogue.

Two layouts of the negatives:
  per_position  R fresh ids for every supervised position (the official `local` sampler):
                logits [T, 1 + R], memory and lookups O(T * R).
  shared        one set of R ids for the whole batch, scored by every position with one matmul:
                logits [T, 1 + R], lookups O(R).
A negative equal to the position's positive gets logit -5e4 (as the official code; not resampled).
Logits are cosine similarities / temperature (0.05); the loss is the mean over supervised positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchrec import JaggedTensor

from model.recommender import SequenceOutput

NegativeMode = Literal["per_position", "shared"]
MASKED_LOGIT = -5e4


@dataclass
class NegativeSampler:
    """Draws ids uniformly with replacement from [low, high) (by default every real item id)."""

    num_negatives: int
    mode: NegativeMode
    low: int
    high: int

    def __post_init__(self) -> None:
        if self.mode not in ("per_position", "shared"):
            raise ValueError(f"negative mode must be 'per_position' or 'shared', got {self.mode!r}")
        if self.high <= self.low:
            raise ValueError(f"empty candidate range [{self.low}, {self.high})")

    def sample(self, history_lengths_B: Tensor, generator: torch.Generator | None = None) -> JaggedTensor:
        """Negatives as a JaggedTensor over the batch, ready for the item table lookup."""
        lengths = history_lengths_B.long()
        if self.mode == "per_position":
            neg_lengths = lengths * self.num_negatives
            total = int(neg_lengths.sum().item())
        else:  # all R ids hang off the first user; the loss reads them as one shared set
            neg_lengths = torch.zeros_like(lengths)
            neg_lengths[0] = self.num_negatives
            total = self.num_negatives
        values = torch.randint(self.low, self.high, (total,), generator=generator, device=lengths.device)
        return JaggedTensor(values=values, lengths=neg_lengths.int())


def sampled_softmax_loss(
    out: SequenceOutput, negatives: JaggedTensor, mode: NegativeMode, temperature: float
) -> Tensor:
    user_TD, target_TD = out.user_TD, out.target_TD
    pos_T1 = (user_TD * target_TD).sum(-1, keepdim=True)
    neg_ids = negatives.values()
    if mode == "per_position":
        neg_TRD = out.negatives_XD.view(user_TD.shape[0], -1, user_TD.shape[1])
        neg_TR = torch.einsum("td,trd->tr", user_TD, neg_TRD)
        same = neg_ids.view(user_TD.shape[0], -1) == out.target_ids_T[:, None]
    elif mode == "shared":
        neg_TR = user_TD @ out.negatives_XD.T
        same = neg_ids[None, :] == out.target_ids_T[:, None]
    else:
        raise ValueError(f"unknown negative mode {mode!r}")
    logits = torch.cat([pos_T1, neg_TR], dim=1) / temperature
    logits[:, 1:] = logits[:, 1:].masked_fill(same, MASKED_LOGIT)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)
