"""Named presets: functions returning a full `TrainConfig` (`fuxi presets` lists them).

The official gin files (section 4.3 of the reference), the tuned ML-100K recipes, the CPU demo and the
test preset; "auto" is the generic recipe sized by the data (pipeline/train/recipe.py), one per
architecture (`--set model.architecture=A` picks A's, `resolve_config`):
  fuxi     FuXi-alpha's `fuxi tune` study on ML-100K (3 blocks, dropout ~0.47, lr 1.77e-3, exact softmax)
  hstu     HSTU's own study on ML-100K, whose best trial is the same point as FuXi-alpha's
  sasrec   no tuned levers beat its untuned ones on validation: the official ML-1M gin levers of the
           HSTU / FuXi-alpha code's SASRec (2 blocks, dropout 0.2, lr 1e-3, 128 sampled negatives)
  llama    its own study's best trial tied its untuned levers on validation: the official ML-1M levers
           (the FuXi-alpha paper trains its LLaMa baseline so)
  esasrec  its own study on ML-100K, from the eSASRec paper's ML-1M settings (d 64, SwiGLU x4): 4 blocks,
           dropout ~0.15-0.22, lr 4.7e-3 on a cosine schedule, exact softmax (256 sampled negatives above
           6,400 items)
A named preset given `--data` reads the item count of that data (`model.num_items`, what a run sizes its
table by); its other values are its recipe's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from model.config import ModelConfig
from pipeline.data.sequences import item_rows
from pipeline.data.synthetic import SyntheticConfig
from pipeline.train.config import DataConfig, LossConfig, TrainConfig, apply_overrides
from pipeline.train.recipe import RECIPES, auto_config

AUTO = "auto"  # the generic recipe, sized by the data (pipeline/train/recipe.py)


def ml_1m() -> TrainConfig:
    """fuxi-sampled-softmax-n128-final.gin: 2 blocks, d=50, 1 head, 128 per-position negatives."""
    return TrainConfig(
        name="ml-1m",
        model=ModelConfig(num_items=3953),
        data=DataConfig(source="data/ml-1m.parquet", protocol="anchor"),
        loss=LossConfig(num_negatives=128, negatives="per_position"),
        epochs=101,
    )


def ml_1m_large() -> TrainConfig:
    cfg = ml_1m()
    cfg.name = "ml-1m-large"
    cfg.model = dataclasses.replace(cfg.model, num_layers=8, num_heads=2, dqk=25, dv=25)
    return cfg


def ml_20m() -> TrainConfig:
    cfg = ml_1m()
    cfg.name = "ml-20m"
    cfg.data.source = "data/ml-20m.parquet"
    cfg.model = ModelConfig(num_items=131263, embedding_dim=256, num_heads=4, dqk=64, dv=64, ffn_multiply=4)
    return cfg


def ml_20m_large() -> TrainConfig:
    cfg = ml_20m()
    cfg.name = "ml-20m-large"
    cfg.model = dataclasses.replace(cfg.model, num_layers=8, num_heads=8, dqk=32, dv=32)
    return cfg


def kuairand() -> TrainConfig:
    """Paper section 6.1.4: hidden 50, 128 negatives, the rest as HSTU's ML-1M settings."""
    cfg = ml_1m()
    cfg.name = "kuairand"
    cfg.data.source = "data/kuairand-1k.parquet"
    cfg.model = ModelConfig(num_items=2, embedding_dim=50)  # num_items is read from the data file
    return cfg


def kuairand_large() -> TrainConfig:
    cfg = kuairand()
    cfg.name = "kuairand-large"
    cfg.model = dataclasses.replace(cfg.model, num_layers=8, num_heads=2, dqk=25, dv=25)
    return cfg


def ml_100k() -> TrainConfig:
    """The ML-1M settings on MovieLens-100K (anchor-measurements.md)."""
    cfg = ml_1m()
    cfg.name = "ml-100k"
    cfg.data.source = "data/ml-100k.parquet"
    cfg.model.num_items = 1683
    return cfg


def _ml_100k_tuned(architecture: str) -> TrainConfig:
    cfg = ml_100k()
    cfg.name = f"ml-100k-{architecture}"
    cfg.data.protocol = "validated"
    # the studies' 50 epochs ended with validation still rising on every seed; 100 epochs with patience
    # 20 (10 stopped an HSTU seed in the plateau near epochs 15-25) won on validation (docs/QUALITY.md)
    cfg.epochs, cfg.patience = 100, 20
    recipe = RECIPES[architecture]  # the architecture's own levers (recipe.py says where each comes from)
    cfg.model = dataclasses.replace(cfg.model, architecture=architecture, **recipe.width)
    cfg = recipe.levers.apply(cfg)
    cfg.loss = dataclasses.replace(cfg.loss, num_negatives=recipe.num_negatives)
    return cfg


def ml_100k_fuxi() -> TrainConfig:
    """FuXi-alpha's tuned recipe on ML-100K (docs/QUALITY.md), validated protocol."""
    return _ml_100k_tuned("fuxi")


def ml_100k_hstu() -> TrainConfig:
    """HSTU's tuned recipe on ML-100K, the same search as FuXi-alpha's."""
    return _ml_100k_tuned("hstu")


def ml_100k_sasrec() -> TrainConfig:
    """SASRec's tuned recipe on ML-100K, the same search as FuXi-alpha's."""
    return _ml_100k_tuned("sasrec")


def ml_100k_esasrec() -> TrainConfig:
    """eSASRec's tuned recipe on ML-100K (arXiv 2508.06450; model/esasrec.py): the same search as the
    others, from its paper's ML-1M settings (d 64, one head, SwiGLU x4)."""
    return _ml_100k_tuned("esasrec")


def cpu_demo() -> TrainConfig:
    """The main job: FuXi-alpha on the embedded synthetic data, a few minutes on 2 CPU cores."""
    return TrainConfig(
        name="cpu-demo",
        model=ModelConfig(num_items=2, max_sequence_length=100, padded_length=111),
        data=DataConfig(source="synthetic", protocol="validated"),
        loss=LossConfig(num_negatives=128, negatives="shared"),
        epochs=8,
    )


def tiny() -> TrainConfig:
    """Seconds-long runs for tests and smoke checks."""
    cfg = cpu_demo()
    cfg.name = "tiny"
    cfg.data.synthetic = SyntheticConfig(
        num_users=200, num_items=200, num_themes=10, mean_length=20, max_length=60
    )
    cfg.model = dataclasses.replace(
        cfg.model, embedding_dim=16, dqk=16, dv=16, max_sequence_length=50, padded_length=61
    )
    cfg.loss.num_negatives = 32
    cfg.batch_size = 64
    cfg.epochs = 2
    cfg.progress = False
    # tests compare runs number for number (resumed against uninterrupted, 1 rank against 2): one fixed
    # precision, not a choice timed on a shared machine (amp=auto is tested on its own)
    cfg.amp = "none"
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "cpu-demo": cpu_demo,
    "tiny": tiny,
    "ml-100k": ml_100k,
    "ml-100k-fuxi": ml_100k_fuxi,
    "ml-100k-hstu": ml_100k_hstu,
    "ml-100k-sasrec": ml_100k_sasrec,
    "ml-100k-esasrec": ml_100k_esasrec,
    "ml-1m": ml_1m,
    "ml-1m-large": ml_1m_large,
    "ml-20m": ml_20m,
    "ml-20m-large": ml_20m_large,
    "kuairand": kuairand,
    "kuairand-large": kuairand_large,
}


def get_preset(name: str, data: str | None = None, architecture: str | None = None) -> TrainConfig:
    """A named preset reading `data` when given (its `model.num_items` then that data's); "auto" is
    `architecture`'s generic recipe (default FuXi-alpha's) sized by the sequence file `data` (and reads it).
    `architecture` only chooses the auto recipe: a named preset's is set by overriding it."""
    if name == AUTO:
        return auto_config(data, architecture or "fuxi")
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS) + [AUTO]}")
    cfg = PRESETS[name]()
    if data and data != "synthetic":
        cfg.data.source = data
        cfg.model = dataclasses.replace(cfg.model, num_items=item_rows(data))
    elif data:
        cfg.data.source = data
    return cfg


def overridden_architecture(overrides: list[str]) -> str | None:
    """The value of the last `model.architecture=...` override, if any."""
    found = None
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and key.strip() == "model.architecture":
            found = value.strip()
    return found


def resolve_config(name: str, data: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """`get_preset` + the overrides, as `fuxi train` / `presets --show` / tune / sweep resolve them: with
    "auto", an overridden `model.architecture` picks that architecture's own generic recipe."""
    overrides = list(overrides or [])
    architecture = overridden_architecture(overrides) if name == AUTO else None
    if architecture not in RECIPES:  # not an architecture: the override below fails, naming the field
        architecture = None
    return apply_overrides(get_preset(name, data, architecture), overrides)
