"""Model registry: register a finished run's DCP checkpoint as an MLflow pyfunc; promote to `champion`.

A sharded model cannot go through `mlflow.pytorch.log_model` (pt2 export), so the registered model is the
checkpoint folder (DCP shards + train.json with the full config, + the faiss item index when built) in
MLflow's `loader_module` pyfunc flavour: MLModel names `serving.pyfunc`, whose `_load_pyfunc(data_path)`
loads the folder through `serving.loading.load_checkpoint_model`. No python_model object and no
code_paths are logged, so loading unpickles nothing: the code is the installed package's. Loading needs
no cluster and no process group: DCP reshards the model to one CPU process.

    model = mlflow.pyfunc.load_model("models:/fuxi-alpha@champion")
    model.predict(pd.DataFrame({"item_ids": [[5, 17, 3]], "timestamps": [[t0, t1, t2]]}), params={"k": 10})
    -> DataFrame with columns item_ids (top-k, best first), scores and ignored (history ids unknown to
       the model, dropped); serving/pyfunc.py documents the request and its checks
Item ids are raw ids (integers or strings, as in the logs) when the training data had a vocabulary (the
checkpoint folder carries it); otherwise table rows.

Checkpoints and caches may live on an object store: `register` takes a checkpoint URI (`s3://.../checkpoints`,
a pointer or a generation) and stages its generation locally (serving.loading.local_checkpoint: a copy by
the storage layer, links never followed) before the folder checks and MLflow's upload. A registered
version's copy (`version_checkpoint`) is a commit root at `dest` on any store: the downloaded model folder,
checked, is copied into a fresh generation and the pointer `complete` is written last, so a copy cut short
is never used and two processes fetching one version agree on one generation.

Promotion: a version becomes `champion` only if its validation metric beats the champion's, both measured
on the same validation split (`promote_if_better`). Anything that fails before the alias is set leaves
the champion as it was.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import storage

MODEL_NAME = "fuxi-alpha"
CHAMPION = "champion"
SELECT_METRIC = "ndcg_at_10"  # the trainer's model-selection metric
LOADER_MODULE = "serving.pyfunc"  # the pyfunc's code: imported from the installed package at load time


# ---------------------------------------------------------------------------------------------------
# inference without the cluster


class Recommender:
    """A checkpoint loaded on one CPU process: top-k items for user histories (`LoadedModel.top_k`)."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded  # serving.loading.LoadedModel
        self.model = loaded.model

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> Recommender:
        from serving.loading import load_checkpoint_model

        return cls(load_checkpoint_model(checkpoint, device="cpu"))

    def top_k(
        self,
        histories: list[list[int]],
        timestamps: list[list[int]] | None = None,
        request_times: list[int] | None = None,
        k: int = 10,
        filter_seen: bool = True,
    ) -> tuple[list[list[Any]], list[np.ndarray], list[int]]:
        """(raw item ids per user, their scores, unknown history ids per user); see `LoadedModel.top_k`."""
        return self.loaded.top_k(histories, timestamps, request_times, k, filter_seen)


def _signature(item_type: str = "long") -> Any:
    from serving.pyfunc import signature

    return signature(item_type)


def _item_type(checkpoint: str | Path) -> str:
    """The MLflow type of the model's raw item ids: from the vocabulary it carries (ids are rows without)."""
    from serving.loading import checkpoint_vocabulary

    vocab = checkpoint_vocabulary(checkpoint)
    return "string" if vocab is not None and vocab.key_type == "string" else "long"


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{pkg}=={version(pkg).split('+')[0]}"
        for pkg in ("torch", "torchrec", "fbgemm-gpu-cpu", "numpy", "pandas", "pyarrow", "mlflow")
    ]


# ---------------------------------------------------------------------------------------------------
# register / evaluate / promote


def run_checkpoint(client: Any, run_id: str) -> str | Path:
    """The latest complete checkpoint a training run wrote (its run_dir, else the default layout): on
    local disk the folder, checked (serving/trust.py); on an object store the generation's URI (checked
    when it is staged for loading)."""
    from pipeline.train.checkpoint import resolve_checkpoint
    from serving.trust import check_name, resolve_served_checkpoint

    params = client.get_run(run_id).data.params
    run_dir = params.get("run_dir")
    if not run_dir or run_dir == "None":
        name = params.get("name", "")
        run_dir = storage.join(
            params.get("output_dir", "runs"),
            *([check_name(name, "run name")] if name else []),
            run_id,
            field="run directory",
        )
    root = storage.join(run_dir, "checkpoints", field="run directory")
    return resolve_served_checkpoint(root) if storage.is_local(root) else resolve_checkpoint(root)


def register(
    client: Any,
    run_id: str,
    name: str = MODEL_NAME,
    checkpoint: str | Path | None = None,
    tags: dict[str, str] | None = None,
    index: bool = False,
) -> Any:
    """Log the run's checkpoint as a pyfunc model in the run and register it; returns the ModelVersion.
    index: also build the faiss item index (serving/item_index.py, HNSW defaults) into the logged folder."""
    import mlflow
    import mlflow.pyfunc

    from serving.loading import local_checkpoint
    from serving.trust import copy_checkpoint, resolve_served_checkpoint

    source = checkpoint if checkpoint else run_checkpoint(client, run_id)
    if not storage.is_local(os.fspath(source)):  # a root or a pointer: the generation it names
        from pipeline.train.checkpoint import resolve_checkpoint

        source = resolve_checkpoint(source)
    ckpt = resolve_served_checkpoint(local_checkpoint(source))  # a store's generation: a local copy
    run = client.get_run(run_id)
    mlflow.set_tracking_uri(client.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        staged = copy_checkpoint(ckpt, Path(tmp) / ckpt.name)  # the listed files; links refused
        if index:
            from serving.item_index import index_checkpoint
            from serving.loading import load_checkpoint_model

            index_checkpoint(load_checkpoint_model(staged))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module=LOADER_MODULE,
                data_path=str(staged),  # copied to <model>/data/<checkpoint name>
                signature=_signature(_item_type(ckpt)),
                pip_requirements=_requirements(),
            )
    version_tags = {
        "checkpoint": storage.display(os.fspath(source))
        if not storage.is_local(os.fspath(source))
        else str(ckpt),
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        "data.meta": run.data.tags.get("data.meta", ""),
        "data.source": run.data.params.get("data.source", ""),
        **(tags or {}),
    }
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(name)
    # model_id: a tracking server checks that a `models:/m-...` source names the logged model given here
    # (a local store accepts the source alone)
    mv = client.create_model_version(
        name, info.model_uri, run_id=run_id, tags=version_tags, model_id=info.model_id
    )
    return mv


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | None = None, split: str = "valid"
) -> dict[str, float]:
    """Full-ranking metrics of a checkpoint on a split of `data` (default: the data it was trained on)."""
    from serving.loading import evaluate_checkpoint as evaluate

    return evaluate(checkpoint, data, split)


def champion(client: Any, name: str = MODEL_NAME) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model, or no alias yet
        return None


VERSION_POINTER = "complete"  # the pointer of a version's copy (a commit root at `dest`)


def version_checkpoint(client: Any, name: str, version: str | int, dest: str | Path) -> str | Path:
    """A copy of a registered version's checkpoint at `dest` (a path or a URI), downloaded from the
    artifact store once and checked as a model folder before anything reads it (serving/trust.py): the
    project's own files only. `dest` is a commit root (storage/commit.py): the checked model folder is
    copied into a generation, then the pointer `complete` names it. Returns the checkpoint folder: a
    checked local folder, or on an object store its URI (checked again where it is staged to load)."""
    import mlflow.artifacts

    from serving.trust import check_model_folder, check_name

    check_name(name, "model name")
    check_name(str(version), "model version")
    root = storage.CommitRoot(dest)
    pointer = root.read(VERSION_POINTER)
    if pointer is None:
        with tempfile.TemporaryDirectory(prefix="fuxi-version-") as tmp:
            model = os.path.join(tmp, "model")
            os.mkdir(model)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=model, tracking_uri=client.tracking_uri
            )
            if os.path.realpath(local) != os.path.realpath(model):
                raise FileNotFoundError(f"models:/{name}/{version}: downloaded to {local}, expected {model}")
            check_model_folder(model)  # before anything is copied on
            generation = root.new_generation()
            storage.copy_tree(model, storage.join(generation, "model"))  # links refused, names confined
        try:
            pointer = root.commit(
                VERSION_POINTER, generation, expect=None, meta={"model": f"{name}/{version}"}
            )
        except storage.CommitConflict:  # another process committed its copy first: use that one
            storage.delete(generation, recursive=True)
            pointer = root.read(VERSION_POINTER)
            assert pointer is not None
    model_uri = storage.join(pointer.uri, "model")
    if storage.is_local(model_uri):
        return check_model_folder(model_uri)
    data = [n for n in storage.listdir(storage.join(model_uri, "data")) if not n.startswith(".")]
    if len(data) != 1:
        raise FileNotFoundError(
            f"{storage.display(model_uri)}: expected one checkpoint under data/, found {data[:3]}"
        )
    return storage.join(model_uri, "data", data[0], field="model data folder")


@dataclass
class Decision:
    promoted: bool
    version: str
    metric: str
    candidate: float
    champion_version: str | None
    champion: float | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def promote_if_better(
    client: Any,
    name: str,
    version: str | int,
    *,
    candidate_metric: float | None = None,
    champion_metric: float | None = None,
    data: str | None = None,
    metric: str = SELECT_METRIC,
    workdir: str | Path | None = None,
    min_delta: float = 0.0,
) -> Decision:
    """Set `champion` to `version` only if it beats the current champion on the validation metric.

    Pass both metrics when the caller measured them on the same split (the nightly job does); otherwise
    both checkpoints are evaluated here on the validation split of `data` (default: the candidate's data).
    """
    version = str(version)
    current = champion(client, name)
    if current is not None and str(current.version) == version:
        return Decision(False, version, metric, float("nan"), version, None, "already champion")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fspath(workdir or tmp)
        if candidate_metric is None:
            cand_ckpt = version_checkpoint(client, name, version, storage.join(root, f"v{version}"))
            candidate_metric = evaluate_checkpoint(cand_ckpt, data)[metric]
        if current is not None and champion_metric is None:
            champ_ckpt = version_checkpoint(
                client, name, current.version, storage.join(root, f"v{current.version}")
            )
            candidate_data = data or client.get_model_version(name, version).tags.get("data.source") or None
            champion_metric = evaluate_checkpoint(champ_ckpt, candidate_data)[metric]
    client.set_model_version_tag(name, version, f"valid_{metric}", f"{candidate_metric:.6f}")
    if current is None or champion_metric is None:
        better, reason = True, "no champion yet"
    else:
        better = candidate_metric > float(champion_metric) + min_delta
        reason = (
            f"valid {metric} {candidate_metric:.4f} {'>' if better else '<='} "
            f"champion v{current.version} {float(champion_metric):.4f}"
        )
    if better:
        client.set_registered_model_alias(name, CHAMPION, version)
    return Decision(
        better,
        version,
        metric,
        float(candidate_metric),
        None if current is None else str(current.version),
        None if champion_metric is None else float(champion_metric),
        reason,
    )
