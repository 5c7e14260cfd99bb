"""Metrics go through a tiny interface; MLflow is one backend, written by one rank, buffered.

Per-step synchronous MLflow logging costs ~5.6 ms a call on this class of machine; batching with
`log_batch` costs ~0.3 ms a step, so metrics are buffered and flushed every `flush_every` points.
Tracking URI: the config's, else $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working
directory. Metric names never contain '@' (MLflow rejects it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# the experiments hold training runs: the MLflow 3 UI opens such an experiment on its runs table
# (without the tag it asks what kind the experiment is, and may offer the GenAI traces view)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class MetricLogger(Protocol):
    @property
    def run_id(self) -> str | None: ...  # the MLflow run this logger writes to (None: it writes nowhere)

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...  # write what is buffered (the trainer calls it at every checkpoint)
    def close(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """The logger of every rank but the writing one, and of runs with tracking off."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created with the experiment-kind tag if needed (the tag is added to
    an existing experiment that lacks it). `artifact_location` applies only when it is created."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def absolute_tracking_uri(uri: str | None) -> str:
    """The tracking URI to hand to other processes (jobs, servers): a relative SQLite path made absolute,
    since they may run in another working directory."""
    uri = resolve_tracking_uri(uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def mlflow_client(tracking_uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=absolute_tracking_uri(tracking_uri))


def ensure_experiment(client: Any, name: str, artifact_root: str | Path | None = None) -> str:
    """Experiment id by name, created if needed (with the experiment-kind tag). With a SQLite store MLflow
    puts artifacts in ./mlruns of whichever process creates the experiment; pin them next to the database
    file instead."""
    location = None
    if artifact_root is not None:
        location = Path(artifact_root).resolve().as_uri()
    elif client.tracking_uri.startswith("sqlite:///"):
        location = (Path(client.tracking_uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
    return get_or_create_experiment(client, name, artifact_location=location)


class MLflowLogger:
    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        flush_every: int = 100,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        system_metrics: bool = True,
        run_id: str | None = None,
    ) -> None:
        """A new run; or, with `run_id`, that run continued (set RUNNING again: a resumed job)."""
        import mlflow
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self._metric_cls = Metric
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        exp_id = get_or_create_experiment(self.client, experiment)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_name:
            all_tags["mlflow.runName"] = run_name
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        self.run_id: str = run_id
        self.experiment_id = exp_id
        self.flush_every = flush_every
        self._buffer: list[Any] = []
        self._monitor = None
        if system_metrics:  # cpu, memory, disk, network (and GPU with pynvml) as system/* metrics
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # its start / stop / "no GPU" notices are INFO lines on every run; warnings still show
            logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)
            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=10, tracking_uri=self.tracking_uri
            )
            self._monitor.start()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if "@" in key:
                raise ValueError(f"metric name {key!r} contains '@', which MLflow rejects")
            self._buffer.append(self._metric_cls(key, float(value), now, step))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @staticmethod
    def end_run(run_id: str, tracking_uri: str | None, status: str) -> None:
        """Mark a run that an earlier attempt left RUNNING (it was killed) as ended with `status`."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=status)
        except MlflowException:  # the record names a run this store does not hold
            pass

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        if self._monitor is not None:
            self._monitor.finish()
        self.client.set_terminated(self.run_id, status=status)
