"""Full-ranking evaluation: every catalogue item is scored for every user; seen items are filtered."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from model.jagged import jagged_to_padded
from model.metrics import full_ranks, ranking_metrics
from model.recommender import ITEM_FEATURE, SequentialRecommender
from pipeline.collate import Batch


def split_history_target(batch: Batch) -> tuple[Tensor, Tensor]:
    """(history ids [B, L] zero-padded, target ids [B]) of a batch whose rows end with the target."""
    ids = batch.seq[ITEM_FEATURE]
    lengths = ids.lengths().long()
    padded = jagged_to_padded(ids.values()[:, None], lengths, int(lengths.max()))[..., 0]
    target = padded[torch.arange(padded.shape[0]), lengths - 1]
    history = padded.scatter(1, (lengths - 1)[:, None], 0)
    return history, target


@torch.no_grad()
def batch_ranks(model: SequentialRecommender, batch: Batch, filter_seen: bool = True) -> Tensor:
    user_BD = model.encode_last(batch.seq)
    items_VD = model.normalized_item_embeddings()
    history, target = split_history_target(batch)
    scores = user_BD @ items_VD.T
    exclude = torch.zeros(1, dtype=torch.long, device=scores.device)  # id 0 is padding
    return full_ranks(scores, target, history if filter_seen else None, exclude)


@torch.no_grad()
def evaluate(model: SequentialRecommender, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict[str, float]:
    was_training = model.training
    model.eval()
    ranks = [batch_ranks(model, b.to(torch.device(device))) for b in batches]
    model.train(was_training)
    if not ranks:
        raise ValueError("evaluation split is empty")
    metrics = ranking_metrics(torch.cat(ranks))
    metrics["num_users"] = float(sum(r.numel() for r in ranks))
    return metrics
