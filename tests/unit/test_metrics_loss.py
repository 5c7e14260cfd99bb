"""Metrics on hand-computed rankings; sampled-softmax values against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.loss import MASKED_LOGIT, Negatives, NegativeSampler, sampled_softmax_loss
from model.metrics import full_ranks, ranking_metrics
from model.recommender import SequenceOutput


def test_full_ranks_with_seen_filtering_by_hand():
    # items 0..5; id 0 is padding and never a candidate
    scores = torch.tensor(
        [
            [
                9.0,
                0.1,
                0.5,
                0.9,
                0.3,
                0.7,
            ],  # target 4 (0.3): beaten by 3, 5, 2 -> rank 4; history {3} -> rank 3
            [9.0, 0.1, 0.5, 0.9, 0.3, 0.7],  # target 3 (best) -> rank 1
            [9.0, 0.1, 0.5, 0.9, 0.3, 0.7],  # target 2, in the history -> filtered -> miss
        ]
    )
    target = torch.tensor([4, 3, 2])
    history = torch.tensor([[3, 0], [0, 0], [2, 5]])
    ranks = full_ranks(scores, target, history, exclude_ids=torch.tensor([0]))
    assert ranks[:2].tolist() == [3.0, 1.0]
    assert math.isinf(ranks[2].item())
    unfiltered = full_ranks(scores, target, None, exclude_ids=torch.tensor([0]))
    assert unfiltered.tolist() == [4.0, 1.0, 3.0]


def test_ranking_metrics_values():
    ranks = torch.tensor([1.0, 3.0, 12.0, 60.0, math.inf])
    m = ranking_metrics(ranks)
    assert m["hr_at_10"] == pytest.approx(2 / 5)
    assert m["hr_at_50"] == pytest.approx(3 / 5)
    assert m["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(4)) / 5)
    assert m["ndcg_at_50"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(13)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 60) / 5)
    assert all("@" not in k for k in m)


def _output(t=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    return norm(torch.randn(t, d, generator=g)), norm(torch.randn(t, d, generator=g))


def test_per_position_loss_matches_direct_computation_and_masks_positive():
    user, target = _output()
    target_ids = torch.tensor([5, 6, 7, 8])
    r = 3
    neg_ids = torch.tensor([[5, 1, 2], [3, 4, 9], [7, 7, 1], [2, 3, 4]])  # row 0 and 2 contain the positive
    negs = torch.nn.functional.normalize(
        torch.randn(4 * r, 6, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    from torchrec import JaggedTensor

    jt = JaggedTensor(values=neg_ids.flatten(), lengths=torch.tensor([r * 2, r * 2]))
    out = SequenceOutput(user, target, target_ids, negs, torch.tensor([2, 2]))
    loss = sampled_softmax_loss(out, Negatives("per_position", jt, neg_ids), temperature=0.05)
    expected = []
    for t in range(4):
        logits = [user[t] @ target[t] / 0.05]
        for k in range(r):
            nid = neg_ids[t, k].item()
            logits.append(
                torch.tensor(MASKED_LOGIT)
                if nid == target_ids[t].item()
                else user[t] @ negs[t * r + k] / 0.05
            )
        expected.append(-F.log_softmax(torch.stack(logits), 0)[0])
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_shared_loss_matches_direct_computation():
    user, target = _output(seed=2)
    target_ids = torch.tensor([5, 6, 7, 8])
    neg_ids = torch.tensor([6, 1, 2, 9])
    negs = torch.nn.functional.normalize(
        torch.randn(4, 6, generator=torch.Generator().manual_seed(3)), dim=-1
    )
    from torchrec import JaggedTensor

    jt = JaggedTensor(values=neg_ids, lengths=torch.tensor([4, 0]))
    out = SequenceOutput(user, target, target_ids, negs, torch.tensor([2, 2]))
    loss = sampled_softmax_loss(out, Negatives("shared", jt, neg_ids), temperature=0.05)
    logits = torch.cat([(user * target).sum(-1, keepdim=True), user @ negs.T], 1) / 0.05
    logits[1, 1] = MASKED_LOGIT  # position 1's positive (6) is the first shared negative
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))


def test_sampler_layouts_and_range():
    lengths = torch.tensor([3, 1, 2])
    g = torch.Generator().manual_seed(0)
    per = NegativeSampler(5, "per_position", 1, 10, dedup=False).sample(lengths, g)
    assert per.lookup.lengths().tolist() == [15, 5, 10] and per.ids.shape == (6, 5) and per.index is None
    assert torch.equal(per.lookup.values(), per.ids.flatten())
    assert int(per.ids.min()) >= 1 and int(per.ids.max()) < 10
    shared = NegativeSampler(5, "shared", 1, 10).sample(lengths, g)
    assert shared.lookup.lengths().tolist() == [5, 0, 0] and shared.ids.shape == (5,)
    with pytest.raises(ValueError, match="negative mode"):
        NegativeSampler(5, "in_batch", 1, 10)  # type: ignore[arg-type]


# dedup: every id drawn / by dense marks / by torch.unique
@pytest.mark.parametrize("catalogue", [6, 40, 100_000])
@pytest.mark.parametrize("dense_ratio", [32, 0])  # score by matmul + gather / gather the vectors
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 400])  # fused loss in one chunk / in many
def test_deduplicated_per_position_negatives_equal_the_as_sampled_layout(
    catalogue, dense_ratio, chunk_bytes, monkeypatch
):
    """The same draws, looked up once per distinct id (the fused loss): the same ids, loss and gradients."""
    import model.loss

    monkeypatch.setattr(model.loss, "DENSE_SCORE_RATIO", dense_ratio)
    monkeypatch.setattr(model.loss, "CHUNK_BYTES", chunk_bytes)
    lengths = torch.tensor([7, 3, 5])
    t, r, d = int(lengths.sum()), 6, 8
    plain = NegativeSampler(r, "per_position", 1, catalogue, dedup=False).sample(
        lengths, torch.Generator().manual_seed(4)
    )
    dedup = NegativeSampler(r, "per_position", 1, catalogue).sample(lengths, torch.Generator().manual_seed(4))
    assert torch.equal(plain.ids, dedup.ids)
    distinct = dedup.lookup.values()
    assert torch.equal(distinct, torch.unique(plain.ids)) and dedup.lookup.lengths().tolist() == [
        distinct.numel(),
        0,
        0,
    ]
    assert torch.equal(distinct[dedup.index], dedup.ids)
    g = torch.Generator().manual_seed(5)
    table = torch.randn(catalogue, d, generator=g)
    user0, target = _output(t, d, seed=6)
    target_ids = torch.randint(1, catalogue, (t,), generator=g)
    target_ids[0] = plain.ids[0, 2]  # one collision, masked in both layouts
    results = []
    for negs in (plain, dedup):
        user = user0.clone().requires_grad_(True)
        target_leaf = target.clone().requires_grad_(True)
        weights = table.clone().requires_grad_(True)
        rows = F.normalize(weights[negs.lookup.values()], dim=-1)
        loss = sampled_softmax_loss(SequenceOutput(user, target_leaf, target_ids, rows, lengths), negs, 0.05)
        (3.0 * loss).backward()  # an upstream gradient other than 1 reaches the fused backward
        results.append((loss.detach(), user.grad, target_leaf.grad, weights.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in results[0][1:])
    with torch.no_grad():  # no gradient wanted: the fused loss skips the gradient work, same value
        rows = F.normalize(table[dedup.lookup.values()], dim=-1)
        value = sampled_softmax_loss(SequenceOutput(user0, target, target_ids, rows, lengths), dedup, 0.05)
    torch.testing.assert_close(value, results[0][0], rtol=1e-5, atol=1e-6)
