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
from tests.helpers.distributed import run_recorded, torchrun

GLOBAL_BATCH = 48  # divisible by 1, 2 and 3 ranks


def resume_config(world_size: int, run_dir: str, epochs: int, resume: bool) -> Any:
    from pipeline.train.presets import tiny

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
    store = Checkpointer(tmp_path / "interrupted" / "checkpoints")
    stopped = store.latest()
    assert stopped is not None and stopped == store.named(f"step-{full['steps'] // 2:06d}")
    for world in (1, 3):  # copies of the stopped run, resumed on other world sizes below
        shutil.copytree(tmp_path / "interrupted", tmp_path / f"interrupted-{world}")

    torchrun(2, [__file__, "--worker", "resume", str(tmp_path / "interrupted"), str(out)], tmp_path)
    assert_continues(full, json.loads((out / "resumed-2.json").read_text()), 1e-6, "2 -> 2 ranks")

    torchrun(3, [__file__, "--worker", "resume", str(tmp_path / "interrupted-3"), str(out)], tmp_path)
    assert_continues(full, json.loads((out / "resumed-3.json").read_text()), 1e-5, "2 -> 3 ranks")

    # 1 rank, in this process; a write cut off after the step-k checkpoint (a generation no pointer names)
    # lies beside it and is ignored
    torn = Path(Checkpointer(tmp_path / "interrupted-1" / "checkpoints").commits.new_generation())
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"torn")
    resumed = run_recorded(resume_config(1, str(tmp_path / "interrupted-1"), epochs=2, resume=True))
    assert_continues(full, resumed, 1e-5, "2 -> 1 rank")


def test_cut_off_checkpoint_is_never_loaded_as_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.train.checkpoint as checkpoint

    store = Checkpointer(tmp_path)
    step4 = store.save(4, {"w": torch.arange(6.0)}, meta={"step": 4})
    assert store.latest() == step4 == store.named("step-000004")

    class Killed(BaseException):
        pass

    def dies_mid_write(state: dict[str, Any], storage_writer: Any) -> None:
        Path(storage_writer.path).mkdir(parents=True)
        (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"half a tensor")
        raise Killed("killed while writing")

    monkeypatch.setattr(checkpoint.dcp, "save", dies_mid_write)
    with pytest.raises(Killed):
        store.save(8, {"w": torch.zeros(6)})
    monkeypatch.undo()
    torn = [g for g in store.commits.generations() if str(tmp_path / g) != step4]
    assert len(torn) == 1  # the cut-off write: a generation no pointer names
    assert store.latest() == step4 and resolve_checkpoint(tmp_path) == step4
    assert store.named("step-000008") is None

    # a generation without .metadata (e.g. a partial copy), even if `latest` names it: never loaded
    store.commits.commit("latest", str(tmp_path / torn[0]), collect=False)
    assert store.latest() == step4
    state = {"w": torch.zeros(6)}
    assert store.load(state) == {"step": 4}
    assert torch.equal(state["w"], torch.arange(6.0))

    # the next complete save becomes latest, and the generation `latest` named before is deleted
    step8 = store.save(8, {"w": torch.ones(6)})
    assert store.latest() == step8
    assert sorted(store.commits.generations()) == sorted(Path(g).name for g in (step4, step8))


def _worker(mode: str, root: str, out: str) -> None:
    from pipeline.train.distributed import init_distributed, teardown

    ctx = init_distributed("cpu")
    world = ctx.world_size
    if mode == "first":
        results = {
            "full": run_recorded(resume_config(world, f"{root}/uninterrupted", epochs=2, resume=False))
        }
        run_recorded(resume_config(world, f"{root}/interrupted", epochs=1, resume=False))
    else:
        results = {f"resumed-{world}": run_recorded(resume_config(world, root, epochs=2, resume=True))}
    if ctx.rank == 0:
        for name, value in results.items():
            Path(out, f"{name}.json").write_text(json.dumps(value))
    teardown(ctx)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*sys.argv[2:5])


# ---------------------------------------------------------------------------------------------------------
# mid-epoch checkpoints (checkpoint_every_steps): a run killed mid-epoch resumes at the next batch


class Killed(BaseException):
    """Stands for the job being killed: raised while the trainer waits for a batch."""


class RecordedBatches:
    """The training split of a run, recording each batch's user ids; raises Killed when the trainer asks
    for batch number `kill_at` (counted over the run). Everything else is the real split's."""

    def __init__(self, inner: Any, seen: list[list[int]], kill_at: int | None) -> None:
        self.inner, self.seen, self.kill_at = inner, seen, kill_at

    def __getattr__(self, name: str) -> Any:  # state_dict, load_state_dict, num_rows, skipped_users, ...
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int, start_batch: int) -> Any:
        for batch in self.inner.epoch(epoch, start_batch):
            if len(self.seen) + 1 == self.kill_at:
                raise Killed(f"killed before step {self.kill_at}")
            self.seen.append(batch.user_ids.tolist())
            yield batch


def recorded_run(cfg: Any, monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> dict[str, Any]:
    """run_recorded(cfg) plus the user ids of every trained step (`users`), or {"users": ..} when killed."""
    import pipeline.train.run as train

    seen: list[list[int]] = []
    build = train.build_batches

    def build_recorded(*args: Any, **kwargs: Any) -> dict[str, Any]:
        splits = build(*args, **kwargs)
        return {**splits, "train": RecordedBatches(splits["train"], seen, kill_at)}

    with monkeypatch.context() as patch:
        patch.setattr(train, "build_batches", build_recorded)
        try:
            result = run_recorded(cfg)
        except Killed:
            return {"users": seen}
    return {**result, "users": seen}


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """A shard directory of ~600 users in row groups of 24 (an epoch spans many units and windows); built
    with Ray Data, whose local instance ends with this module (tests/conftest.py)."""
    from pipeline.data.build import BuildConfig, build_sequences
    from pipeline.data.synth_logs import LogConfig, write_logs

    root = tmp_path_factory.mktemp("shards")
    write_logs(
        LogConfig(num_users=600, num_items=300, num_days=2, num_events=12_000, seed=3, num_themes=10),
        root / "logs",
        progress=False,
    )
    build_sequences(
        root / "logs",
        root / "seq",
        BuildConfig(max_length=40, num_partitions=3, row_group_rows=24),
        progress=False,
    )
    return root / "seq"


def mid_epoch_config(source: str, run_dir: Path, every_steps: int, resume: bool = False) -> Any:
    from pipeline.train.presets import tiny

    cfg = tiny()  # dropout stays on: its masks are a function of (seed, step, rank), as are the negatives
    cfg.epochs = 2
    if source != "synthetic":
        cfg.data.source, cfg.data.stream, cfg.data.stream_backend = source, True, "pyarrow"
    cfg.tracking.enabled = False
    cfg.tracking.log_every_steps = 1
    cfg.checkpoint_every_epochs = 1
    cfg.checkpoint_every_steps = every_steps
    cfg.run_dir, cfg.resume = str(run_dir), resume
    return cfg


@pytest.mark.slow
@pytest.mark.usefixtures("deterministic")  # exact comparisons below (tests/conftest.py)
@pytest.mark.parametrize("path", ["stream", "in_memory"])
def test_killed_mid_epoch_resumes_at_the_next_batch(
    path: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = str(request.getfixturevalue("small_shards")) if path == "stream" else "synthetic"
    every = 3
    full = recorded_run(mid_epoch_config(source, tmp_path / "uninterrupted", every), monkeypatch)
    steps = full["steps"]
    per_epoch = steps // 2
    assert per_epoch >= 4 and len(full["users"]) == len(full["losses"]) == steps
    # the last step checkpoint inside epoch 2 (not at its end), and a kill two steps after it
    mid = max(s for s in range(every, steps - 1, every) if s > per_epoch and s % per_epoch)
    killed = recorded_run(mid_epoch_config(source, tmp_path / "run", every), monkeypatch, kill_at=mid + 2)
    assert "steps" not in killed and len(killed["users"]) == mid + 1  # step mid + 1 was trained, then lost
    store = Checkpointer(tmp_path / "run" / "checkpoints")
    assert store.latest() == store.named(f"step-{mid:06d}")

    resumed = recorded_run(mid_epoch_config(source, tmp_path / "run", every, resume=True), monkeypatch)
    assert resumed["resumed_from"].endswith(f"step-{mid:06d}")
    # (a) the steps kept by the killed run, then the resumed ones: the uninterrupted run's batches, in order
    assert killed["users"][:mid] + resumed["users"] == full["users"]
    users = [u for step in full["users"][:per_epoch] for u in step]
    assert len(users) == len(set(users))  # and one epoch holds each user once
    # (b) bit-identical continuation: per-step losses, the epoch means (epoch 2 spans both runs), metrics
    assert resumed["losses"] == full["losses"][mid:]
    assert resumed["steps"] == steps

    def without_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]

    assert without_time(resumed["history"]) == without_time(full["history"])
    assert resumed["test"] == full["test"]
