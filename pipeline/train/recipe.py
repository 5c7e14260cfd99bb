"""The generic recipe: a full config for a data set no preset was written for, sized by its users,
items and history lengths (no per-data-set tuning).

`fuxi train --data X` without `--preset` uses it (also `--preset auto`). Depth, dropout and the
optimiser are FuXi-alpha's tuned ML-100K recipe (`TUNED_ML_100K["fuxi"]`, docs/QUALITY.md: 3
blocks, dropout ~0.47, AdamW lr 1.77e-3 with 20 warm-up steps and weight decay 0.01); what depends on the
data is sized from its shape:
- history kept: the 95th percentile of the lengths, rounded up to 10, in [20, 200] (200: official);
- negatives: every item (the exact softmax) while the catalogue is small enough that its logits cost
  no more than 128 sampled negatives per position (`FULL_SOFTMAX_MAX_ITEMS`), else 128 per position;
- training length: a step budget, not an epoch count: enough epochs for `TARGET_STEPS` optimizer
  steps (at least `MIN_EPOCHS`, at most `MAX_EPOCHS`), with early stopping on validation.
Every value can still be overridden with `--set`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.config import ModelConfig
from pipeline.train.config import DataConfig, LossConfig, TrainConfig

BATCH_SIZE = 128
TARGET_STEPS = 800
MIN_EPOCHS, MAX_EPOCHS = 50, 200
# evaluations (one per epoch) without a better valid NDCG@10; 10 stopped an ML-100K seed in the plateau
# these recipes cross near epoch 15-25 (docs/QUALITY.md)
PATIENCE = 20
# exact softmax up to here: [positions, items] logits cost about what [positions, 128] sampled
# embeddings of width 50 cost (128 * 50 = 6,400), and beat them on ML-100K's validation split
FULL_SOFTMAX_MAX_ITEMS = 6400


@dataclass(frozen=True)
class TunedLevers:
    """The levers a `fuxi tune` study chose for one model (the rest of the preset stays)."""

    lr: float
    warmup_steps: int
    weight_decay: float
    num_layers: int
    input_dropout: float
    linear_dropout: float
    negatives: Literal["per_position", "shared", "full"]

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        cfg.optim = dataclasses.replace(
            cfg.optim, lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay
        )
        cfg.model = dataclasses.replace(
            cfg.model,
            num_layers=self.num_layers,
            input_dropout=self.input_dropout,
            linear_dropout=self.linear_dropout,
        )
        cfg.loss = dataclasses.replace(cfg.loss, negatives=self.negatives)
        return cfg


# Each model's recipe on full ML-100K (validated protocol, 100 epochs): the better on
# validation NDCG@10 of its untuned ml-100k levers and the best trial of its `fuxi tune` study (one search
# space for all three, benchmarks/tune_space_recipe.yaml, 6 trials each; docs/QUALITY.md). Test numbers
# were read once, after choosing. None: the untuned levers.
FUXI_ML_100K = TunedLevers(  # FuXi-alpha's best trial, also HSTU's
    lr=0.0017692,
    warmup_steps=20,
    weight_decay=0.01,
    num_layers=3,
    input_dropout=0.4855,
    linear_dropout=0.4567,
    negatives="full",
)
TUNED_ML_100K: dict[str, TunedLevers | None] = {
    "fuxi": FUXI_ML_100K,  # trial 0 of 6 (study ml100k-fuxi): valid NDCG@10 0.1313
    "hstu": FUXI_ML_100K,  # trial 0 of 6 (study ml100k-hstu): valid NDCG@10 0.1201
    # the study's best (trial 1, valid NDCG@10 0.0888) is below the untuned recipe's 0.0991 (3 seeds):
    # SASRec keeps the ml-100k levers
    "sasrec": None,
    "esasrec": None,  # not in the studies: its preset takes the eSASRec paper's settings (presets.py)
}


@dataclass(frozen=True)
class DataShape:
    users: int
    items: int  # rows of the item table (max id + 1)
    mean_length: float
    p95_length: int

    def describe(self) -> str:
        return (
            f"{self.users} users, {self.items - 1} items, mean history {self.mean_length:.1f} "
            f"(p95 {self.p95_length})"
        )


def data_shape(source: str) -> DataShape:
    from pipeline.data.sequences import read_sequences

    data = read_sequences(source)
    lengths = data.lengths()
    if data.num_users == 0:
        raise ValueError(f"{source}: no users, nothing to size a recipe from")
    return DataShape(
        users=data.num_users,
        items=data.num_items,
        mean_length=float(lengths.mean()),
        p95_length=int(np.percentile(lengths, 95)),
    )


def generic(shape: DataShape, source: str) -> TrainConfig:
    """The generic FuXi-alpha recipe for a data set of this shape, reading `source`."""
    max_len = int(min(200, max(20, math.ceil(shape.p95_length / 10) * 10)))
    steps_per_epoch = max(1, math.ceil(shape.users / BATCH_SIZE))
    epochs = int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch))))
    full = shape.items <= FULL_SOFTMAX_MAX_ITEMS
    # depth, dropout, optimiser: FuXi-alpha's tuned recipe; the negatives are sized from the data
    cfg = FUXI_ML_100K.apply(
        TrainConfig(
            name="auto",
            model=ModelConfig(
                num_items=shape.items,
                max_sequence_length=max_len,
                padded_length=max_len + 11,  # the official N = length + 10 output slots + 1
            ),
            data=DataConfig(source=source, protocol="validated"),
            batch_size=BATCH_SIZE,
            epochs=epochs,
            patience=PATIENCE,
        )
    )
    cfg.loss = LossConfig(num_negatives=128, negatives="full" if full else "per_position")
    return cfg


def auto_config(source: str | None) -> TrainConfig:
    """`--preset auto`: the generic recipe sized by the data file at `source`."""
    if not source or source == "synthetic":
        raise ValueError("preset 'auto' sizes the recipe from the data: name a sequence file with --data")
    return generic(data_shape(source), source)
