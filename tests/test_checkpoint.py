"""DCP checkpoints: resume equals an uninterrupted run, reshards to other world sizes, commits atomically.

The multi-process test trains the tiny preset with the item table row-wise sharded (fused row-wise
Adagrad: ShardedTensor weights and optimizer state) and the FuXi blocks FSDP2-sharded (DTensors):
  launch 1, 2 ranks: U = 2 epochs uninterrupted; I = the same run stopped after epoch 1 (step k),
  launch 2, 2 ranks: I resumed -> steps k+1.. equal U's (same world size: expected bit-identical,
                     asserted to 1e-6),
  launch 3, 3 ranks: a copy of I's step-k checkpoint resumed on 3 ranks,
  this process, 1 rank: another copy resumed on 1 rank.
The global batch is 48 rows on every world size (48, 24 or 16 per rank) and negatives are shared, so the
1- and 3-rank continuations must also equal U, within the parity tolerance of test_parallelize.py
(float sums in another order: rtol 1e-5). Dropout is off for that reason (its masks are per rank).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.train.checkpoint import Checkpointer, resolve_checkpoint
from tests.test_parallelize import run_recorded, torchrun

GLOBAL_BATCH = 48  # divisible by 1, 2 and 3 ranks


def resume_config(world_size: int, run_dir: str, epochs: int, resume: bool) -> Any:
    from pipeline.train.config import tiny

    cfg = tiny()
    cfg.epochs = epochs
    cfg.batch_size = GLOBAL_BATCH // world_size
    # 200 test users in global batches of 11 * world_size: on 3 ranks the last one (2 users) leaves rank 2
    # one padding row, which evaluate_sharded must leave out of the metrics
    cfg.eval_batch_size = 11
    cfg.model.input_dropout = cfg.model.linear_dropout = 0.0
    cfg.loss.negatives = "shared"
    cfg.parallel.sharding_types = ("row_wise",)
    cfg.parallel.embedding_optimizer = "rowwise_adagrad"
    cfg.optim.lr, cfg.parallel.embedding_lr = 5e-3, 0.05
    cfg.tracking.enabled = False
    cfg.tracking.log_every_steps = 1
    cfg.checkpoint_every_epochs = 1
    cfg.run_dir = run_dir
    cfg.resume = resume
    return cfg


def assert_continues(full: dict[str, Any], resumed: dict[str, Any], rel: float, what: str) -> None:
    k = len(full["losses"]) - len(resumed["losses"])
    assert k > 0 and resumed["resumed_from"].endswith(f"step-{k:06d}"), what
    assert resumed["steps"] == full["steps"], what
    assert resumed["losses"] == pytest.approx(full["losses"][k:], rel=rel), what
    users = full["test"]["num_users"]
    assert [h["epoch"] for h in resumed["history"]] == [1, 2], what  # epoch 1 came from the checkpoint
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert b["valid/ndcg_at_10"] == pytest.approx(a["valid/ndcg_at_10"], abs=1.0 / users), what
    for key, value in full["test"].items():
        assert resumed["test"][key] == pytest.approx(value, abs=1.0 / users), f"{what} test {key}"


@pytest.mark.slow
def test_resume_equals_uninterrupted_on_2_ranks_and_reshards_to_1_and_3(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    torchrun(2, [__file__, "--worker", "first", str(tmp_path), str(out)], tmp_path)
    full = json.loads((out / "full.json").read_text())
    stopped = Checkpointer(tmp_path / "interrupted" / "checkpoints").latest()
    assert stopped is not None and stopped.name == f"step-{full['steps'] // 2:06d}"
    for world in (1, 3):  # copies of the stopped run, resumed on other world sizes below
        shutil.copytree(tmp_path / "interrupted", tmp_path / f"interrupted-{world}")

    torchrun(2, [__file__, "--worker", "resume", str(tmp_path / "interrupted"), str(out)], tmp_path)
    assert_continues(full, json.loads((out / "resumed-2.json").read_text()), 1e-6, "2 -> 2 ranks")

    torchrun(3, [__file__, "--worker", "resume", str(tmp_path / "interrupted-3"), str(out)], tmp_path)
    assert_continues(full, json.loads((out / "resumed-3.json").read_text()), 1e-5, "2 -> 3 ranks")

    # 1 rank, in this process; a write cut off after the step-k checkpoint lies beside it and is ignored
    ckpt_root = tmp_path / "interrupted-1" / "checkpoints"
    (ckpt_root / "step-999999.tmp").mkdir()
    (ckpt_root / "step-999999.tmp" / "__0_0.distcp").write_bytes(b"torn")
    resumed = run_recorded(resume_config(1, str(tmp_path / "interrupted-1"), epochs=2, resume=True))
    assert_continues(full, resumed, 1e-5, "2 -> 1 rank")


def test_cut_off_checkpoint_is_never_loaded_as_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.train.checkpoint as checkpoint

    store = Checkpointer(tmp_path)
    store.save(4, {"w": torch.arange(6.0)}, meta={"step": 4})
    assert store.latest() == tmp_path / "step-000004"

    class Killed(BaseException):
        pass

    def dies_mid_write(state: dict[str, Any], checkpoint_id: str) -> None:
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a tensor")
        raise Killed("killed while writing")

    monkeypatch.setattr(checkpoint.dcp, "save", dies_mid_write)
    with pytest.raises(Killed):
        store.save(8, {"w": torch.zeros(6)})
    monkeypatch.undo()
    assert (tmp_path / "step-000008.tmp").exists()
    assert store.latest() == tmp_path / "step-000004"
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-000004"

    # a torn folder with a final name but no .metadata (e.g. a partial copy), even if `latest` names it
    (tmp_path / "step-000012").mkdir()
    (tmp_path / "latest").write_text("step-000012")
    assert store.latest() == tmp_path / "step-000004"
    state = {"w": torch.zeros(6)}
    assert store.load(state) == {"step": 4}
    assert torch.equal(state["w"], torch.arange(6.0))

    # the next complete save becomes latest, and a retried write of a cut-off step replaces its .tmp
    store.save(8, {"w": torch.ones(6)})
    assert store.latest() == tmp_path / "step-000008" and not (tmp_path / "step-000008.tmp").exists()


def _worker(mode: str, root: str, out: str) -> None:
    from pipeline.train.distributed import init_distributed, teardown

    ctx = init_distributed("cpu")
    world = ctx.world_size
    if mode == "first":
        results = {"full": run_recorded(resume_config(world, f"{root}/uninterrupted", epochs=2, resume=False))}
        run_recorded(resume_config(world, f"{root}/interrupted", epochs=1, resume=False))
    else:
        results = {f"resumed-{world}": run_recorded(resume_config(world, root, epochs=2, resume=True))}
    if ctx.rank == 0:
        for name, value in results.items():
            Path(out, f"{name}.json").write_text(json.dumps(value))
    teardown(ctx)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*sys.argv[2:5])
