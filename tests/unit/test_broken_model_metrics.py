"""A broken model can never win: ties rank pessimistically, NaN and non-finite scores are misses.

Before this rule, `full_ranks` counted only strictly higher scores, so a model scoring NaN or a constant
everywhere ranked every target first (HR@10 = NDCG@10 = MRR = 1.0) and won epoch selection, a study and
the nightly promotion.
"""

from __future__ import annotations

import math

import pytest
import torch

from model.metrics import full_ranks, ranking_metrics
from pipeline.train.evaluate import _count_above

V = 20  # catalogue ids 0..19, 0 is padding


def _ranks(scores, target, history):
    return full_ranks(scores, torch.tensor(target), torch.tensor(history), torch.tensor([0]))


def test_nan_model_scores_zero():
    ranks = _ranks(torch.full((3, V), math.nan), [1, 2, 3], [[4, 5], [6, 0], [7, 8]])
    assert torch.isinf(ranks).all()
    assert ranking_metrics(ranks) == {
        "hr_at_10": 0.0,
        "ndcg_at_10": 0.0,
        "hr_at_50": 0.0,
        "ndcg_at_50": 0.0,
        "mrr": 0.0,
    }


def test_constant_model_ranks_its_target_last():
    # 19 real ids, 2 seen, the target itself: 16 competitors, all tied with the target -> rank 17
    ranks = _ranks(torch.zeros(1, V), [1], [[4, 5]])
    assert ranks.tolist() == [17.0]
    m = ranking_metrics(ranks)
    assert m["hr_at_10"] == 0.0 and m["ndcg_at_10"] == 0.0
    assert m["ndcg_at_50"] == pytest.approx(1 / math.log2(18))
    assert m["mrr"] == pytest.approx(1 / 17)


@pytest.mark.parametrize(
    "value, rank",
    [
        (0.5, 2.0),
        (0.9, 3.0),
        (math.nan, 3.0),
    ],  # id 2 ties the target (pessimistic: above it); NaN counts as above
)
def test_a_tie_or_nan_competitor_ranks_above_the_target(value, rank):
    scores = torch.zeros(1, V)
    scores[0, 1] = 0.9  # target
    scores[0, 2] = 0.9
    scores[0, 3] = value
    assert _ranks(scores, [1], [[0]]).tolist() == [rank]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_target_score_is_a_miss(bad):
    scores = torch.randn(1, V)
    scores[0, 1] = bad
    assert _ranks(scores, [1], [[0]]).tolist() == [math.inf]


def test_seen_target_is_still_a_miss_and_seen_items_are_not_competitors():
    scores = torch.zeros(2, V)
    scores[:, 4] = 10.0  # seen by both users: never a competitor
    ranks = _ranks(scores + torch.arange(V) * 1e-3, [5, 4], [[4, 0], [4, 0]])
    assert ranks[1].item() == math.inf  # target in the history
    assert ranks[0].item() == 15.0  # ids 6..19 score above id 5, id 4 is seen: 14 competitors


def test_sharded_counting_matches_full_ranks_with_ties_and_nan():
    """evaluate_sharded counts per table shard; with ties and NaN it must agree with full_ranks."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (16, V), generator=g).float()  # many ties
    scores[torch.rand(16, V, generator=g) < 0.1] = math.nan
    target = torch.randint(1, V, (16,), generator=g)
    history = torch.randint(0, V, (16, 3), generator=g)
    expected = full_ranks(scores, target, history, torch.tensor([0]))
    target_score = scores.gather(1, target[:, None])[:, 0]
    counts = sum(_count_above(scores[:, lo : lo + 7], lo, target, target_score, history) for lo in (0, 7, 14))
    miss = (history == target[:, None]).any(1) | ~torch.isfinite(target_score)
    sharded = torch.where(miss, math.inf, counts.double() + 1)
    assert sharded.tolist() == expected.double().tolist()
    assert torch.isinf(expected).sum() > 0 and (expected[~torch.isinf(expected)] > 1).all()
