"""Nightly retraining: ingest the day's logs -> update sequences -> warm-start training from the champion
-> evaluate -> register and promote if better. One command, or one Airflow task per step:

    fuxi nightly --date 2024-01-03                      # every step not yet done for that date
    fuxi nightly --date 2024-01-03 --step train         # one step (what each Airflow task runs)

Idempotent per date: `<workdir>/state/<date>.json` records each finished step and its outputs (and
`<date>.events/` every invocation: done / skipped / failed, one small object per event); a finished
step is skipped on a re-run, so re-running a date changes nothing (no new run, version or alias). A failed
step records its error and stops; the next run of that date retries from that step. Only the last step
sets the `champion` alias, after both models were measured on the same validation split, so any failure
leaves the champion as it was. `FUXI_NIGHTLY_FAIL_STEP=<step>` forces a failure at the end of that step's
work (tests, drills).

Data: the ingest / update steps go through `ingest_logs` and `update_sequences` only: the day's partition
`<logs>/date=YYYY-MM-DD/` is checked, then folded into the sequence shards with `fuxi data append-day`
(the first day builds them with `fuxi data build-sequences`). On an empty log root the demo writes a
synthetic week of logs (`fuxi data synth-logs`, 2024-01-01..07) so the job runs on embedded data.

Storage: the workdir, the log root and the sequences are paths or URIs (`--workdir s3://bucket/nightly`);
every read and write goes through the storage layer. The state file is rewritten whole with a conditional
write over the version this run read (storage.commit.write_conditional: If-Match on S3, a compare under a
lock on disk), so two runs of one date cannot both advance it: the second fails with CommitConflict. An
object store has no append: each audit event is its own small object under `<date>.events/`, named by time
(`read_events` lists them in order). On local disk a date lock (flock) also makes a second run fail fast.
The scheduler's logs stay local (TorchX writes files): `--scheduler-args log_dir=...`, by default
`<workdir>/runs/<date>/torchx_logs` on disk and a temporary folder when the workdir is on a store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import storage
from storage.commit import read_versioned, write_conditional

STEPS = ("ingest", "update_sequences", "train", "evaluate", "register_promote")
FAIL_ENV = "FUXI_NIGHTLY_FAIL_STEP"
# the demo's log window (`fuxi data synth-logs` arguments): 7 days from 2024-01-01, sized for the tiny preset,
# with new items every day (an open catalogue)
DEMO_LOGS = {"users": 300, "items": 200, "days": 7, "events": 21000, "seed": 0, "new-items-per-day": 10}


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # ASCII digits only (\d also takes other scripts)


def check_date(date: Any) -> str:
    """`date` if it is a real calendar date written strictly YYYY-MM-DD, else a ValueError naming it. The
    date names the state file, the lock and the run folder: Python 3.11's `fromisoformat` alone also takes
    "20240103", "2024-W01-3" or "2024-01-03T00:00", which would name other files for the same day."""
    if not isinstance(date, str) or not _DATE.fullmatch(date):
        raise ValueError(f"--date {str(date)[:40]!r}: expected a date written YYYY-MM-DD")
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise ValueError(f"--date {date!r}: not a calendar date") from None
    return date


def _location(uri: str | os.PathLike[str]) -> str:
    """A path or URI as the job records it: a local one absolute (a plain path), a store's as given."""
    uri = os.fspath(uri)
    return storage.parse(uri).path if storage.is_local(uri) else uri


@dataclass
class NightlyConfig:
    date: str  # YYYY-MM-DD
    workdir: str | os.PathLike[str] = "runs/nightly"  # a path or a URI
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    model_name: str = "fuxi-alpha"
    experiment: str = "fuxi-nightly"
    tracking_uri: str | None = None
    scheduler: str = "local_cwd"  # TorchX scheduler of the train step
    scheduler_cfg: dict[str, Any] = field(default_factory=dict)
    logs_dir: str | os.PathLike[str] | None = None  # default <workdir>/logs
    sequences: str | os.PathLike[str] | None = None  # default <workdir>/sequences
    demo_data: bool = True  # an empty log root gets synthetic logs (`fuxi data synth-logs`)
    demo_logs: dict[str, Any] = field(default_factory=dict)  # overrides of DEMO_LOGS

    def __post_init__(self) -> None:
        self.date = check_date(self.date)  # a malformed date fails before anything runs
        self.workdir = _location(self.workdir)
        self.logs_dir = _location(self.logs_dir or storage.join(self.workdir, "logs"))
        self.sequences = _location(self.sequences or storage.join(self.workdir, "sequences"))

    @property
    def day_dir(self) -> str:
        return storage.join(self.workdir, "runs", self.date)

    @property
    def state_dir(self) -> str:
        return storage.join(self.workdir, "state")


# ---------------------------------------------------------------------------------------------------
# per-date state


class State:
    """`<workdir>/state/<date>.json`, rewritten whole after every change, conditionally: only over the
    version this process read or wrote last (storage.commit.write_conditional), so a second run of the
    date that raced this one fails with CommitConflict instead of overwriting it. Events: one object
    each under `<date>.events/` (module docstring)."""

    MAX_BYTES = 16 << 20

    def __init__(self, uri: str) -> None:
        self.uri = uri
        found = read_versioned(uri)
        self.version: str | None = None
        self.data: dict[str, Any] = {"steps": {}}
        if found is not None:
            data, self.version = found
            if len(data) > self.MAX_BYTES:
                raise ValueError(f"{storage.display(uri)}: larger than {self.MAX_BYTES:,} bytes; refused")
            self.data = json.loads(data)

    def step(self, name: str) -> dict[str, Any]:
        return self.data["steps"].setdefault(name, {"status": "pending"})

    def done(self, name: str) -> bool:
        return self.data["steps"].get(name, {}).get("status") == "done"

    def outputs(self, name: str) -> dict[str, Any]:
        if not self.done(name):
            raise RuntimeError(f"step {name!r} has not finished for this date; run it first")
        return self.data["steps"][name]["outputs"]

    def event(self, step: str, event: str, **extra: Any) -> None:
        """Append-only audit trail beside the state file: one object per step and invocation, named by
        time and process (an object store cannot append to an object; a new one per event needs no
        read-modify-write and no lock)."""
        now = time.time_ns()
        name = f"{now:020d}-{os.getpid()}-{step}-{event}.json"
        record = {"time": round(now / 1e9, 3), "step": step, "event": event, **extra}
        storage.write_bytes(
            storage.join(events_root(self.uri), name, field="event"), json.dumps(record).encode()
        )

    def save(self) -> None:
        data = json.dumps(self.data, indent=1, default=str).encode()
        self.version = write_conditional(self.uri, data, expect=self.version)


def events_root(state_uri: str) -> str:
    """`<workdir>/state/<date>.events` for `<workdir>/state/<date>.json`."""
    name = storage.name_of(state_uri)
    return storage.join(storage.parent(state_uri), name.removesuffix(".json") + ".events", field="events")


def read_events(cfg: NightlyConfig) -> list[dict[str, Any]]:
    """Every audit event of `cfg.date`, oldest first."""
    root = events_root(storage.join(cfg.state_dir, f"{cfg.date}.json"))
    names = [n for n in storage.listdir(root) if n.endswith(".json")]
    return [json.loads(storage.read_bytes(storage.join(root, n, field="event"))) for n in sorted(names)]


@contextlib.contextmanager
def date_lock(cfg: NightlyConfig) -> Iterator[None]:
    """One nightly process per date at a time on local disk (a second one fails fast instead of racing).
    On an object store there is no lock to take: the conditional state write refuses the second run."""
    if not storage.is_local(cfg.workdir):
        yield
        return
    path = storage.parse(storage.join(cfg.state_dir, f"{cfg.date}.lock")).path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another nightly run holds {path}") from None
        yield


def _maybe_fail(step: str) -> None:
    if os.environ.get(FAIL_ENV) == step:
        raise RuntimeError(f"forced failure of step {step!r} ({FAIL_ENV}={step})")


# ---------------------------------------------------------------------------------------------------
# data: the one place that knows how logs become sequences (`fuxi data ...`, pipeline/data/build.py)


def _fuxi(*args: str) -> None:
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    print("[nightly] $ fuxi " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def _digest(uris: list[str]) -> tuple[str, int]:
    """(sha256 over the files' names and contents, their total size)."""
    digest, size = hashlib.sha256(), 0
    for uri in uris:
        data = storage.read_bytes(uri)
        digest.update(storage.name_of(uri).encode())
        digest.update(hashlib.sha256(data).digest())
        size += len(data)
    return digest.hexdigest(), size


def ingest_logs(cfg: NightlyConfig) -> dict[str, Any]:
    """The day's log partition `<logs>/date=YYYY-MM-DD/` (landed by the upstream export). With `demo_data`
    and an empty log root, `fuxi data synth-logs` writes a synthetic window first (from 2024-01-01)."""
    logs = str(cfg.logs_dir)  # a URI after NightlyConfig.__post_init__
    part = storage.join(logs, f"date={cfg.date}")
    if not storage.exists(part) and cfg.demo_data and not storage.exists(storage.join(logs, "_logs.json")):
        demo = {**DEMO_LOGS, **cfg.demo_logs}
        _fuxi(
            "data",
            "synth-logs",
            "--out",
            logs,
            *[a for k, v in demo.items() for a in (f"--{k}", str(v))],
        )
    if not storage.exists(part):
        have = [n for n in storage.listdir(logs) if n.startswith("date=")]
        raise FileNotFoundError(
            f"no logs for {cfg.date}: {storage.display(part)} does not exist "
            f"(log root has {have[:1]}..{have[-1:]})"
        )
    files = [storage.join(part, n, field="log file") for n in storage.listdir(part) if n.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{storage.display(part)} holds no Parquet files")
    sha256, size = _digest(files)
    return {"logs": {"path": storage.display(part), "files": len(files), "bytes": size, "sha256": sha256}}


def update_sequences(cfg: NightlyConfig) -> dict[str, Any]:
    """Fold the log days up to the date into the sequence shards (and their item vocabulary): the first
    run builds the shard directory from every log day up to the date (`fuxi data build-sequences`); later
    runs append each day not yet applied, in date order (`fuxi data append-day`: rows of existing items
    never move, new items get new rows)."""
    from pipeline.data.schema import DATE_RE, SHARD_MANIFEST

    logs, sequences = str(cfg.logs_dir), str(cfg.sequences)  # URIs after NightlyConfig.__post_init__
    manifest_path = storage.join(sequences, SHARD_MANIFEST)
    found = (DATE_RE.match(name) for name in storage.listdir(logs))
    days = sorted(m.group(1) for m in found if m and m.group(1) <= cfg.date)
    if storage.is_file(manifest_path):
        applied = set(json.loads(storage.read_bytes(manifest_path)).get("days", {}))
        for day in [d for d in days if d not in applied] or [cfg.date]:
            _fuxi(
                "data",
                "append-day",
                "--logs",
                logs,
                "--date",
                day,
                "--sequences",
                sequences,
            )
    else:
        _fuxi(
            "data",
            "build-sequences",
            "--logs",
            logs,
            "--out",
            sequences,
            "--dates",
            ",".join(days),
        )
    manifest = json.loads(storage.read_bytes(manifest_path))
    summary = {k: manifest.get(k) for k in ("generation", "users", "interactions", "num_items")}
    summary.update(days=sorted(manifest.get("days", {})), sha256=_digest([manifest_path])[0])
    return {"sequences": sequences, "manifest": summary}


def window_overrides(cfg: NightlyConfig, days: list[str]) -> list[str]:
    """The date's evaluation window: train on events before the date, evaluate on the date's events
    (`data.protocol=temporal`). The very first date has no earlier day: it bootstraps with the preset's
    own (leave-one-out) protocol."""
    if not any(d < cfg.date for d in days):
        return []
    return ["data.protocol=temporal", f"data.cut={cfg.date}", "data.window_seconds=86400"]


# ---------------------------------------------------------------------------------------------------
# steps


def _client(cfg: NightlyConfig) -> Any:
    from pipeline.train.tracking import mlflow_client

    return mlflow_client(cfg.tracking_uri)


def step_ingest(cfg: NightlyConfig, state: State) -> dict[str, Any]:
    return ingest_logs(cfg)


def step_update_sequences(cfg: NightlyConfig, state: State) -> dict[str, Any]:
    state.outputs("ingest")
    return update_sequences(cfg)


def step_train(cfg: NightlyConfig, state: State) -> dict[str, Any]:
    """Warm start from the champion's checkpoint (cold start when there is none), as a TorchX job."""
    from jobs.launch import Job, component_args, run_jobs
    from pipeline.train.tracking import absolute_tracking_uri, ensure_experiment
    from serving import registry
    from serving.loading import resolve_checkpoint

    data = state.outputs("update_sequences")["sequences"]
    window = window_overrides(cfg, state.outputs("update_sequences")["manifest"]["days"])
    client = _client(cfg)
    ensure_experiment(client, cfg.experiment)
    champ = registry.champion(client, cfg.model_name)
    init, arch, cold_reason = None, [], "no champion"
    if champ is not None:
        init = os.fspath(
            registry.version_checkpoint(
                client, cfg.model_name, champ.version, storage.join(cfg.day_dir, f"v{champ.version}")
            )
        )
        arch, cold_reason = warm_start_overrides(
            cfg, init, state.outputs("update_sequences")["manifest"]["num_items"]
        )
        if cold_reason:
            print(f"[nightly] cold start: {cold_reason}", flush=True)
            init = None
    attempt = int(state.step("train").get("attempts", 0)) + 1
    state.step("train")["attempts"] = attempt
    state.save()
    run_name = f"nightly-{cfg.date}-a{attempt}"
    # one MLflow run and one run dir per attempt (TorchX retries share it)
    run_dir = storage.join(cfg.day_dir, f"train-a{attempt}")
    overrides = (
        arch
        + list(cfg.overrides)
        + window
        + [f"tracking.run_name={run_name}", f"tracking.experiment={cfg.experiment}", "progress=false"]
    )
    if init:
        # the registered model is a `final` checkpoint: the selected weights, no optimizer state (that
        # belongs to the last step, not to the selected epoch); new rows start fresh either way
        overrides += [f"init_checkpoint={init}", "init_optimizer=false"]
    args = component_args(
        cfg.preset,
        overrides,
        run_dir=run_dir,
        tracking_uri=absolute_tracking_uri(cfg.tracking_uri),
        parent_run_id=None,
        data=data,
        name="fuxi-nightly",
    )
    scheduler_cfg = dict(cfg.scheduler_cfg)
    if cfg.scheduler == "local_cwd" and "log_dir" not in scheduler_cfg:  # TorchX writes local files
        local = storage.is_local(cfg.day_dir)
        scheduler_cfg["log_dir"] = (
            storage.join(cfg.day_dir, "torchx_logs")
            if local
            else tempfile.mkdtemp(prefix=f"fuxi-nightly-{cfg.date}-torchx-")
        )
    (job,) = run_jobs(
        [Job(run_name, {}, args)], cfg.scheduler, scheduler_cfg, log=lambda m: print(m, flush=True)
    )
    if job.state != "SUCCEEDED":
        raise RuntimeError(
            f"training job {job.handle} ended {job.state}; logs under {scheduler_cfg.get('log_dir')}"
        )
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.mlflow.runName = '{run_name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise RuntimeError(f"no finished MLflow run named {run_name}")
    return {
        "run_id": runs[0].info.run_id,
        "checkpoint": resolve_checkpoint(storage.join(run_dir, "checkpoints")),
        "init_version": None if init is None else str(champ.version),
        "init_checkpoint": init,
        "cold_start_reason": cold_reason,
        "seconds": round(job.seconds, 1),
    }


def warm_start_overrides(
    cfg: NightlyConfig, checkpoint: str, num_items: int | None
) -> tuple[list[str], str | None]:
    """`model.*` overrides that give the champion's architecture (the weights must fit), then the job's own
    overrides on top; returns (overrides, None), or ([], reason) when the weights cannot fit any more.
    A table that grew (new items) is no reason: the warm start copies the old rows and their optimizer
    state and initialises the new ones (pipeline/train/grow.py)."""
    from pipeline.train.config import apply_overrides
    from pipeline.train.presets import get_preset
    from serving.loading import checkpoint_config

    champion_model = checkpoint_config(checkpoint).model
    skip = {"num_items", "extra"}
    arch = []
    for f in dataclasses.fields(champion_model):
        if f.name not in skip:
            value = getattr(champion_model, f.name)
            arch.append(
                f"model.{f.name}=" + (",".join(map(str, value)) if isinstance(value, tuple) else str(value))
            )
    preset_model = get_preset(cfg.preset).model
    if (
        champion_model.padded_length > preset_model.padded_length
    ):  # keep max_len < padded_length at every step
        pad = next(i for i, a in enumerate(arch) if a.startswith("model.padded_length="))
        arch.insert(0, arch.pop(pad))
    planned = apply_overrides(get_preset(cfg.preset), arch + list(cfg.overrides)).model
    changed = [
        f.name
        for f in dataclasses.fields(planned)
        if f.name not in skip and getattr(planned, f.name) != getattr(champion_model, f.name)
    ]
    if changed:
        return [], f"the job's overrides change the champion's architecture ({', '.join(changed)})"
    if num_items is not None and int(num_items) < champion_model.num_items:  # rows only ever grow
        return [], f"the item table shrank ({champion_model.num_items} -> {num_items} rows): data rebuilt?"
    return arch, None


def step_evaluate(cfg: NightlyConfig, state: State) -> dict[str, Any]:
    """Candidate and champion on the same window neither trained on (the date's events; the first date:
    the preset's validation split). Both scores and the window's item statistics go to the candidate's
    run and, per date, to the model's timeline run (`fuxi report --nightly`)."""
    from serving import registry
    from serving.loading import (
        checkpoint_config,
        evaluate_checkpoint,
        load_checkpoint_model,
        recent_item_topk,
    )

    sequences = state.outputs("update_sequences")
    data, num_items = sequences["sequences"], int(sequences["manifest"]["num_items"])
    window = window_overrides(cfg, sequences["manifest"]["days"])
    trained = state.outputs("train")
    client = _client(cfg)

    def measure(checkpoint: str) -> dict[str, float]:
        rows = checkpoint_config(checkpoint).model.num_items  # an older table grows by fresh rows
        loaded = load_checkpoint_model(checkpoint, num_items=max(num_items, rows))
        metrics = evaluate_checkpoint(loaded, data, "valid", data_overrides=window)
        if window:
            metrics.update(recent_item_topk(loaded, data, cfg.date))  # how new items fare in top-k
        return metrics

    candidate = measure(trained["checkpoint"])
    champ = registry.champion(client, cfg.model_name)
    champion_metrics = None
    if champ is not None:
        ckpt = registry.version_checkpoint(
            client, cfg.model_name, champ.version, storage.join(cfg.day_dir, f"v{champ.version}")
        )
        champion_metrics = measure(os.fspath(ckpt))
    key = registry.SELECT_METRIC
    client.set_tag(trained["run_id"], "data.manifest", json.dumps(sequences["manifest"]))
    client.set_tag(trained["run_id"], "nightly.date", cfg.date)
    client.log_metric(trained["run_id"], f"nightly/valid_{key}", candidate[key])
    if champion_metrics is not None:
        client.log_metric(trained["run_id"], f"nightly/champion_valid_{key}", champion_metrics[key])
    timeline = {"num_items": float(num_items), "warm_start": float(trained.get("init_version") is not None)}
    timeline.update({f"candidate/{k}": v for k, v in candidate.items()})
    timeline.update({f"champion/{k}": v for k, v in (champion_metrics or {}).items()})
    log_timeline(client, cfg, timeline)
    return {
        "metric": key,
        "window": window or "bootstrap: the preset's validation split",
        "candidate": candidate,
        "champion_version": None if champ is None else str(champ.version),
        "champion": champion_metrics,
    }


TIMELINE_TAG = "fuxi.nightly.timeline"


def log_timeline(client: Any, cfg: NightlyConfig, metrics: dict[str, float]) -> str:
    """Per-date metrics as time series in one MLflow run per registered model (created on first use):
    step = days since 1970-01-01, timestamp = the date, so MLflow's charts and `fuxi report --nightly`
    show how models age and how new items fare."""
    from mlflow.entities import Metric

    exp = client.get_experiment_by_name(cfg.experiment)
    found = client.search_runs(
        [exp.experiment_id], f"tags.`{TIMELINE_TAG}` = '{cfg.model_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(
            exp.experiment_id,
            run_name=f"nightly-timeline-{cfg.model_name}",
            tags={TIMELINE_TAG: cfg.model_name, "mlflow.note.content": "per-date nightly metrics"},
        )
        run_id = run.info.run_id
    day = dt.date.fromisoformat(cfg.date)
    step = (day - dt.date(1970, 1, 1)).days
    stamp = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp() * 1000)
    batch = [Metric(k, float(v), stamp, step) for k, v in sorted(metrics.items()) if v == v]  # drop NaN
    client.log_batch(run_id, metrics=batch)
    client.set_terminated(run_id, "FINISHED")  # logged to again tomorrow; never left RUNNING
    return run_id


def step_register_promote(cfg: NightlyConfig, state: State) -> dict[str, Any]:
    from serving import registry

    trained, measured = state.outputs("train"), state.outputs("evaluate")
    client = _client(cfg)
    step = state.step("register_promote")
    if "version" not in step:  # registered on an earlier, failed attempt: do not register twice
        mv = registry.register(
            client,
            trained["run_id"],
            cfg.model_name,
            trained["checkpoint"],
            tags={
                "nightly.date": cfg.date,
                "data.manifest": json.dumps(state.outputs("update_sequences")["manifest"]),
            },
        )
        step["version"] = str(mv.version)
        state.save()
    _maybe_fail("register_promote")  # before the alias moves
    key = measured["metric"]
    current = registry.champion(client, cfg.model_name)
    same_champion = (None if current is None else str(current.version)) == measured["champion_version"]
    decision = registry.promote_if_better(
        client,
        cfg.model_name,
        step["version"],
        candidate_metric=measured["candidate"][key],
        # if the champion moved since `evaluate`, measure the new one on today's data
        champion_metric=(measured["champion"] or {}).get(key) if same_champion else None,
        data=state.outputs("update_sequences")["sequences"],
        metric=key,
        workdir=cfg.day_dir,
    )
    log_timeline(client, cfg, {"promoted": float(decision.promoted)})
    print(
        f"[nightly] {cfg.date}: v{step['version']} {'PROMOTED' if decision.promoted else 'not promoted'}: "
        f"{decision.reason}",
        flush=True,
    )
    return {"version": step["version"], "decision": decision.as_dict()}


STEP_FUNCS: dict[str, Callable[[NightlyConfig, State], dict[str, Any]]] = {
    "ingest": step_ingest,
    "update_sequences": step_update_sequences,
    "train": step_train,
    "evaluate": step_evaluate,
    "register_promote": step_register_promote,
}


def run_nightly(cfg: NightlyConfig, steps: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the given steps (default: all) for `cfg.date`; finished steps are skipped unless `force`."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    steps = list(steps or STEPS)
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown step(s) {sorted(unknown)}; steps are {list(STEPS)}")
    with date_lock(cfg):
        state = State(storage.join(cfg.state_dir, f"{cfg.date}.json"))
        state.data.update(date=cfg.date, config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})
        for name in steps:
            if state.done(name) and not force:
                print(f"[nightly] {cfg.date} {name}: done earlier, skipped", flush=True)
                state.event(name, "skipped")
                continue
            if force and name in state.data["steps"]:  # start the step afresh (keep the attempt count)
                old = state.data["steps"][name]
                state.data["steps"][name] = {
                    "status": "pending",
                    **({"attempts": old["attempts"]} if "attempts" in old else {}),
                }
            record = state.step(name)
            record.update(status="running", started=time.time())
            record.pop("error", None)
            state.save()
            t0 = time.monotonic()
            try:
                outputs = STEP_FUNCS[name](cfg, state)
                _maybe_fail(name)
            except BaseException as exc:
                record.update(
                    status="failed",
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(limit=5),
                    seconds=round(time.monotonic() - t0, 1),
                )
                state.save()
                state.event(name, "failed", error=record["error"])
                raise RuntimeError(f"nightly {cfg.date}: step {name} failed: {exc}") from exc
            record.update(
                status="done", outputs=outputs, seconds=round(time.monotonic() - t0, 1), finished=time.time()
            )
            state.save()
            state.event(name, "done", seconds=record["seconds"])
            print(f"[nightly] {cfg.date} {name}: done in {record['seconds']}s", flush=True)
        return state.data
