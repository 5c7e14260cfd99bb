"""The fast recipe trains the same model as the reference recipe through `run` (the kernels themselves:
tests/unit/test_fast_paths.py)."""

from __future__ import annotations

import dataclasses

import pytest


@pytest.mark.parametrize("arch", ["fuxi", "hstu"])
def test_training_run_fast_recipe_equals_reference_recipe(tmp_path, arch):
    """`run` (1-rank DMP + FSDP2, the path every job takes) with the fast recipe (fast kernels, jagged
    length groups, de-duplicated per-position negatives) trains the same model as the reference recipe
    (reference kernels, padded batches, negatives looked up as sampled). Dropout is off: the fast path draws
    its masks differently. Catches a fast path that bypasses module hooks (FSDP2 unshards parameters in
    forward pre-hooks) or a loss layout that changes the gradient."""
    from pipeline.train.presets import tiny
    from pipeline.train.run import run

    def train(amp="none", **overrides):
        cfg = tiny()
        cfg.tracking.enabled = False
        cfg.output_dir = str(tmp_path / "runs")
        cfg.model = dataclasses.replace(
            cfg.model, architecture=arch, input_dropout=0.0, linear_dropout=0.0, **overrides
        )
        cfg.loss.negatives = "per_position"
        cfg.loss.dedup_negatives = overrides.get("kernel") == "fast"
        cfg.amp = amp
        return run(cfg)

    ref = train(kernel="reference", length_buckets=0)
    fast = train(kernel="fast", length_buckets=4)
    losses = lambda r: [h["train_loss"] for h in r["history"]]  # noqa: E731
    assert losses(fast) == pytest.approx(losses(ref), rel=1e-4)
    assert fast["test"]["ndcg_at_10"] == pytest.approx(ref["test"]["ndcg_at_10"], abs=1e-4)
    # amp=bf16 (matmuls in bf16, fused loss included): the same training within bf16 rounding
    bf16 = train(amp="bf16", kernel="fast", length_buckets=4)
    assert losses(bf16) == pytest.approx(losses(fast), rel=5e-3)  # measured: <= 4e-4
    assert losses(bf16) != losses(fast)  # autocast was really on
