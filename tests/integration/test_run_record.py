"""One MLflow run per job, and checkpoint folders that are replaced atomically and pruned."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.train.checkpoint import Checkpointer
from pipeline.train.presets import tiny
from pipeline.train.run import RUN_RECORD, load_data, make_logger


def test_resumed_attempt_continues_the_run_one_without_checkpoint_marks_it_killed(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny()
    cfg.tracking.uri, cfg.resume = uri, True
    run_dir = tmp_path / "job"
    data = load_data(cfg)
    client = MlflowClient(uri)

    first = make_logger(cfg, data, run_dir)  # attempt 1: a new run, recorded in the run dir
    first.log({"train/loss": 1.0}, step=1)
    first.flush()  # ... then the attempt is killed: its run stays RUNNING
    assert json.loads((run_dir / RUN_RECORD).read_text())["run_id"] == first.run_id

    # attempt 2 finds no checkpoint (killed before the first): the old run is KILLED, a new one starts
    second = make_logger(cfg, data, run_dir)
    assert second.run_id != first.run_id
    assert client.get_run(first.run_id).info.status == "KILLED"

    # attempt 3 finds a checkpoint: it continues attempt 2's run, which holds the whole curve
    second.log({"train/loss": 2.0}, step=1)
    second.flush()
    Checkpointer(run_dir / "checkpoints").save(1, {"w": torch.zeros(2)})
    third = make_logger(cfg, data, run_dir)
    assert third.run_id == second.run_id
    third.log({"train/loss": 3.0}, step=2)
    third.close()
    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fuxi.attempt"] == "2"
    history = client.get_metric_history(second.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 3.0)]

    # without resume (a new job in the same folder) the recorded run is ended and a new one begins
    cfg.resume = False
    fourth = make_logger(cfg, data, run_dir)
    assert fourth.run_id not in (first.run_id, second.run_id)
    fourth.close()


def test_named_checkpoints_swap_atomically_and_step_checkpoints_are_pruned(tmp_path: Path) -> None:
    store = Checkpointer(tmp_path, keep=2)
    gens = [store.save(step, {"w": torch.full((2,), float(step))}) for step in (1, 2, 3, 4)]
    # the newest two step checkpoints keep their pointer and generation; the older ones are gone
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003", "step-000004"]
    assert store.latest() == gens[3] and store.named("step-000003") == gens[2]
    assert [Path(g).exists() for g in gens] == [False, False, True, True]

    first = store.save_named("best", {"w": torch.ones(2)})
    assert store.named("best") == first and Path(first).parent == tmp_path
    second = store.save_named("best", {"w": torch.full((2,), 7.0)})
    assert not Path(first).exists()  # the old generation goes once the pointer names the new one
    state = {"w": torch.zeros(2)}
    store.load(state, store.named("best"))
    assert torch.equal(state["w"], torch.full((2,), 7.0))
    assert sorted(p.name for p in tmp_path.glob("gen-*")) == sorted(Path(g).name for g in (*gens[2:], second))

    # a `final` folder from an older layout (a plain directory) is replaced as well
    legacy = tmp_path / "final"
    legacy.mkdir()
    (legacy / "old").write_text("x")
    store.save_named("final", {"w": torch.ones(2)})
    assert (tmp_path / "final").is_file() and store.named("final") is not None
    assert not any((p / "old").exists() for p in tmp_path.glob("final*"))
