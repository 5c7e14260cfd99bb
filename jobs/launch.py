"""Launch and wait: training jobs as TorchX apps of `jobs/components.py:train`, polled until terminal.

The one submit-and-poll loop of the jobs: `fuxi sweep` runs a grid through `run_jobs` (`parallel` in
flight), `fuxi tune` runs each (trial, seed) through `Launcher.run` with a per-poll hook (it reads the
run's validation curve and may prune), the nightly train step runs one job. Jobs still in flight when
the caller stops (Ctrl-C, or SIGTERM, which TorchX raises as an exception) are cancelled.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMPONENT = str(Path(__file__).with_name("components.py")) + ":train"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN"}


@dataclass
class Job:
    name: str
    point: dict[str, str]
    args: list[str]  # component arguments
    handle: str | None = None
    state: str = "PENDING"
    seconds: float = 0.0
    started: float = field(default=0.0, repr=False)


def component_args(
    preset: str,
    overrides: list[str],
    *,
    run_dir: str | None,
    tracking_uri: str,
    parent_run_id: str | None,
    data: str | None = None,
    cpu: int = 2,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    name: str = "fuxi-train",
) -> list[str]:
    """The `train` component's arguments; `overrides` become its trailing `--set` values."""
    args = [
        "--preset",
        preset,
        "--tracking_uri",
        tracking_uri,
        "--cpu",
        str(cpu),
        "--nproc_per_node",
        str(nproc_per_node),
        "--nnodes",
        str(nnodes),
        "--name",
        name,
    ]
    if run_dir:
        args += ["--run_dir", run_dir]
    if parent_run_id:
        args += ["--parent_run_id", parent_run_id]
    if data:
        args += ["--data", data]
    return args + list(overrides)


def parse_scheduler_args(text: str | None) -> dict[str, Any]:
    """'log_dir=runs/x,queue=default' -> dict (the same syntax as `torchx run --scheduler_args`)."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if part.strip():
            key, _, value = part.partition("=")
            out[key.strip()] = value.strip()
    return out


def _component_defaults(load_sections: Callable[..., dict[str, dict[str, str]]]) -> dict[str, str]:
    """The `[component:<file>:train]` defaults of .torchxconfig ($TORCHXCONFIG, else ./.torchxconfig) for
    COMPONENT, as `torchx run` applies them, so a cluster's resource and tracking settings hold for sweeps
    and the nightly job too. The section names the file as `torchx run` is given it (relative to the
    working directory); COMPONENT is absolute."""
    path, _, fn = COMPONENT.rpartition(":")
    for name, values in load_sections(prefix="component").items():
        file, _, section_fn = name.rpartition(":")
        if section_fn == fn and Path(file).resolve() == Path(path).resolve():
            return values
    return {}


class Launcher:
    """One TorchX runner on one scheduler. Use as a context manager (the runner is closed on exit)."""

    def __init__(self, scheduler: str = "local_cwd", cfg: dict[str, Any] | None = None) -> None:
        from torchx.runner import get_runner
        from torchx.runner.config import load_sections

        if scheduler.startswith("local"):
            # local schedulers run `torchrun` from PATH: make it this environment's
            bindir = str(Path(sys.executable).parent)
            if not os.environ.get("PATH", "").startswith(bindir):
                os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        self.scheduler = scheduler
        self.cfg = dict(cfg or {})
        self.runner = get_runner(component_defaults={COMPONENT: _component_defaults(load_sections)})

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.runner.close()

    def cancel(self, job: Job) -> None:
        """Stop a job in flight (its state becomes CANCELLED; `run` does not wait for it further)."""
        if job.handle is not None and job.state not in TERMINAL:
            self.runner.cancel(job.handle)
            job.state, job.seconds = "CANCELLED", time.monotonic() - job.started

    def run(
        self,
        jobs: list[Job],
        parallel: int = 1,
        poll_seconds: float = 2.0,
        log: Callable[[str], Any] = print,
        on_poll: Callable[[Job], None] | None = None,
    ) -> list[Job]:
        """Submit the jobs, at most `parallel` in flight, and wait until each is terminal; `job.state` and
        `job.seconds` record the outcome. `on_poll(job)` runs after each status read of a job in flight
        (also the read that finds it terminal); whatever it raises cancels the jobs still in flight."""
        pending, running = list(jobs), []
        try:
            while pending or running:
                while pending and len(running) < max(1, parallel):
                    job = pending.pop(0)
                    job.handle = self.runner.run_component(COMPONENT, job.args, self.scheduler, cfg=self.cfg)
                    job.started, job.state = time.monotonic(), "SUBMITTED"
                    log(f"[torchx] submitted {job.name}: {job.handle}")
                    running.append(job)
                time.sleep(poll_seconds)
                for job in list(running):
                    status = self.runner.status(job.handle)
                    state = status.state.name if status is not None else "UNKNOWN"
                    if on_poll is not None:
                        on_poll(job)
                    if state in TERMINAL:
                        job.state, job.seconds = state, time.monotonic() - job.started
                        running.remove(job)
                        log(f"[torchx] {job.name}: {state} in {job.seconds:.0f}s")
        except BaseException:
            for job in running:
                self.cancel(job)
            raise
        return jobs


def run_jobs(
    jobs: list[Job],
    scheduler: str = "local_cwd",
    scheduler_cfg: dict[str, Any] | None = None,
    parallel: int = 1,
    poll_seconds: float = 2.0,
    log: Callable[[str], Any] = print,
) -> list[Job]:
    """Submit TorchX jobs, at most `parallel` in flight, and wait for all of them."""
    with Launcher(scheduler, scheduler_cfg) as launcher:
        return launcher.run(jobs, parallel, poll_seconds, log)
