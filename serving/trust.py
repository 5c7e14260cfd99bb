"""What serving loads, by an explicit list, and the checks every file passes before it is used.

A model folder (a registered version as downloaded, or `fuxi serve --model DIR`) and a checkpoint folder
are data, never code: `fuxi serve`, `fuxi recommend` and the registry never hand them to
`mlflow.pyfunc.load_model` (which imports `code/`, unpickles `python_model.pkl` or runs a
`model_code_path`). They are checked here first, with nothing imported from them:

  model folder       MLmodel (YAML, <= 64 KiB): one flavour, python_function, `loader_module:
                     serving.pyfunc`, `data: data/<name>`, no code / python_model / artifacts /
                     model_code_path / model_config, top-level keys from MLflow's own list; beside it only
                     MODEL_FILES, and `data/<name>` is the checkpoint folder
  checkpoint folder  only CHECKPOINT_FILES (`.metadata`, `*.distcp`, train.json, vocab.parquet,
                     item_index.faiss, item_index.json); no links, no sub-folders
  train.json         <= 16 MiB of strict JSON; its config parsed and validated, and the model it describes
                     built on the meta device (nothing allocated) and compared, tensor by tensor, with the
                     shapes `.metadata` records, whose bytes must lie in the shards on disk: only then is
                     a tensor allocated; the trainer state's types and ranges
  weights            the restricted DCP loader (pipeline/train/checkpoint.py); every value finite
  vocabulary         Parquet: unique, non-null raw ids, rows exactly 1..N in order, N + 1 = the table's rows
  item index         serving/item_index.py `read_index`: kind from its header, dimension, rows, vectors

Every refusal is a TrustError (a ValueError): one line naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

LOADER_MODULE = "serving.pyfunc"
MAX_MLMODEL_BYTES = 64 * 1024
MAX_TRAIN_JSON_BYTES = 16 * 1024 * 1024
# the model may claim this much more than its shards hold before it is refused unbuilt: a shard cut
# short is then reported by the loader with torch's reason; a claim far beyond the files never allocates
ALLOCATION_SLACK = 64 * 1024 * 1024

CHECKPOINT_FILES = ("train.json", "vocab.parquet", "item_index.faiss", "item_index.json", ".metadata")
_SHARD = re.compile(r"__\d+_\d+\.distcp")  # DCP's FileSystemWriter: __<rank>_<file>.distcp
MODEL_FILES = (
    "MLmodel",
    "conda.yaml",
    "python_env.yaml",
    "requirements.txt",
    "registered_model_meta",
    "input_example.json",
    "serving_input_example.json",
)
# MLmodel's top-level keys that MLflow writes for a pyfunc saved as serving/registry.py saves it: data
# about the model, none of them names code or a file to load
MLMODEL_KEYS = {
    "artifact_path",
    "flavors",
    "is_signature_from_type_hint",
    "metadata",
    "mlflow_version",
    "model_id",
    "model_size_bytes",
    "model_uuid",
    "name",
    "prompts",
    "run_id",
    "saved_input_example_info",
    "signature",
    "type_hint_from_example",
    "utc_time_created",
}
PYFUNC_KEYS = {"loader_module", "data", "env", "python_version", "streamable", "code"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder, model or alias name: no path


class TrustError(ValueError):
    """A file or folder serving refuses to load; the message is one line naming it (a crafted name's
    newlines, terminal escapes or NUL are written escaped, so the line stays one and shows what is there)."""

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else ascii(c)[1:-1] for c in message))


def check_name(value: str, what: str) -> str:
    """A plain name (letters, digits, . _ -, not starting with . or -): no path, nothing to escape with."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in {".", ".."}:
        raise TrustError(f"{what} {str(value)[:80]!r}: expected a plain name (letters, digits, . _ -)")
    return value


# ---------------------------------------------------------------------------------------------------
# folders


def check_checkpoint_folder(folder: str | Path) -> Path:
    """`folder` if it holds only the files a checkpoint may hold (module docstring); else TrustError."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.resolve().is_dir():
        raise TrustError(f"{folder}: a link to no folder")
    if not folder.is_dir():
        raise TrustError(f"{folder}: not a checkpoint folder")
    shards = 0
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            raise TrustError(f"{entry}: a link; a checkpoint folder holds only plain files")
        if entry.name not in CHECKPOINT_FILES and not _SHARD.fullmatch(entry.name):
            kind = "folder" if entry.is_dir() else "file"
            raise TrustError(
                f"{entry}: unexpected {kind} in a checkpoint folder (expected .metadata, *.distcp, "
                "train.json, vocab.parquet, item_index.faiss, item_index.json)"
            )
        if not entry.is_file():
            raise TrustError(f"{entry}: not a plain file")
        shards += entry.name.endswith(".distcp")
    for need in (".metadata", "train.json"):
        if not (folder / need).is_file():
            raise TrustError(f"{folder}: no {need}; not a complete checkpoint")
    if not shards:
        raise TrustError(f"{folder}: no *.distcp shard; not a complete checkpoint")
    return folder


def check_model_folder(folder: str | Path) -> Path:
    """A model folder as registry.register logs it -> its checkpoint folder (checked); else TrustError.
    Reads MLmodel as YAML data (safe_load); imports and runs nothing from the folder."""
    import yaml

    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if mlmodel.is_symlink() or not mlmodel.is_file():
        raise TrustError(f"{folder}: no MLmodel file; not a model folder")
    if mlmodel.stat().st_size > MAX_MLMODEL_BYTES:
        raise TrustError(f"{mlmodel}: {mlmodel.stat().st_size} bytes, at most {MAX_MLMODEL_BYTES}")
    try:
        doc = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TrustError(f"{mlmodel}: not YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise TrustError(f"{mlmodel}: expected a mapping with flavors")
    extra = sorted(str(k) for k in doc if k not in MLMODEL_KEYS)
    if extra:
        raise TrustError(f"{mlmodel}: unexpected key {extra[0]!r}; refusing to load this model")
    flavors = doc["flavors"]
    others = sorted(str(k) for k in flavors if k != "python_function")
    if others:
        raise TrustError(
            f"{mlmodel}: flavour {others[0]!r}; only python_function ({LOADER_MODULE}) is served"
        )
    pyfunc = flavors.get("python_function")
    if not isinstance(pyfunc, dict):
        raise TrustError(f"{mlmodel}: no python_function flavour")
    extra = sorted(str(k) for k in pyfunc if k not in PYFUNC_KEYS)
    if extra:  # python_model (a pickle), artifacts, model_code_path, model_config, ...
        raise TrustError(
            f"{mlmodel}: python_function.{extra[0]} is set; only {LOADER_MODULE} with a data folder is served"
        )
    if pyfunc.get("code") is not None:
        raise TrustError(f"{mlmodel}: python_function.code is set; code is never loaded from a model folder")
    if pyfunc.get("loader_module") != LOADER_MODULE:
        raise TrustError(
            f"{mlmodel}: loader_module {str(pyfunc.get('loader_module'))[:80]!r}, expected {LOADER_MODULE}"
        )
    data = pyfunc.get("data")
    parts = data.split("/") if isinstance(data, str) else []
    if len(parts) != 2 or parts[0] != "data" or not _NAME.fullmatch(parts[1]):
        raise TrustError(f"{mlmodel}: data {str(data)[:80]!r}, expected data/<checkpoint folder name>")
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            raise TrustError(f"{entry}: a link; a model folder holds only plain files")
        if entry.name == "data" and entry.is_dir():
            continue
        if entry.name not in MODEL_FILES or not entry.is_file():
            raise TrustError(
                f"{entry}: unexpected {'folder' if entry.is_dir() else 'file'} in a model folder"
            )
    inside = sorted((folder / "data").iterdir())
    if [p.name for p in inside] != [parts[1]]:
        names = [p.name for p in inside][:3]
        raise TrustError(f"{folder / 'data'}: expected only {parts[1]}/, found {names}")
    if inside[0].is_symlink():  # a checkpoint that lives elsewhere is not this model's
        raise TrustError(f"{inside[0]}: a link; a model folder holds only plain files")
    return check_checkpoint_folder(inside[0])


def copy_checkpoint(src: str | Path, dest: str | Path) -> Path:
    """Copy a checkpoint folder file by file, links never followed (the folder is checked first)."""
    src = check_checkpoint_folder(src)
    dest = Path(dest)
    dest.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        shutil.copyfile(entry, dest / entry.name, follow_symlinks=False)
    return dest


def resolve_served_checkpoint(path: str | Path) -> Path:
    """A local `--model`: a model folder (MLmodel), a checkpoint folder, or a run's checkpoint root (its
    final, else latest, which must lie inside the root). Checked; TrustError otherwise."""
    from pipeline.train.checkpoint import is_complete, resolve_checkpoint

    path = Path(path)
    if (path / "MLmodel").exists():
        return check_model_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_complete(path):
        return check_checkpoint_folder(path)
    found = Path(resolve_checkpoint(path))  # local: a generation folder under the root
    real, root = found.resolve(), path.resolve()
    if real.parent != root:
        raise TrustError(f"{found}: names {real}, outside its root {root}")
    return check_checkpoint_folder(found)


# ---------------------------------------------------------------------------------------------------
# train.json


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json(file: Path, limit: int, allow_nan: bool = False) -> Any:
    """Strict JSON of at most `limit` bytes (no duplicate keys; NaN / Infinity only with allow_nan)."""
    size = file.stat().st_size
    if size > limit:
        raise TrustError(f"{file}: {size} bytes, at most {limit}")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            dup = next(k for k, _ in items if k in seen or seen.add(k))
            raise ValueError(f"duplicate key {dup!r}")
        return out

    try:
        return json.loads(
            file.read_bytes(),
            object_pairs_hook=pairs,
            parse_constant=None if allow_nan else _reject_constant,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits, nesting
        raise TrustError(f"{file}: not valid JSON ({type(exc).__name__}: {str(exc)[:160]})") from None


def _check_trainer(file: Path, state: Any) -> None:
    """The trainer state train.json carries: the trainer's own check (types and ranges), naming the file."""
    from pipeline.train.trainer import check_state

    try:
        check_state(state)
    except ValueError as exc:
        raise TrustError(f"{file}: {exc}") from None


def _check_tree(file: Path, default: Any, data: Any, at: str) -> None:
    """Every section of the config an object, with only the fields its dataclass has (from_dict would
    otherwise skip what it does not know and take defaults for a section that is not an object)."""
    if not isinstance(data, dict):
        raise TrustError(f"{file}: {at}: expected an object")
    fields = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    extra = sorted(str(k) for k in data if k not in fields)
    if extra:
        raise TrustError(f"{file}: {at}.{extra[0][:40]}: unknown field")
    for name, value in fields.items():
        if dataclasses.is_dataclass(value) and name in data:
            _check_tree(file, value, data[name], f"{at}.{name}")


def read_train_json(folder: Path) -> tuple[dict[str, Any], Any]:
    """(the whole train.json, its TrainConfig validated): no tensor is allocated here."""
    from pipeline.train.config import TrainConfig, from_dict, validate

    file = folder / "train.json"
    meta = read_json(file, MAX_TRAIN_JSON_BYTES, allow_nan=True)  # metrics may be NaN or -Infinity
    if not isinstance(meta, dict):
        raise TrustError(f"{file}: expected a JSON object")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise TrustError(f"{file}: no training config (key 'config')")
    _check_tree(file, TrainConfig(), config, "config")
    try:
        cfg = validate(from_dict(TrainConfig, config))
    except Exception as exc:  # a wrong type anywhere in the tree surfaces as TypeError, ValueError, ...
        message = " ".join(str(exc).split())[:200]
        raise TrustError(f"{file}: config: {message or type(exc).__name__}") from None
    if "trainer" in meta:
        _check_trainer(file, meta["trainer"])
    return meta, cfg


# ---------------------------------------------------------------------------------------------------
# weights: shapes before any allocation, values after


def check_shapes(folder: Path, model_cfg: Any) -> None:
    """The model train.json describes, built on the meta device, against `.metadata`: every tensor present
    with its shape and dtype, and the bytes they claim present in the shards (within ALLOCATION_SLACK).
    Runs before the model is built for real, so a config or metadata claiming a huge table is refused
    without allocating it."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from model.recommender import build_model
    from pipeline.train.checkpoint import read_dcp_metadata

    try:
        expected = build_model(model_cfg, device="meta").state_dict()
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise TrustError(f"{folder / 'train.json'}: config.model builds no model ({message})") from None
    saved = read_dcp_metadata(folder).state_dict_metadata
    claimed = 0
    for key, tensor in expected.items():
        md = saved.get(f"model.{key}")
        if md is None:
            raise TrustError(f"{folder}: no tensor model.{key} in .metadata")
        if not isinstance(md, TensorStorageMetadata):
            raise TrustError(
                f"{folder}: entry 'model.{key}' is not plain data: .metadata records a pickled object "
                "where the model has a tensor"
            )
        if tuple(md.size) != tuple(tensor.shape):
            raise TrustError(
                f"{folder}: model.{key} has shape {tuple(md.size)} in .metadata, {tuple(tensor.shape)} by "
                "train.json's config"
            )
        if md.properties.dtype != tensor.dtype:
            raise TrustError(
                f"{folder}: model.{key} is {md.properties.dtype} in .metadata, not {tensor.dtype}"
            )
        claimed += tensor.numel() * tensor.element_size()
    on_disk = sum(p.stat().st_size for p in folder.glob("*.distcp"))
    if claimed > on_disk + ALLOCATION_SLACK:
        raise TrustError(f"{folder}: the model's tensors take {claimed} bytes, its shards hold {on_disk}")


def check_finite(folder: Path, model: Any) -> None:
    """Every loaded weight finite: a NaN or infinite weight would score items NaN or +-inf."""
    import torch

    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrustError(f"{folder}: model.{name} holds non-finite values")


# ---------------------------------------------------------------------------------------------------
# vocabulary


def check_vocabulary(file: Path, num_items: int) -> Any:
    """The checkpoint's vocabulary, checked against the model's table by the data path's own check
    (pipeline/data/vocab.py: raw ids non-null and unique, rows exactly 1..N in order, N + 1 = the table's
    rows), its refusal as a TrustError."""
    from pipeline.data import vocab

    try:
        return vocab.check_vocabulary(file, num_items, table="the model's table")
    except ValueError as exc:
        raise TrustError(str(exc)) from None
