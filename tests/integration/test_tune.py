"""`fuxi tune` against a real Optuna SQLite storage, a real MLflow store and real TorchX `local_cwd` jobs on
the tiny preset: a study that was interrupted (trials left RUNNING or failed as interrupted), resumed by
one invocation and continued by a second; every trial a child run of the study's one parent run; the
objective the validation metric of the trial's run (never the test split); the report built from the
storage.
"""

from __future__ import annotations

import json
import os

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from jobs.cli import main
from jobs.tune import INTERRUPTED, child_run, load_space, parse_dist, study_report, valid_history
from pipeline.train.tracking import mlflow_client

# ~15 s per job on an idle 2-core machine (imports and torchrun dominate)
FAST = ["epochs=2", "data.synthetic.num_users=100", "tracking.log_every_steps=1"]
SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


def tune_args(root, uri: str, trials: int) -> list[str]:
    args = ["tune", "--preset", "tiny", "--space", str(root / "space.json"), "--study", "s"]
    args += ["--storage", f"sqlite:///{root}/study.db", "--trials", str(trials), "--tune-dir", str(root)]
    args += ["--tracking-uri", uri, "--cpu", "1", "--pruner", "none"]
    return args + [a for s in FAST for a in ("--set", s)]


def test_study_resumes_and_every_trial_is_a_child_run_scored_on_validation(tmp_path) -> None:
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    (tmp_path / "space.json").write_text(json.dumps(SPACE))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"sqlite:///{tmp_path}/study.db"
    # invocations stopped mid-trial: SIGKILL leaves the trial RUNNING; SIGTERM (TorchX raises it as an
    # exception) leaves it FAIL, marked interrupted; a trial that failed on its own stays failed
    killed = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    lr = {"optim.lr": FloatDistribution(1e-3, 1e-2, log=True)}
    lost = killed.ask(lr)
    stopped = killed.ask(lr)
    stopped.set_user_attr(INTERRUPTED, True)
    killed.tell(stopped, state=TrialState.FAIL)
    broken = killed.ask(lr)
    killed.tell(broken, state=TrialState.FAIL)
    assert (lost.number, stopped.number, broken.number) == (0, 1, 2)

    assert main(tune_args(tmp_path, uri, trials=2)) == 0
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 2
    # the two interrupted trials ran again with their values, the broken one did not
    assert [t.params for t in study.trials[3:]] == [study.trials[0].params, study.trials[1].params]
    assert [t.user_attrs["retry_of"] for t in study.trials[3:]] == [0, 1]
    parent = study.user_attrs["mlflow_parent_run_id"]

    assert main(tune_args(tmp_path, uri, trials=1)) == 0  # a second invocation continues the count
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert study.trials[5].state == TrialState.COMPLETE and "retry_of" not in study.trials[5].user_attrs
    assert study.user_attrs["mlflow_parent_run_id"] == parent  # the same parent run

    client = mlflow_client(uri)
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["fuxi.kind"] == "tune" and parent_run.info.status == "FINISHED"
    children = client.search_runs(
        [parent_run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=50
    )
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
    for trial in study.trials[3:]:
        run = child_run(client, parent_run.info.experiment_id, parent, f"s/trial-{trial.number:04d}-seed0")
        assert run is not None and run.info.run_id == trial.user_attrs["run_id_seed0"]
        assert run.data.tags["tune.trial"] == str(trial.number)
        assert float(run.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        # the objective is the best validation NDCG@10 over the run's epochs, not a test metric
        history = valid_history(client, run.info.run_id)
        assert len(history) == 2 and trial.value == pytest.approx(max(history))

    markdown, data = study_report(storage, "s")
    assert "6 trials" in markdown and "COMPLETE 3" in markdown and "FAIL 3" in markdown
    assert [t["number"] for t in data["trials"]] == [0, 1, 2, 3, 4, 5]
    assert main(["report", "--study", "s", "--storage", storage, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "tune_s.md").read_text() == markdown
    assert (tmp_path / "rep" / "tune_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_space_is_checked_before_anything_runs(tmp_path) -> None:
    assert parse_dist("loss.num_negatives", {"type": "categorical", "choices": [64, 128]}).choices == (
        64,
        128,
    )
    assert parse_dist("model.channels", {"type": "categorical", "choices": [["pos", "sem"]]}).choices == (
        "pos,sem",
    )
    with pytest.raises(ValueError, match="low"):
        parse_dist("optim.lr", {"type": "float", "low": 0.0, "high": 1.0, "log": True})
    with pytest.raises(ValueError, match="type"):
        parse_dist("optim.lr", {"type": "uniform", "low": 0.0, "high": 1.0})
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert load_space(path)[0].log
    # a JSON file is read as JSON: 1e-12 is a number there (YAML 1.1 would read the string "1e-12")
    path = tmp_path / "space.json"
    path.write_text('{"optim.lr": {"type": "categorical", "choices": [1e-12, 0.01]}}')
    assert load_space(path)[0].choices == (1e-12, 0.01)
    # an unknown field and an out-of-range value fail before a study or a job exists
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim.lrr": {"type": "float", "low": 1e-3, "high": 1e-2}}))
    args = ["tune", "--space", str(bad), "--study", "x", "--tune-dir", str(tmp_path)]
    assert main(args + ["--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    bad.write_text(json.dumps({"optim.warmup_steps": {"type": "int", "low": -1, "high": 3}}))
    assert main(args + ["--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    # the anchor protocol has no validation split to optimise
    bad.write_text(json.dumps(SPACE))
    assert main(args + ["--set", "data.protocol=anchor", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert not (tmp_path / "x.db").exists() or not optuna.get_all_study_names(f"sqlite:///{tmp_path}/x.db")


def test_median_pruner_stops_a_trial_below_the_median(tmp_path) -> None:
    # two queued points: a learning rate that learns, then one that cannot (1e-12): the second trial's
    # best validation value so far stays below the first's at the same evaluation, so it is pruned
    space = {"optim.lr": {"type": "categorical", "choices": [0.01, 1e-12]}}
    (tmp_path / "space.json").write_text(json.dumps(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.enqueue_trial({"optim.lr": 0.01})
    study.enqueue_trial({"optim.lr": 1e-12})
    args = tune_args(tmp_path, uri, trials=2)
    args[args.index("none")] = "median"
    args += ["--startup-trials", "1", "--warmup-evals", "0", "--set", "epochs=3"]
    assert main(args) == 0
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    learned, pruned = study.trials
    step = max(pruned.intermediate_values)  # the report it was stopped at
    assert pruned.intermediate_values[step] < learned.intermediate_values[step]
    run = mlflow_client(uri).get_run(pruned.user_attrs["run_id_seed0"])
    assert run.data.tags["tune.state"] == "PRUNED" and run.info.status == "KILLED"
