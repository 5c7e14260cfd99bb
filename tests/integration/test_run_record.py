"""One MLflow run per job, and checkpoint folders that are replaced atomically and pruned."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.train.checkpoint import Checkpointer
from pipeline.train.precision import native_bf16
from pipeline.train.presets import tiny
from pipeline.train.run import RUN_RECORD, load_data, make_logger, run


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


def test_a_run_records_the_choice_in_its_params_and_train_json(tmp_path: Path) -> None:
    """amp=auto's choice (pipeline/train/precision.py) and an explicit amp=none, as recorded."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for amp in ("auto", "none"):
        cfg = tiny()
        cfg.tracking.uri, cfg.epochs, cfg.amp = uri, 1, amp
        cfg.output_dir = str(tmp_path / amp)
        report = run(cfg)
        recorded = json.loads((Path(report["checkpoint"]) / "train.json").read_text())
        params = MlflowClient(uri).get_run(report["run_id"]).data.params
        assert recorded["report"]["amp"] == report["amp"] and params["amp"] == amp
        assert params["amp.resolved"] == report["amp"]["resolved"] and "amp.reason" in params
        if amp == "none":
            assert report["amp"] == {
                "requested": "none",
                "resolved": "none",
                "reason": "set in the config",
                "native_bf16": None,
                "probe_fp32_ms": None,
                "probe_bf16_ms": None,
            }
        elif native_bf16():  # this machine's CPU: the probe ran and its timings are recorded
            assert float(params["amp.probe_fp32_ms"]) > 0 and float(params["amp.probe_bf16_ms"]) > 0
        else:
            assert report["amp"]["resolved"] == "none" and "amp.probe_fp32_ms" not in params


def test_a_resumed_run_keeps_the_precision_it_chose(tmp_path: Path) -> None:
    """amp=auto is decided once per job: a resumed attempt takes its checkpoint's choice, not a new probe."""

    def job(epochs: int, resume: bool) -> dict:
        cfg = tiny()
        cfg.amp, cfg.epochs, cfg.resume = "auto", epochs, resume
        cfg.tracking.enabled, cfg.run_dir = False, str(tmp_path / "job")
        return run(cfg)

    first = job(1, resume=False)
    second = job(2, resume=True)
    assert second["resumed_from"] and second["epochs"] == 2
    assert second["amp"] == {**first["amp"], "reason": f"resumed: {first['amp']['reason']}"}
