"""Full-ranking metrics: rank every catalogue item, filter what the user has seen, score the target.

rank r is 1-based among the candidates that survive filtering; a target that is itself filtered (it is
in the history) is a miss, as in the official code. Ties are ranked pessimistically: the target ranks below
every candidate whose score equals its own, so a model that scores every item alike ranks its targets
last, not first. A candidate whose score is NaN counts as above the target, and a target whose own score is
not finite is a miss: a diverged model scores 0 on every metric and can never win a model selection.
HR@K = 1[r <= K], NDCG@K = 1/log2(r + 1) if r <= K,
MRR = 1/r (untruncated). Metric names avoid '@' (MLflow rejects it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KS = (10, 50)


def full_ranks(
    scores_BV: Tensor, target_B: Tensor, history_ids_BL: Tensor | None, exclude_ids: Tensor | None = None
) -> Tensor:
    """1-based rank of each target among all candidates (ties pessimistic, see the module docstring); inf
    when the target was filtered out or its score is not finite.

    scores_BV: every item's score (column = item id). history_ids_BL: seen ids, 0-padded (0 is never a
    candidate). exclude_ids: ids that are never candidates (e.g. padding id 0).
    """
    scores = scores_BV.clone().float()
    if exclude_ids is not None:
        scores[:, exclude_ids] = -math.inf
    if history_ids_BL is not None:
        scores.scatter_(1, history_ids_BL.long(), -math.inf)
    target_scores = scores.gather(1, target_B.long()[:, None])
    scores.scatter_(1, target_B.long()[:, None], -math.inf)  # the target is not its own competitor
    ranks = count_at_or_above(scores, target_scores[:, 0]).float() + 1
    miss = ~torch.isfinite(target_scores[:, 0])
    return torch.where(miss, torch.full_like(ranks, math.inf), ranks)


def count_at_or_above(scores_BV: Tensor, target_score_B: Tensor) -> Tensor:
    """Per row: candidates scoring at or above the target (ties pessimistic), NaN candidates included.
    Non-candidates must hold -inf; the count is only meaningful for a finite target score."""
    return ((scores_BV >= target_score_B[:, None]) | torch.isnan(scores_BV)).sum(1)


def per_target_metrics(ranks_B: Tensor, ks: tuple[int, ...] = KS) -> dict[str, Tensor]:
    """Each metric's value per target (float64 [B]); `ranking_metrics` is their mean."""
    ranks = ranks_B.double()
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr_at_{k}"] = hit.double()
        out[f"ndcg_at_{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1), torch.zeros_like(ranks))
    out["mrr"] = 1.0 / ranks
    return out


def ranking_metrics(ranks_B: Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    return {name: values.mean().item() for name, values in per_target_metrics(ranks_B, ks).items()}
