"""Warm start into a grown item table (pipeline/train/grow.py).

A tiny run trains one epoch with N_old rows (row_wise, fused row-wise Adagrad) on 1 rank here and on 2
gloo ranks under torchrun; each leaves a training checkpoint (model + optimizer). Models with
N_new = N_old + 131 rows (the row-wise shard boundaries move: ~N/2 per rank) are warm-started from them:
on 2 ranks (row_wise and table_wise, from both checkpoints) and on 1 rank (from the 2-rank checkpoint).
column_wise (2 ranks) and data_parallel (1 rank) grow from checkpoints whose state is set by hand.
Every grown state is saved with DCP and read back here as full tensors, next to the checkpoint's and a
cold-start model's: rows [0, N_old) of the table and of its per-row optimizer state must be bit-equal
to the checkpoint's, rows [N_old, N_new) to the cold start's, the dense weights and their AdamW state to
the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.distributed import run_recorded, torchrun

GROWTH = 131  # rows added; moves the 2-rank row-wise boundary from ~N_old/2 to ~(N_old + 131)/2


def train_config(run_dir: str, world_size: int) -> Any:
    from pipeline.train.presets import tiny

    cfg = tiny()
    cfg.epochs = 1
    cfg.batch_size = 64 // world_size
    cfg.parallel.sharding_types = ("row_wise",)
    cfg.parallel.embedding_optimizer = "rowwise_adagrad"
    cfg.optim.lr, cfg.parallel.embedding_lr = 5e-3, 0.05
    cfg.tracking.enabled = False
    cfg.tracking.log_every_steps = 1
    cfg.checkpoint_every_epochs = 1
    cfg.run_dir = run_dir
    return cfg


def training_checkpoint(run_dir: str) -> Path:
    from pipeline.train.checkpoint import Checkpointer

    path = Checkpointer(Path(run_dir) / "checkpoints").latest()
    assert path is not None
    return Path(path)


def grow_and_save(ckpt: Path | None, num_items: int, kind: str, out: Path) -> None:
    """Every rank: a cold-start model with num_items rows, warm-started from ckpt (None: left cold), its
    model + optimizer state saved with DCP under out/state."""
    from pipeline.train.builder import build_parallel_model
    from pipeline.train.checkpoint import Checkpointer, read_meta
    from pipeline.train.config import TrainConfig, from_dict
    from pipeline.train.grow import warm_start

    cfg = train_config("", 1)
    if ckpt is not None:
        cfg = from_dict(TrainConfig, read_meta(ckpt)["config"])
    cfg.parallel.sharding_types = (kind,)
    model_cfg = dataclasses.replace(cfg.model, num_items=num_items)
    pm = build_parallel_model(model_cfg, cfg.parallel, cfg.optim, torch.device("cpu"), cfg.seed)
    if ckpt is None:
        pm.init_optimizer_state()
    else:
        warm_start(pm.dmp, ckpt, pm.optimizer, pm.init_optimizer_state)
    Checkpointer(out).save_named(
        "state",
        {"model": pm.dmp.state_dict(), "optim": pm.optimizer.state_dict()},
        meta={"sharding": pm.table_sharding()},
    )


def full_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (a folder, or a pointer such as <out>/state) as one full plain
    tensor (read in this process, no group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pipeline.train.checkpoint import resolve_checkpoint

    path = Path(resolve_checkpoint(path))

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(path))
    return state


def assert_grown(
    old: dict[str, torch.Tensor], grown: dict[str, torch.Tensor], cold: dict[str, torch.Tensor], what: str
) -> None:
    from pipeline.train.parallelize import TABLE_KEY

    n_old = old[f"model.{TABLE_KEY}"].shape[0]
    assert set(grown) == set(old), what
    per_row = [k for k in old if TABLE_KEY in k and old[k].dim() >= 1]
    assert f"model.{TABLE_KEY}" in per_row and any(k.startswith("optim.") for k in per_row), what
    for key in per_row:
        # blocks of rows: 1, or one per column shard for row-wise Adagrad's accumulator under column_wise
        blocks = old[key].shape[0] // n_old
        assert grown[key].shape[0] == blocks * (n_old + GROWTH), f"{what} {key}"
        g, c = (t[key].reshape(blocks, n_old + GROWTH, *t[key].shape[1:]) for t in (grown, cold))
        o = old[key].reshape(blocks, n_old, *old[key].shape[1:])
        assert torch.equal(g[:, :n_old], o), f"{what} {key}: old rows"
        assert torch.equal(g[:, n_old:], c[:, n_old:]), f"{what} {key}: new rows"
    # the moved rows were trained (the test would be vacuous if they were still the init)
    assert not torch.equal(old[f"model.{TABLE_KEY}"], cold[f"model.{TABLE_KEY}"][:n_old]), what
    dense = [k for k in old if k not in per_row]
    assert any(k.startswith("optim.state.dense.") for k in dense), what
    for key in dense:
        assert torch.equal(grown[key], old[key]), f"{what} {key}"


@contextmanager
def world_of_one() -> Iterator[None]:
    from pipeline.train.distributed import init_distributed, teardown

    ctx = init_distributed("cpu")
    try:
        yield
    finally:
        teardown(ctx)


N_OLD = 150  # rows of the one-rank checkpoints below (no training: their state is set by hand)


def perturbed_checkpoint(root: Path, kind: str) -> Path:
    """A one-rank training checkpoint (model + optimizer, train.json with the config) of an N_OLD-row model
    whose every tensor was moved off its init (random table rows and optimizer state, shifted dense
    weights), so that old rows, new rows and dense values are all told apart."""
    from pipeline.train.builder import build_parallel_model
    from pipeline.train.checkpoint import Checkpointer
    from pipeline.train.grow import _flatten

    cfg = train_config("", 1)
    cfg.parallel.sharding_types = (kind,)
    cfg.model = dataclasses.replace(cfg.model, num_items=N_OLD)
    pm = build_parallel_model(cfg.model, cfg.parallel, cfg.optim, torch.device("cpu"), cfg.seed)
    pm.init_optimizer_state()
    state = {"model": pm.dmp.state_dict(), "optim": pm.optimizer.state_dict()}
    gen = torch.Generator().manual_seed(7)
    for value in _flatten(state).values():
        if hasattr(value, "local_shards"):
            parts = [s.tensor for s in value.local_shards()]
        elif hasattr(value, "to_local"):
            parts = [value.to_local()]
        else:
            parts = [value]
        for part in parts:
            part.add_(torch.rand(part.shape, generator=gen) + 0.5)
    store = Checkpointer(root)
    path = store.save(1, state, meta={"config": dataclasses.asdict(cfg)})
    store.save_named("final", {"model": state["model"]}, meta={"config": dataclasses.asdict(cfg)})
    return Path(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grow")
    with world_of_one():
        return {kind: perturbed_checkpoint(root / kind, kind) for kind in ("row_wise", "data_parallel")}


@pytest.mark.parametrize("kind", ["row_wise", "data_parallel"])
def test_one_rank_warm_start_grows_table_and_its_optimizer_state(
    kind: str, saved: dict[str, Path], tmp_path: Path
) -> None:
    with world_of_one():
        grow_and_save(saved[kind], N_OLD + GROWTH, kind, tmp_path / "grown")
        grow_and_save(None, N_OLD + GROWTH, kind, tmp_path / "cold")
    cold = full_state(tmp_path / "cold" / "state")
    assert_grown(full_state(saved[kind]), full_state(tmp_path / "grown" / "state"), cold, kind)


def one_line_error(call: Any) -> str:
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_shrinking_table_and_dense_shape_mismatch_are_one_line_errors(saved: dict[str, Path]) -> None:
    from pipeline.train.builder import build_parallel_model
    from pipeline.train.grow import warm_start
    from pipeline.train.presets import tiny
    from serving.loading import load_checkpoint_model

    cfg = train_config("", 1)
    with world_of_one():
        small = build_parallel_model(
            dataclasses.replace(cfg.model, num_items=N_OLD - 1),
            cfg.parallel,
            cfg.optim,
            torch.device("cpu"),
            0,
        )
        message = one_line_error(lambda: warm_start(small.dmp, saved["row_wise"], small.optimizer))
        assert message == f"checkpoint has {N_OLD} item rows, the model {N_OLD - 1}: a table can only grow"
        # another padded_length: the position weights of every block have another shape
        other = dataclasses.replace(cfg.model, num_items=N_OLD, padded_length=tiny().model.padded_length + 10)
        wide = build_parallel_model(other, cfg.parallel, cfg.optim, torch.device("cpu"), 0)
        message = one_line_error(lambda: warm_start(wide.dmp, saved["row_wise"]))
        assert "model.encoder.blocks.0.ams.pos_weights.weight has shape" in message
    message = one_line_error(lambda: load_checkpoint_model(saved["row_wise"], num_items=N_OLD - 1))
    assert "a table can only grow" in message


def test_final_checkpoint_grows_weights_only(saved: dict[str, Path], tmp_path: Path) -> None:
    """final/ holds the model only: init_optimizer needs a training checkpoint; weights alone still grow."""
    from pipeline.train.builder import build_parallel_model
    from pipeline.train.grow import warm_start
    from pipeline.train.parallelize import TABLE_KEY

    final = saved["row_wise"].parent / "final"
    cfg = train_config("", 1)
    model_cfg = dataclasses.replace(cfg.model, num_items=N_OLD + GROWTH)
    with world_of_one():
        pm = build_parallel_model(model_cfg, cfg.parallel, cfg.optim, torch.device("cpu"), cfg.seed)
        message = one_line_error(lambda: warm_start(pm.dmp, final, pm.optimizer, pm.init_optimizer_state))
        assert "holds no optimizer state" in message and "init_optimizer=false" in message
        warm_start(pm.dmp, final)
        table = pm.dmp.state_dict()[TABLE_KEY].local_shards()[0].tensor.clone()
    assert torch.equal(table[:N_OLD], full_state(final)[f"model.{TABLE_KEY}"])


def test_load_checkpoint_model_grows_the_table(saved: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.train.parallelize import TABLE_KEY
    from serving.loading import load_checkpoint_model

    old = full_state(saved["row_wise"])
    with world_of_one():
        grow_and_save(None, N_OLD + GROWTH, "row_wise", tmp_path / "cold")
    cold = full_state(tmp_path / "cold" / "state")[f"model.{TABLE_KEY}"]
    loaded = load_checkpoint_model(saved["row_wise"], num_items=N_OLD + GROWTH)
    assert loaded.cfg.model.num_items == N_OLD + GROWTH
    table = loaded.model.state_dict()[TABLE_KEY]
    assert table.shape[0] == N_OLD + GROWTH
    assert torch.equal(table[:N_OLD], old[f"model.{TABLE_KEY}"])
    assert torch.equal(table[N_OLD:], cold[N_OLD:])  # the rows a cold start of the checkpoint's seed draws
    for key, value in loaded.model.state_dict().items():
        if key != TABLE_KEY:
            assert torch.equal(value, old[f"model.{key}"]), key
    ids, _, _ = loaded.top_k([[5, 17, 3]], k=5)  # scores every row, the new ones included
    assert len(ids) == 1 and len(ids[0]) == 5
    assert load_checkpoint_model(saved["row_wise"]).cfg.model.num_items == N_OLD


def test_init_optimizer_is_a_boolean_override() -> None:
    from pipeline.train.config import TrainConfig, apply_overrides, from_dict
    from pipeline.train.presets import tiny

    assert tiny().init_optimizer is True
    assert apply_overrides(tiny(), ["init_optimizer=false"]).init_optimizer is False
    with pytest.raises(ValueError, match="init_optimizer: cannot use .maybe. .Input should be a valid bool"):
        apply_overrides(tiny(), ["init_optimizer=maybe"])
    older = dataclasses.asdict(tiny())
    del older["init_optimizer"]  # a train.json written before the field existed
    assert from_dict(TrainConfig, older).init_optimizer is True


@pytest.mark.slow
def test_run_warm_starts_a_grown_table_as_a_new_run(saved: dict[str, Path], tmp_path: Path) -> None:
    """run() with init_checkpoint: the tiny data has more items than the checkpoint's table; the run
    starts at its own step 0 (a warm start is a new run, not a resume)."""
    cfg = train_config(str(tmp_path / "warm"), 1)
    cfg.init_checkpoint = str(saved["row_wise"])
    warm = run_recorded(cfg)
    cold = run_recorded(train_config(str(tmp_path / "cold"), 1))
    assert warm["steps"] == cold["steps"] and warm["resumed_from"] is None
    assert warm["losses"] != cold["losses"]
    assert cold["sharding"]["shards"] == warm["sharding"]["shards"]


@pytest.mark.slow
def test_table_grows_on_warm_start_on_2_ranks_and_across_world_sizes(tmp_path: Path) -> None:
    from pipeline.train.checkpoint import read_meta, resolve_checkpoint

    run_recorded(train_config(str(tmp_path / "run-1"), 1))
    one = training_checkpoint(str(tmp_path / "run-1"))
    torchrun(2, [__file__, "--worker", str(tmp_path), str(one)], tmp_path)
    two = training_checkpoint(str(tmp_path / "run-2"))
    n_old = full_state(two)["model.item_embedding.embeddings.item_table.weight"].shape[0]

    with world_of_one():  # the 2-rank checkpoint grown on 1 rank
        grow_and_save(two, n_old + GROWTH, "row_wise", tmp_path / "grown-2-1")

    # the row-wise boundary between the 2 ranks moved: rows near it changed rank
    before = [s["offsets"][0] for s in read_meta(two)["sharding"]["shards"]]
    after = read_meta(resolve_checkpoint(tmp_path / "grown-2-2" / "state"))["sharding"]
    assert after["sharding_type"] == "row_wise" and len(before) == len(after["shards"]) == 2
    assert before[0] == after["shards"][0]["offsets"][0] == 0 < before[1] < after["shards"][1]["offsets"][0]
    table_wise = read_meta(resolve_checkpoint(tmp_path / "grown-2-2-table_wise" / "state"))["sharding"]
    assert table_wise["sharding_type"] == "table_wise"

    cold = full_state(tmp_path / "cold-2" / "state")
    old = {"1": full_state(one), "2": full_state(two)}
    for name, source in [("2-2", "2"), ("2-2-table_wise", "2"), ("1-2", "1"), ("2-1", "2")]:
        assert_grown(old[source], full_state(tmp_path / f"grown-{name}" / "state"), cold, name)

    cw = full_state(tmp_path / "column_wise" / "step-000001")
    blocks = cw["optim.state.fused.item_embedding.embeddings.item_table.weight.item_table.momentum1"]
    assert blocks.shape == (2 * N_OLD,)  # one accumulator per column shard
    grown = full_state(tmp_path / "grown-column_wise" / "state")
    assert_grown(cw, grown, full_state(tmp_path / "cold-column_wise" / "state"), "column_wise")


def _worker(root: str, one_rank_checkpoint: str) -> None:
    """torchrun entry: train N_old rows on 2 ranks, then grow both checkpoints and save a cold start."""
    from pipeline.train.distributed import init_distributed, teardown

    ctx = init_distributed("cpu")
    tmp = Path(root)
    run_recorded(train_config(str(tmp / "run-2"), ctx.world_size))
    two = training_checkpoint(str(tmp / "run-2"))
    n_new = full_state_rows(two) + GROWTH
    grow_and_save(two, n_new, "row_wise", tmp / "grown-2-2")
    grow_and_save(two, n_new, "table_wise", tmp / "grown-2-2-table_wise")
    grow_and_save(Path(one_rank_checkpoint), n_new, "row_wise", tmp / "grown-1-2")
    grow_and_save(None, n_new, "row_wise", tmp / "cold-2")
    # column_wise (8 columns per rank): a 2-rank checkpoint of its own (its row-wise Adagrad state is
    # one accumulator per column shard), set by hand as in the one-rank tests
    cw = perturbed_checkpoint(tmp / "column_wise", "column_wise")
    grow_and_save(cw, N_OLD + GROWTH, "column_wise", tmp / "grown-column_wise")
    grow_and_save(None, N_OLD + GROWTH, "column_wise", tmp / "cold-column_wise")
    teardown(ctx)


def full_state_rows(ckpt: Path) -> int:
    from pipeline.train.grow import saved_shapes
    from pipeline.train.parallelize import TABLE_KEY

    shape = saved_shapes(ckpt)[f"model.{TABLE_KEY}"]
    assert shape is not None
    return shape[0]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
