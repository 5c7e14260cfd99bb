"""Sweeps: a grid over any config fields, one TorchX job per point, all under one parent MLflow run.

    fuxi sweep --preset tiny --grid model.num_layers=1,2 --grid loss.num_negatives=32,128 --set epochs=2

Every point is `jobs/components.py:train` with the point's values as `--set` overrides plus
`tracking.parent_run_id=<parent>`, so each child run carries the full resolved config as params and
`fuxi report` can rebuild the comparison from `search_runs` alone. Jobs run on any TorchX scheduler
(`local_cwd` by default; `kubernetes` / `slurm` with infra/torchx/.torchxconfig), `--parallel N` at a time.

`--sweep-dir` is a path or a URI (`s3://bucket/sweeps`): on a store every point's run folder is there
(whatever the scheduler: every node reaches it); TorchX's `local_cwd` logs are local files, in a temporary
folder then (`<sweep-dir>/<name>/torchx_logs` on disk).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import storage
from jobs.launch import Job, component_args, run_jobs
from pipeline.train.tracking import absolute_tracking_uri, ensure_experiment, mlflow_client

# ---------------------------------------------------------------------------------------------------
# the folders of a batch of jobs (sweep points, tuning trials): a path or a URI


def jobs_root(parent: str | Path, name: str, field: str) -> str:
    """`<parent>/<name>` (name confined to it, one line naming `field`), made on local disk."""
    root = storage.join(os.fspath(parent), name, field=field)
    if storage.is_local(root):
        os.makedirs(storage.parse(root).path, exist_ok=True)
    return root


def job_run_dir(root: str, name: str, scheduler: str) -> str | None:
    """A job's run folder: the URI on a store (any scheduler's nodes reach it); on local disk an absolute
    path for a local scheduler, else None (the component's default: a local folder means nothing on
    another host)."""
    run_dir = storage.join(root, name)
    if not storage.is_local(run_dir):
        return run_dir
    return storage.parse(run_dir).path if scheduler.startswith("local") else None


def with_log_dir(
    scheduler: str, scheduler_cfg: dict[str, Any] | None, root: str, prefix: str
) -> dict[str, Any]:
    """The scheduler options, with local_cwd's `log_dir` defaulted: TorchX writes local files, so
    `<root>/torchx_logs` on disk and a fresh temporary folder when `root` is on a store."""
    cfg = dict(scheduler_cfg or {})
    if scheduler == "local_cwd" and "log_dir" not in cfg:
        local = storage.is_local(root)
        cfg["log_dir"] = (
            storage.parse(storage.join(root, "torchx_logs")).path
            if local
            else tempfile.mkdtemp(prefix=f"fuxi-{prefix}-torchx-")
        )
    return cfg


# ---------------------------------------------------------------------------------------------------
# grid


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """['model.num_layers=1,2', 'loss.num_negatives=32,128'] -> {field: [values]} (validated later)."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"grid axis {spec!r} must look like section.field=v1,v2,...")
        key, values = spec.split("=", 1)
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise ValueError(f"grid axis {key!r} has no values")
        grid[key.strip()] = items
    return grid


def expand_grid(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
    """Short run name: model.num_layers=2, loss.num_negatives=128 -> num_layers2-num_negatives128."""
    return "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in point.items()) or "base"


def validate_point(preset: str, overrides: list[str], data: str | None = None) -> None:
    """Fail before launching anything if a field or value is wrong."""
    from pipeline.train.config import validate
    from pipeline.train.presets import resolve_config

    validate(resolve_config(preset, data, overrides))


# ---------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    jobs: list[Job]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(j.state == "SUCCEEDED" for j in self.jobs)


def run_sweep(
    preset: str,
    grid: dict[str, list[str]],
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    sweep_dir: str | Path = "runs/sweeps",
    scheduler: str = "local_cwd",
    scheduler_cfg: dict[str, Any] | None = None,
    parallel: int = 1,
    data: str | None = None,
    cpu: int | None = None,
    poll_seconds: float = 2.0,
    log: Any = print,
) -> SweepResult:
    """Create the parent run, launch one TorchX job per grid point, wait, close the parent run."""
    from pipeline.train.presets import get_preset

    overrides = list(overrides or [])
    points = expand_grid(grid)
    for point in points:  # typos fail here, not 10 jobs later
        validate_point(preset, overrides + [f"{k}={v}" for k, v in point.items()], data)
    experiment = experiment or get_preset(preset, data).tracking.experiment
    name = name or f"sweep-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = absolute_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    exp_id = ensure_experiment(client, experiment)
    parent = client.create_run(
        exp_id,
        run_name=name,
        tags={
            "mlflow.runName": name,
            "sweep.preset": preset,
            "sweep.grid": json.dumps(grid),
            "sweep.overrides": json.dumps(overrides),
            "sweep.scheduler": scheduler,
            "fuxi.kind": "sweep",
        },
    )
    pid = parent.info.run_id
    from mlflow.entities import Param

    client.log_batch(
        pid,
        params=[Param("preset", preset), Param("points", str(len(points)))]
        + [Param(f"grid.{k}", ",".join(v)) for k, v in grid.items()],
    )
    root = jobs_root(sweep_dir, name, "--name")
    cfg = with_log_dir(scheduler, scheduler_cfg, root, f"sweep-{name}")
    cpu = cpu or max(1, (os.cpu_count() or 2) // max(1, parallel))
    jobs = []
    for point in points:
        run_name = f"{name}/{point_name(point)}"
        point_overrides = (
            overrides
            + [f"{k}={v}" for k, v in point.items()]
            + [f"tracking.run_name={run_name}", f"tracking.experiment={experiment}", "progress=false"]
        )
        args = component_args(
            preset,
            point_overrides,
            run_dir=job_run_dir(root, point_name(point), scheduler),
            tracking_uri=uri,
            parent_run_id=pid,
            data=data,
            cpu=cpu,
            name="fuxi-sweep",
        )
        jobs.append(Job(point_name(point), point, args))
    t0 = time.monotonic()
    status = "FAILED"
    try:
        run_jobs(jobs, scheduler, cfg, parallel, poll_seconds, log)
        status = "FINISHED" if all(j.state == "SUCCEEDED" for j in jobs) else "FAILED"
    finally:
        seconds = time.monotonic() - t0
        client.set_tag(
            pid, "sweep.jobs", json.dumps({j.name: [j.state, j.handle, round(j.seconds, 1)] for j in jobs})
        )
        client.log_metric(pid, "sweep/seconds", seconds)
        client.log_metric(pid, "sweep/succeeded", sum(j.state == "SUCCEEDED" for j in jobs))
        client.set_terminated(pid, status=status)
    return SweepResult(pid, exp_id, jobs, seconds)
