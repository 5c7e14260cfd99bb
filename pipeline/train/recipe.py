"""The generic recipe: a full config for a data set no preset was written for, sized by its users,
items and history lengths (no per-data-set tuning), one per architecture.

`fuxi train --data X` without `--preset` uses it (also `--preset auto`); `--set model.architecture=A`
picks A's own recipe (`RECIPES[A]`, resolved by `pipeline.train.presets.resolve_config`), never another
model's tuned levers: depth, dropout, optimiser and width are the architecture's (its `fuxi tune` study on
ML-100K where that beat its untuned levers, else its published ML-1M settings; each entry says which); what
depends on the data is sized from its shape, the same rules for every architecture:
- history kept: the 95th percentile of the lengths, rounded up to 10, in [20, 200] (200: official);
- negatives (recipes whose levers chose the exact softmax): every item while the catalogue is small enough
  that its logits cost no more than 128 sampled negatives per position (`FULL_SOFTMAX_MAX_ITEMS`), else
  128 per position; recipes with sampled negatives keep their count;
- training length: a step budget, not an epoch count: enough epochs for `TARGET_STEPS` optimizer
  steps (at least `MIN_EPOCHS`, at most `MAX_EPOCHS`), with early stopping on validation.
Every value can still be overridden with `--set`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np

from model.config import Architecture, ModelConfig
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
    schedule: Literal["constant", "cosine"] = "constant"

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        cfg.optim = dataclasses.replace(
            cfg.optim,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
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
FUXI_ML_100K = TunedLevers(  # FuXi-alpha's best trial; HSTU's own study chose the same trial
    lr=0.0017692,
    warmup_steps=20,
    weight_decay=0.01,
    num_layers=3,
    input_dropout=0.4855,
    linear_dropout=0.4567,
    negatives="full",
)
# eSASRec's study (ml100k-esasrec), from its paper's ML-1M settings (arXiv 2508.06450 and its RecTools
# code: 2 LiGR blocks, dropout 0.1, Adam lr 1e-3, 256 uniform negatives, d 64, one head, SwiGLU x4):
# trial 5 of 6, valid NDCG@10 0.1149 at 50 epochs (its trial 2, 3 blocks at dropout 0.35: 0.1136)
# against the paper settings' 0.1055 at 100 epochs (seed 0)
ESASREC_ML_100K = TunedLevers(
    lr=0.0047362,
    warmup_steps=30,
    weight_decay=0.0,
    num_layers=4,
    input_dropout=0.2185,
    linear_dropout=0.1481,
    negatives="full",
    schedule="cosine",
)

# The official ML-1M gin files' levers (the HSTU / FuXi-alpha code's `*-sampled-softmax-n128-final.gin`,
# the same for its SASRec, HSTU and FuXi-alpha runs): 2 blocks, dropout 0.2, AdamW lr 1e-3 with no
# warm-up or decay, 128 sampled negatives per position. The `ml-1m` / `ml-100k` presets train with them.
OFFICIAL_ML_1M = TunedLevers(
    lr=1e-3,
    warmup_steps=0,
    weight_decay=0.0,
    num_layers=2,
    input_dropout=0.2,
    linear_dropout=0.2,
    negatives="per_position",
)
# the eSASRec paper's width (its study searched the levers, not the width)
ESASREC_WIDTH = {"embedding_dim": 64, "num_heads": 1, "dqk": 64, "dv": 64, "ffn_multiply": 4.0}


@dataclass(frozen=True)
class Recipe:
    """One architecture's generic recipe: its levers, its width (ModelConfig fields; empty: the defaults,
    d = 50 as the official ML-1M configs) and its sampled-negative count, and where they come from."""

    levers: TunedLevers
    source: str
    width: dict[str, Any] = field(default_factory=dict)
    num_negatives: int = 128


RECIPES: dict[str, Recipe] = {
    # each study: 6 trials, seed 0, 50 epochs (docs/QUALITY.md). FuXi-alpha trial 0, valid NDCG@10 0.1313;
    # HSTU the same point, 0.1201; SASRec's best 0.0888 below its untuned 0.0991 (3 seeds); LLaMa's best
    # (trial 5, eSASRec's point) 0.1201 ties its untuned 0.1196 ± 0.0017 (0.1206 on seed 0), which train
    # 3.5x faster: SASRec and LLaMa keep the official levers
    "fuxi": Recipe(FUXI_ML_100K, "FuXi-alpha's fuxi tune study on ML-100K (docs/QUALITY.md)"),
    "hstu": Recipe(FUXI_ML_100K, "HSTU's own fuxi tune study on ML-100K (it chose FuXi-alpha's trial 0)"),
    "sasrec": Recipe(
        OFFICIAL_ML_1M,
        "SASRec's official ML-1M levers (its ML-100K study found nothing better on validation)",
    ),
    "llama": Recipe(
        OFFICIAL_ML_1M,
        "the official ML-1M levers (the FuXi-alpha paper's LLaMa baseline; its ML-100K study tied them)",
    ),
    "esasrec": Recipe(
        ESASREC_ML_100K,
        "eSASRec's own fuxi tune study on ML-100K, from its paper's ML-1M settings (d 64, SwiGLU x4)",
        ESASREC_WIDTH,
        num_negatives=256,
    ),
}
assert set(RECIPES) == set(get_args(Architecture)), "every architecture needs its own generic recipe"


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


def generic(shape: DataShape, source: str, architecture: str = "fuxi") -> TrainConfig:
    """The generic recipe of `architecture` for a data set of this shape, reading `source`."""
    if architecture not in RECIPES:
        raise ValueError(f"model.architecture: no recipe for {architecture!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[architecture]
    max_len = int(min(200, max(20, math.ceil(shape.p95_length / 10) * 10)))
    steps_per_epoch = max(1, math.ceil(shape.users / BATCH_SIZE))
    epochs = int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch))))
    cfg = recipe.levers.apply(
        TrainConfig(
            name="auto",
            model=ModelConfig(
                architecture=cast(Architecture, architecture),  # checked above
                num_items=shape.items,
                max_sequence_length=max_len,
                padded_length=max_len + 11,  # the official N = length + 10 output slots + 1
                **recipe.width,
            ),
            data=DataConfig(source=source, protocol="validated"),
            batch_size=BATCH_SIZE,
            epochs=epochs,
            patience=PATIENCE,
        )
    )
    negatives = recipe.levers.negatives
    if negatives == "full" and shape.items > FULL_SOFTMAX_MAX_ITEMS:  # too many logits: sample instead
        negatives = "per_position"
    cfg.loss = LossConfig(num_negatives=recipe.num_negatives, negatives=negatives)
    return cfg


def auto_config(source: str | None, architecture: str = "fuxi") -> TrainConfig:
    """`--preset auto`: `architecture`'s generic recipe sized by the data file at `source`."""
    if not source or source == "synthetic":
        raise ValueError("preset 'auto' sizes the recipe from the data: name a sequence file with --data")
    return generic(data_shape(source), source, architecture)
