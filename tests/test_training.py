"""Training on the embedded synthetic data must learn more than item popularity.

The generator (pipeline/data/synthetic.py) gives every user a long-term taste theme and makes the theme of the
next item depend on the time gap before it; items inside a theme follow a power law, so popularity alone
is a strong baseline (NDCG@10 0.150 on this split). A sequence model has to find the user's theme to beat
it. Measured with this setting (per-position negatives, fast kernels, 40 epochs, test NDCG@10):
  seed 0: FuXi-alpha 0.284, SASRec 0.249, FuXi-alpha without the temporal channel 0.281
  seed 1: FuXi-alpha 0.274, SASRec 0.293, FuXi-alpha without the temporal channel 0.284
  (this test runs seed 0; seed 1 is the same code with cfg.seed = 1)
The test asserts what held for every seed tried, with a margin: each model beats popularity by >= 0.05.
Which model wins is not asserted: the order changes with the seed at this budget (3 models x 2 seeds,
spread ~0.04), and so does the gain of the temporal channel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.data.synthetic import SyntheticConfig
from pipeline.train.evaluate import evaluate
from pipeline.train.presets import tiny
from pipeline.train.run import build_batches, load_data, run


def _config(**model_overrides):
    cfg = tiny()
    cfg.tracking.enabled = False
    cfg.seed = 0
    cfg.epochs = 40
    cfg.batch_size = 32
    cfg.loss.negatives = "per_position"
    cfg.data.synthetic = SyntheticConfig(
        num_users=500, num_items=200, num_themes=10, mean_length=20, max_length=60, seed=0
    )
    cfg.model = dataclasses.replace(cfg.model, kernel="fast", length_buckets=4, **model_overrides)
    return cfg


class _Popularity(torch.nn.Module):
    """Ranks items by their count in the training histories, through the same evaluation code."""

    def __init__(self, counts: torch.Tensor) -> None:
        super().__init__()
        self.counts = counts

    def encode_last(self, seq) -> torch.Tensor:
        return torch.ones(seq["item_id"].lengths().numel(), 1)

    def normalized_item_embeddings(self) -> torch.Tensor:
        return self.counts[:, None]


def popularity_ndcg(cfg) -> float:
    data = load_data(cfg)
    splits = build_batches(cfg, data)
    counts = torch.zeros(data.num_items)
    for batch in splits["train"].epoch():
        counts += torch.bincount(batch.seq["item_id"].values(), minlength=data.num_items).float()
    return evaluate(_Popularity(counts), splits["test"].epoch())["ndcg_at_10"]


@pytest.mark.slow
def test_models_learn_more_than_popularity(tmp_path):
    results = {}
    for name, overrides in [
        ("fuxi", {}),
        ("sasrec", {"architecture": "sasrec"}),
        ("no_time", {"channels": ("pos", "sem")}),
    ]:
        cfg = _config(**overrides)
        cfg.output_dir = str(tmp_path / name)
        results[name] = run(cfg)
    losses = [h["train_loss"] for h in results["fuxi"]["history"]]
    assert losses[-1] < losses[0] - 1.0  # the loss curve falls
    ndcg = {name: r["test"]["ndcg_at_10"] for name, r in results.items()}
    popularity = popularity_ndcg(_config())
    assert 0.12 < popularity < 0.18, popularity  # the baseline is the one the docstring describes
    for name, value in ndcg.items():
        assert value > popularity + 0.05, (name, ndcg, popularity)


def test_dropout_and_negative_streams_are_independent():
    """step_seed gives each (seed, step, rank) two different streams: seeded alike, the dropout generator
    and the negatives generator would draw the same numbers."""
    import torch

    from pipeline.train.trainer import NEGATIVES_STREAM, step_seed

    assert step_seed(3, 7, 0) == step_seed(3, 7, 0)  # a pure function: resuming needs no generator state
    assert step_seed(3, 7, 0) != step_seed(3, 7, 0, NEGATIVES_STREAM)
    assert len({step_seed(3, k, r) for k in range(50) for r in range(4)}) == 200
    a = torch.Generator().manual_seed(step_seed(3, 7, 0))
    b = torch.Generator().manual_seed(step_seed(3, 7, 0, NEGATIVES_STREAM))
    assert not torch.equal(
        torch.randint(1 << 30, (64,), generator=a), torch.randint(1 << 30, (64,), generator=b)
    )
