"""A training run under a token budget (data.batch_tokens) takes the steps its batch plan counts (the
plan itself: tests/unit/test_sequences.py)."""

from __future__ import annotations


def test_training_with_a_token_budget_takes_the_planned_steps(tmp_path):
    from pipeline.train.presets import tiny
    from pipeline.train.run import build_batches, load_data, run

    cfg = tiny()
    cfg.tracking.enabled = False
    cfg.output_dir = str(tmp_path / "runs")
    cfg.data.batch_tokens = 300
    cfg.epochs = 3
    report = run(cfg)
    train = build_batches(cfg, load_data(cfg))["train"]
    assert train.batch_tokens == 300
    assert report["steps"] == sum(len(train._global_batches(e)) for e in range(3))
    losses = [h["train_loss"] for h in report["history"]]
    assert losses[0] > losses[1] > losses[2]
