"""Tuning: an Optuna study over any config fields, one TorchX training job per trial and seed.

    fuxi tune --preset tiny --space space.yaml --trials 20 --study fuxi-tiny \
        --storage sqlite:///runs/tune/fuxi-tiny.db --seeds 0 1 --set epochs=10

The search space is a YAML or JSON mapping from a config field to its distribution:

    optim.lr:            {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.ffn_out_init_scale: {type: float, low: 0.0, high: 1.0}
    loss.num_negatives:  {type: categorical, choices: [64, 128, 256]}
    model.num_layers:    {type: int, low: 1, high: 4}

Every trial runs `jobs/components.py:train` (the `fuxi train` command line, as `fuxi sweep` does) once per
seed with the trial's values as `--set` overrides, as a child MLflow run of the study's one parent run.
The objective is the validation metric only: the best `valid/ndcg_at_10` of the run (the epoch the
trainer selects), averaged over the seeds; the test split is never read. While a trial's first seed
trains, its per-epoch validation metric is read from MLflow and reported to Optuna, and a trial the
pruner stops is cancelled (its child run is marked KILLED with tag `tune.state=PRUNED`). Later seeds of a
trial are not pruned (they would report the same epochs again).

Storage: `--tune-dir` (trial run folders, the report) is a path or a URI (`s3://bucket/tune`): trial runs
write their checkpoints and run records there, and the report is written through the storage layer. The
study itself needs a database (Optuna's RDB storage: a local SQLite file, or a server such as
postgresql://...), which an object store is not: a study storage on `s3://` (or `gs://`, `hdfs://`, or a
SQLite file named there) is refused in one line, and with a `--tune-dir` on a store `--storage` must be
given. TorchX's local logs stay local: `<tune-dir>/<study>/torchx_logs` on disk, a temporary folder when
the tune folder is on a store.

The study lives in an Optuna RDB storage (a SQLite file by default): a second invocation with the same
`--study` and `--storage` continues it (trial numbers continue, the sampler sees all earlier trials) under
the same parent run. One tuner process per study at a time, so a trial an invocation finds RUNNING was
left by one that was killed (SIGKILL): it is told FAIL, and it and every trial failed as interrupted
(SIGTERM, Ctrl-C) are queued again with the same values (`requeue`), once each, through Optuna's public
ask/tell API. (Optuna's heartbeats would find such a trial only after a grace period, and only while
another tuner runs; with one tuner per study the next invocation knows at once.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.launch import Job, Launcher, component_args
from jobs.report import log_report, report_files, save_figure
from jobs.sweep import job_run_dir, jobs_root, validate_point, with_log_dir
from pipeline.train.tracking import absolute_tracking_uri, ensure_experiment, mlflow_client
from storage import display, is_local, parse, write_bytes

OBJECTIVE = "valid/ndcg_at_10"  # the per-epoch validation metric the trainer logs
PARENT_ATTR = "mlflow_parent_run_id"
INTERRUPTED = "interrupted"  # user attribute of a trial whose invocation was stopped mid-trial
DIST_TYPES = ("float", "int", "categorical")


# ---------------------------------------------------------------------------------------------------
# the search space


@dataclass(frozen=True)
class Dist:
    field: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()


MAX_SPACE_BYTES = 1 << 20  # a search space is a few lines
MAX_CHOICES = 1000
MAX_CHOICE_CHARS = 200
_FIELD = re.compile(r"[a-z_][a-z0-9_]{0,63}(\.[a-z_][a-z0-9_]{0,63}){0,3}")


def load_space(path: str | Path) -> list[Dist]:
    """Read and check a search-space file: JSON (`.json`) or YAML (data only: no tags or aliases,
    no duplicate keys), at most MAX_SPACE_BYTES. Every refusal is one line naming the file."""
    file = Path(path)
    size = file.stat().st_size  # a missing file or a folder: the OSError names it
    if size > MAX_SPACE_BYTES:
        raise ValueError(f"{path}: {size} bytes, a search space is at most {MAX_SPACE_BYTES}")
    try:
        text = file.read_text(encoding="utf-8")
        # JSON through json: YAML 1.1 reads a JSON number such as 1e-12 (no dot) as a string
        raw = _read_json(text) if file.name.endswith(".json") else _read_yaml(text)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: the search space must be a non-empty mapping field -> distribution")
    try:
        return [parse_dist(k, v) for k, v in raw.items()]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _read_json(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # duplicates, NaN, 5,000 digits, deep nesting
        raise ValueError(f"not valid JSON: {' '.join(str(exc).split())[:160]}") from None


def _read_yaml(text: str) -> Any:
    """YAML as plain data: safe_load's types only (a `!!python/...` tag is an error, never constructed),
    and no aliases (a few aliased lines can stand for billions of values), no duplicate keys."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ValueError(f"not plain YAML: an alias (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup is not None:
                raise ValueError(f"duplicate key {dup!r} (line {node.start_mark.line + 1})")
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (Loader is a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(str(exc.problem).split())[:160]
        raise ValueError(f"not valid YAML: {problem}{where}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ValueError(f"not valid YAML: {type(exc).__name__}") from None


def _tunable(field: str) -> None:
    """A config field whose values are hyperparameters: numbers, booleans, a fixed set of choices (or
    tuples of them). Names, paths and URIs (name, output_dir, data.source, tracking.uri, ...) are not."""
    import typing

    from pipeline.train.config import TrainConfig

    if not isinstance(field, str) or not _FIELD.fullmatch(field):
        raise ValueError(f"search space {str(field)[:80]!r}: not a config field name (section.field)")
    target: Any = TrainConfig
    *sections, leaf = field.split(".")
    for part in sections:
        info = getattr(target, "__pydantic_fields__", {}).get(part)
        if info is None or not dataclasses.is_dataclass(info.annotation):
            raise ValueError(f"search space {field!r}: unknown config section {part!r}")
        target = info.annotation
    info = getattr(target, "__pydantic_fields__", {}).get(leaf)
    if info is None or dataclasses.is_dataclass(info.annotation):
        raise ValueError(f"search space {field!r}: unknown config field")

    def plain(hint: Any) -> bool:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Annotated:
            return plain(args[0])
        if origin is typing.Literal:
            return True
        if origin in (typing.Union, types.UnionType):
            return all(plain(a) for a in args if a is not type(None))
        if origin is tuple:
            return all(plain(a) for a in args if a is not Ellipsis)
        return hint in (int, float, bool)

    if not plain(info.annotation):
        raise ValueError(
            f"search space {field!r}: not a hyperparameter (a name, path or URI); tune numbers, flags "
            "and fixed choices"
        )


def _number(field: str, key: str, value: Any, integer: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"search space {field!r}: {key} must be a finite number (got {str(value)[:40]!r})")
    if integer and value != int(value):
        raise ValueError(f"search space {field!r}: {key} must be an integer for type int (got {value!r})")
    return int(value) if integer else float(value)


def parse_dist(field: str, spec: Any) -> Dist:
    _tunable(field)
    if not isinstance(spec, dict) or spec.get("type") not in DIST_TYPES:
        raise ValueError(f"search space {field!r}: needs type one of {DIST_TYPES}, got {str(spec)[:80]}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise ValueError(f"search space {field!r}: unknown keys {sorted(map(str, unknown))[:5]}")
    kind = spec["type"]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"search space {field!r}: categorical needs a non-empty list of choices")
        if len(choices) > MAX_CHOICES or set(spec) - {"type", "choices"}:
            raise ValueError(
                f"search space {field!r}: categorical takes only choices (at most {MAX_CHOICES})"
            )
        for c in choices:
            parts = c if isinstance(c, list) else [c]
            if not all(_scalar(p) for p in parts) or len(str(c)) > MAX_CHOICE_CHARS:
                raise ValueError(
                    f"search space {field!r}: choice {str(c)[:40]!r} is not a finite number, a flag, a "
                    f"string of <= {MAX_CHOICE_CHARS} characters, null, or a list of them"
                )
        # Optuna stores None/bool/int/float/str; a list choice (a tuple field) is written as "a,b"
        flat = tuple(",".join(map(str, c)) if isinstance(c, (list, tuple)) else c for c in choices)
        return Dist(field, kind, choices=flat)
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"search space {field!r}: {kind} needs low and high")
    low = _number(field, "low", spec["low"], kind == "int")
    high = _number(field, "high", spec["high"], kind == "int")
    if not low <= high:
        raise ValueError(f"search space {field!r}: low {low} > high {high}")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ValueError(f"search space {field!r}: log must be true or false (got {str(log)[:40]!r})")
    if step is not None:
        step = _number(field, "step", step, kind == "int")
        if not step > 0 or (high > low and step > high - low):
            raise ValueError(f"search space {field!r}: step {step} must be > 0 and <= high - low")
    if log and (low <= 0 or step is not None):
        raise ValueError(f"search space {field!r}: log needs low > 0 and no step")
    return Dist(field, kind, low, high, log, step)


def _scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, bool | int) or (isinstance(value, str) and value.isprintable())


def suggest(trial: Any, dist: Dist) -> Any:
    if dist.type == "categorical":
        return trial.suggest_categorical(dist.field, list(dist.choices))
    if dist.type == "int":
        return trial.suggest_int(
            dist.field, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log
        )
    return trial.suggest_float(dist.field, dist.low, dist.high, step=dist.step, log=dist.log)


def corner_values(dist: Dist) -> list[Any]:
    """The values checked against the config before anything launches (a bad field or range fails now)."""
    if dist.type == "categorical":
        return list(dist.choices)
    return [dist.low, dist.high]


def as_override(field: str, value: Any) -> str:
    return f"{field}={value}"


# ---------------------------------------------------------------------------------------------------
# MLflow: the parent run and the child run of each (trial, seed)


def child_run(client: Any, experiment_id: str, parent_id: str, run_name: str) -> Any | None:
    runs = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.mlflow.runName = '{run_name}'",
        max_results=1,
    )
    return runs[0] if runs else None


def valid_history(client: Any, run_id: str, metric: str = OBJECTIVE) -> list[float]:
    """The run's per-evaluation validation metric, in step order."""
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


# ---------------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    study_name: str
    parent_run_id: str
    experiment_id: str
    trials: int  # trials in the study after this invocation
    new_trials: int
    seconds: float


OBJECT_STORES = ("s3", "gs", "hdfs", "file")  # URI schemes that name files, not an Optuna database


def check_study_storage(url: str) -> str:
    """`url` if Optuna can keep a study there, else ValueError in one line: a study needs a database (an
    RDB URL: sqlite:///local.db, postgresql://...), and an object store is none (no SQLite file on it
    either: SQLite needs a local file with locks)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    inner = url.split(":///", 1)[1] if scheme == "sqlite" and ":///" in url else ""
    if scheme in OBJECT_STORES or "://" in inner:
        raise ValueError(
            f"--storage {display(inner or url)}: an Optuna study cannot live on an object store; use "
            "sqlite:///<a local file>.db or a database URL (postgresql://..., mysql://...)"
        )
    return url


def run_tune(
    preset: str,
    space: list[Dist],
    *,
    study_name: str,
    storage: str,
    n_trials: int,
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    tune_dir: str | Path = "runs/tune",
    scheduler: str = "local_cwd",
    scheduler_cfg: dict[str, Any] | None = None,
    data: str | None = None,
    cpu: int | None = None,
    sampler_seed: int = 0,
    pruner: str = "median",
    startup_trials: int = 5,
    warmup_evals: int = 2,
    poll_seconds: float = 2.0,
    log: Any = print,
) -> TuneResult:
    """Create or continue the study, run `n_trials` more trials, close the parent run."""
    import optuna
    from optuna.trial import TrialState

    from pipeline.train.presets import resolve_config

    overrides = list(overrides or [])
    seeds = list(seeds if seeds is not None else [0])
    check_study_storage(storage)
    base = resolve_config(preset, data, overrides)
    if base.data.protocol not in ("validated", "temporal"):
        raise ValueError(
            f"fuxi tune optimises the validation metric; protocol {base.data.protocol!r} has no validation "
            "split (use --set data.protocol=validated)"
        )
    for dist in space:  # typos and out-of-range values fail here, not in trial 7
        for value in corner_values(dist):
            try:
                validate_point(preset, overrides + [as_override(dist.field, value)], data)
            except ValueError as exc:
                raise ValueError(f"search space {dist.field!r} = {value!r}: {exc}") from None
    if is_local(tune_dir):  # the default SQLite file lives here
        os.makedirs(parse(tune_dir).path, exist_ok=True)
    experiment = experiment or base.tracking.experiment
    uri = absolute_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    exp_id = ensure_experiment(client, experiment)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(
            n_startup_trials=startup_trials, n_warmup_steps=warmup_evals
        ),
        "none": optuna.pruners.NopPruner,
    }
    if pruner not in pruners:
        raise ValueError(f"pruner must be one of {sorted(pruners)}, got {pruner!r}")
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=sampler_seed + len(_existing_trials(storage, study_name))),
        pruner=pruners[pruner](),
    )
    for number in requeue(study):
        log(f"[tune] trial {number} was interrupted: queued again")

    pid = study.user_attrs.get(PARENT_ATTR)
    if pid is None:
        parent = client.create_run(
            exp_id,
            run_name=study_name,
            tags={
                "mlflow.runName": study_name,
                "fuxi.kind": "tune",
                "tune.study": study_name,
                "tune.storage": display(storage),  # a database URL may carry a password
                "tune.preset": preset,
                "tune.space": json.dumps([d.__dict__ for d in space], default=list),
                "tune.overrides": json.dumps(overrides),
                "tune.seeds": json.dumps(seeds),
                "tune.objective": f"max over epochs of {OBJECTIVE}, mean over seeds",
            },
        )
        pid = parent.info.run_id
        study.set_user_attr(PARENT_ATTR, pid)
        study.set_user_attr("preset", preset)
        study.set_user_attr("seeds", seeds)
    else:
        client.update_run(pid, status="RUNNING")
    study.set_user_attr("space", [d.__dict__ for d in space])

    root = jobs_root(tune_dir, study_name, "--study")
    cfg = with_log_dir(scheduler, scheduler_cfg, root, f"tune-{study_name}")
    cpu = cpu or max(1, os.cpu_count() or 2)
    launcher = Launcher(scheduler, cfg)

    def launch(trial: Any, seed: int, point: list[str], prune: bool) -> float:
        """One training job; returns its best validation metric (raises TrialPruned / RuntimeError)."""
        run_name = f"{study_name}/trial-{trial.number:04d}-seed{seed}"
        point_overrides = (
            overrides
            + point
            + [f"seed={seed}", f"tracking.run_name={run_name}", f"tracking.experiment={experiment}"]
            + ["progress=false"]
        )
        args = component_args(
            preset,
            point_overrides,
            run_dir=job_run_dir(root, f"trial-{trial.number:04d}-seed{seed}", scheduler),
            tracking_uri=uri,
            parent_run_id=pid,
            data=data,
            cpu=cpu,
            name="fuxi-tune",
        )
        reported, run_id = 0, None

        def watch(job: Job) -> None:
            """Find the job's child run, report its validation curve, prune (the launcher cancels)."""
            nonlocal reported, run_id
            if run_id is None:
                found = child_run(client, exp_id, pid, run_name)
                run_id = found.info.run_id if found is not None else None
                if run_id is not None:
                    trial.set_user_attr(f"run_id_seed{seed}", run_id)
                    client.set_tag(run_id, "tune.study", study_name)
                    client.set_tag(run_id, "tune.trial", str(trial.number))
            if prune and run_id is not None:
                history = valid_history(client, run_id)
                for value in history[reported:]:
                    trial.report(max(history[: reported + 1]), reported)  # best so far: what selection keeps
                    reported += 1
                    if trial.should_prune():
                        launcher.cancel(job)
                        client.set_tag(run_id, "tune.state", "PRUNED")
                        client.set_terminated(run_id, status="KILLED")
                        log(f"[tune] trial {trial.number} pruned after {reported} evaluations ({value:.4f})")
                        raise optuna.TrialPruned()

        job = Job(f"trial {trial.number} seed {seed}", {}, args)
        launcher.run([job], poll_seconds=poll_seconds, log=log, on_poll=watch)
        if job.state != "SUCCEEDED" or run_id is None:
            raise RuntimeError(f"trial {trial.number} seed {seed}: job {job.handle} ended {job.state}")
        history = valid_history(client, run_id)
        if not history:
            raise RuntimeError(f"trial {trial.number} seed {seed}: run {run_id} logged no {OBJECTIVE}")
        client.set_tag(run_id, "tune.state", "COMPLETE")
        return max(history)

    def objective(trial: Any) -> float:
        values = {d.field: suggest(trial, d) for d in space}
        point = [as_override(k, v) for k, v in values.items()]
        scores = []
        try:
            for i, seed in enumerate(seeds):
                scores.append(launch(trial, seed, point, prune=i == 0))
        except (optuna.TrialPruned, RuntimeError):  # pruned, or the job itself failed
            raise
        except BaseException:  # this invocation was stopped (TorchX turns SIGTERM into an exception)
            trial.set_user_attr(INTERRUPTED, True)
            raise
        trial.set_user_attr("seed_values", scores)
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
        trial.set_user_attr("seed_std", std)
        log(f"[tune] trial {trial.number}: {OBJECTIVE} {mean:.4f} ± {std:.4f} over seeds {seeds}  {values}")
        return mean

    t0 = time.monotonic()
    before = len(study.trials)
    status = "FAILED"
    try:
        study.optimize(objective, n_trials=n_trials, catch=(RuntimeError,))
        status = "FINISHED"
    finally:
        launcher.close()
        seconds = time.monotonic() - t0
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        client.log_metric(pid, "tune/trials", len(study.trials))
        client.log_metric(pid, "tune/complete", len(done))
        client.log_metric(pid, "tune/pruned", sum(t.state == TrialState.PRUNED for t in study.trials))
        if done:
            best = study.best_trial
            client.log_metric(pid, "tune/best_value", best.value)
            client.set_tag(pid, "tune.best_trial", str(best.number))
            client.set_tag(pid, "tune.best_params", json.dumps(best.params))
        client.set_terminated(pid, status=status)
    return TuneResult(study_name, pid, exp_id, len(study.trials), len(study.trials) - before, seconds)


def requeue(study: Any) -> list[int]:
    """Queue again, with the same values, every trial an earlier invocation did not finish: left RUNNING
    (killed) or failed with the INTERRUPTED attribute (stopped). A RUNNING one is told FAIL first. Each
    is queued once (its copy carries `retry_of`). Returns the numbers queued."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    queued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.number in retried or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED)):
            continue
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        queued.append(t.number)
    return queued


def _existing_trials(storage: str, study_name: str) -> list[Any]:
    """The study's trials so far (none for a new study): the sampler seed moves on with them, so a
    resumed study does not replay its first random draws."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage).trials
    except KeyError:
        return []


# ---------------------------------------------------------------------------------------------------
# the report: best trials, parameter importances, mean ± std over seeds


def study_report(storage: str, study_name: str, top: int = 10) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON of a study: its trials by state, the best `top` completed trials (values, mean ±
    std over seeds, child runs) and the parameter importances (Optuna's default evaluator)."""
    import optuna
    from optuna.trial import TrialState

    check_study_storage(storage)
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.trials
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value or 0.0, reverse=True
    )
    counts = {
        s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)
    }
    fields = [d["field"] for d in study.user_attrs.get("space", [])] or sorted(
        {k for t in trials for k in t.params}
    )
    importances: dict[str, float] = {}
    note = ""
    if len(done) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as exc:  # e.g. a parameter that never varied
            note = f"parameter importances unavailable: {exc}"
    else:
        note = "parameter importances need at least 2 completed trials"
    seeds = study.user_attrs.get("seeds", [])
    lines = [
        f"### study {study_name}: {len(trials)} trials ({', '.join(f'{k} {v}' for k, v in counts.items())})",
        "",
        f"Objective: best `{OBJECTIVE}` over a run's epochs (the epoch the trainer selects), mean over seeds "
        f"{seeds}; the test split is never read. Parent MLflow run `{study.user_attrs.get(PARENT_ATTR)}`.",
        "",
        "| # | trial | " + " | ".join(f.rsplit(".", 1)[-1] for f in fields) + " | valid NDCG@10 | per seed |",
        "|---|---|" + "---|" * len(fields) + "---|---|",
    ]
    for i, t in enumerate(done[:top]):
        per_seed = t.user_attrs.get("seed_values", [t.value])
        std = t.user_attrs.get("seed_std", 0.0)
        cells = [_fmt(t.params.get(f)) for f in fields]
        lines.append(
            f"| {i + 1} | {t.number} | "
            + " | ".join(cells)
            + f" | {t.value:.4f} ± {std:.4f} | "
            + ", ".join(f"{v:.4f}" for v in per_seed)
            + " |"
        )
    lines.append("")
    if importances:
        lines += ["Parameter importances (fANOVA, normalised):", ""]
        lines += [f"- `{k}`: {v:.3f}" for k, v in importances.items()]
    else:
        lines.append(note)
    data = {
        "study": study_name,
        "counts": counts,
        "parent_run_id": study.user_attrs.get(PARENT_ATTR),
        "importances": importances,
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "seed_values": t.user_attrs.get("seed_values"),
                "seed_std": t.user_attrs.get("seed_std"),
                "intermediate": dict(t.intermediate_values),
            }
            for t in trials
        ],
    }
    return "\n".join(lines) + "\n", data


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def plot_study(data: dict[str, Any], path: str | Path) -> None:
    """Left: each trial's objective, mean ± std over seeds as error bars, pruned trials at their last
    report, and the best so far. Right: every trial's validation curve (the pruner's input)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    done = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    if done:
        left.errorbar(
            [t["number"] for t in done],
            [t["value"] for t in done],
            yerr=[t["seed_std"] or 0.0 for t in done],
            fmt="o",
            capsize=3,
            label="complete (mean ± std over seeds)",
        )
        best, xs, ys = float("-inf"), [], []
        for t in sorted(done, key=lambda t: t["number"]):
            best = max(best, t["value"])
            xs.append(t["number"])
            ys.append(best)
        left.step(xs, ys, where="post", color="black", alpha=0.6, label="best so far")
    pruned = [t for t in data["trials"] if t["state"] == "PRUNED" and t["intermediate"]]
    if pruned:
        left.plot(
            [t["number"] for t in pruned],
            [t["intermediate"][max(t["intermediate"])] for t in pruned],
            "x",
            color="grey",
            label="pruned (last report)",
        )
    left.set_xlabel("trial")
    left.set_ylabel(f"{OBJECTIVE.replace('_at_', '@')} (objective)")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    best_number = max(done, key=lambda t: t["value"])["number"] if done else None
    for t in data["trials"]:
        if not t["intermediate"]:
            continue
        steps = sorted(t["intermediate"])
        is_best = t["number"] == best_number
        right.plot(
            [s + 1 for s in steps],
            [t["intermediate"][s] for s in steps],
            color="C3" if is_best else ("grey" if t["state"] == "PRUNED" else "C0"),
            alpha=1.0 if is_best else 0.5,
            linewidth=2 if is_best else 1,
            label=f"trial {t['number']} (best)" if is_best else None,
        )
    right.set_xlabel("evaluation (epoch)")
    right.set_ylabel("best valid NDCG@10 so far (first seed)")
    right.grid(True, alpha=0.3)
    if best_number is not None:
        right.legend(fontsize=8)
    fig.suptitle(f"study {data['study']}", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_study_report(
    storage: str,
    study_name: str,
    out_dir: str | Path,
    name: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[str, dict[str, str]]:
    """Write <out>/<name>.md, .json and .png (`out_dir` a path or a URI) and log them to the study's
    parent run."""
    kinds = {"table": "md", "data": "json", "plot": "png"}
    paths = report_files(out_dir, name or f"tune_{study_name}", kinds)
    markdown, data = study_report(storage, study_name)
    write_bytes(paths["table"], markdown.encode())
    write_bytes(paths["data"], json.dumps(data, indent=1, default=str).encode())
    plot_study(data, paths["plot"])
    if data["parent_run_id"]:
        log_report(mlflow_client(tracking_uri), data["parent_run_id"], paths)
    return markdown, paths
