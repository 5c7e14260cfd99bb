"""The genuine artifacts the red-team corpus mutates: a checkpoint folder (tiny FuXi-alpha, 200 items, its
weights as built: serving checks need no training), its vocabulary (raw ids 1001..1200 -> rows 1..200),
its HNSW item index, and the model folder `fuxi register` would log around it.

    ckpt = genuine_checkpoint(tmp / "root")           # root/gen-<time>-<id>/, named by the pointer root/final
    model = genuine_model_folder(ckpt, tmp / "model")   # MLmodel + data/<name>/
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

NUM_ITEMS = 201  # rows of the table: padding row 0 + 200 items
RAW_IDS = list(range(1001, 1201))  # the vocabulary's raw id of row r is 1000 + r


class Payload:
    """Unpickling this creates `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def tiny_config():
    from pipeline.train.presets import tiny

    cfg = tiny()
    cfg.model = dataclasses.replace(cfg.model, num_items=NUM_ITEMS)
    return cfg


def write_vocab(path: Path, raw_ids: list, rows: list | None = None) -> Path:
    """A vocabulary Parquet of `raw_ids` with `rows` (default 1..N), in the project's schema."""
    import pyarrow.parquet as pq

    from pipeline.data.vocab import vocab_schema

    n = len(raw_ids)
    key = "string" if raw_ids and isinstance(raw_ids[0], str) else "int64"
    table = pa.table(
        {
            "raw_id": pa.array(raw_ids, pa.string() if key == "string" else pa.int64()),
            "row": pa.array(rows if rows is not None else list(range(1, n + 1)), pa.int64()),
            "first_day": ["2024-01-01"] * n,
            "first_timestamp": pa.array([1_700_000_000] * n, pa.int64()),
            "count": pa.array([5] * n, pa.int64()),
            "admitted_day": ["2024-01-01"] * n,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.cast(vocab_schema(key)), path)  # as write_vocabulary would, without its checks
    return path


def save_checkpoint(root: Path, cfg, state_dict: dict, trainer: dict | None = None) -> Path:
    """`final` of a run root, as the trainer's Checkpointer writes it."""
    from pipeline.train.checkpoint import Checkpointer

    meta = {"config": dataclasses.asdict(cfg), "trainer": trainer or {"step": 8, "epoch": 1, "history": []}}
    return Path(Checkpointer(root).save_named("final", {"model": state_dict}, meta))  # the generation folder


def genuine_checkpoint(root: Path) -> Path:
    """A complete checkpoint folder with vocabulary and item index; returns the folder (the generation that
    root/final names)."""
    import warnings

    from model.recommender import build_model
    from serving.item_index import index_checkpoint
    from serving.loading import load_checkpoint_model

    cfg = tiny_config()
    model = build_model(cfg.model, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = save_checkpoint(root, cfg, model.state_dict())
    write_vocab(folder / "vocab.parquet", RAW_IDS)
    index_checkpoint(load_checkpoint_model(folder), kind="hnsw", m=8, ef_construction=40)
    return folder


def genuine_model_folder(checkpoint: Path, dest: Path) -> Path:
    """The model folder `registry.register` logs (MLflow's save_model with the same arguments)."""
    import warnings

    import mlflow.pyfunc

    from serving.registry import LOADER_MODULE, _signature

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no input example"
        mlflow.pyfunc.save_model(
            str(dest),
            loader_module=LOADER_MODULE,
            data_path=str(checkpoint),
            signature=_signature("long"),
            pip_requirements=["torch"],
        )
    return dest


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def payload_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def write_json(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc))


def table_vectors(checkpoint: Path) -> np.ndarray:
    from serving.loading import load_checkpoint_model

    return load_checkpoint_model(checkpoint).item_vectors().numpy()
