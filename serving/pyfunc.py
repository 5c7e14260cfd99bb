"""Online top-k: the MLflow pyfunc flavour of a registered model, its request checks, and `fuxi serve`.

The registered model is MLflow's `loader_module` pyfunc flavour: MLModel names this module, `data/` holds
the checkpoint folder (DCP shards, train.json, vocab.parquet, optionally item_index.faiss), and
`_load_pyfunc(data_path)` loads it with `serving.loading.load_checkpoint_model`. Nothing is
pickled (no python_model.pkl, no code_paths): the code comes from the installed package.

Request (the model signature documents it; JSON as MLflow's scoring server takes it):

    POST /invocations
    {"dataframe_records": [{"item_ids": [5, 17, 3], "timestamps": [t0, t1, t2], "request_time": t3}, ...],
     "params": {"k": 10, "filter_seen": true, "use_index": false}}

  item_ids      list of raw item ids (ints, or strings for a string vocabulary), oldest first, 1..1000;
                ids the model does not know are dropped and counted in `ignored` (a user with no known
                id gets empty item_ids and scores)
  timestamps    optional, list of ints (seconds), one per item (default: all 0)
  request_time  optional int (default: the last timestamp): FuXi-alpha's temporal channel reads it
  k             1..1000 (capped at the catalogue size); filter_seen: drop the history's items;
                use_index: the model's faiss index instead of the exact scan (400 if it has none)
Response: {"predictions": [{"item_ids": [...], "scores": [...], "ignored": n}, ...]}, best first.

A malformed request (wrong types, ids or times outside int64 / 0..2^40, empty history, k <= 0, a history
longer than the limit, too many users, unknown fields) is an `MlflowException(INVALID_PARAMETER_VALUE)`:
HTTP 400 whose message names the field, without a stack trace. Plain `mlflow models serve` drops unknown
columns and params with a warning before the model sees them, and answers some type errors from its own
schema enforcement; `fuxi serve` (serving/server.py) answers /invocations itself with the same rules on the
raw JSON, and loads only what serving/trust.py allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FIELDS = ("item_ids", "timestamps", "request_time")
PARAMS = {"k": 10, "filter_seen": True, "use_index": False}
DATA_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")
MAX_HISTORY = 1000  # items per history (the model reads the last max_sequence_length; all are filtered)
MAX_USERS = 256  # users per request
MAX_K = 1000
MAX_ID_CHARS = 256  # a string item id
INT64 = (-(2**63), 2**63 - 1)  # integer item ids: the vocabulary's key type
TIMES = (0, 2**40)  # timestamps and request times, seconds (the temporal channel's range; ~36,800 years)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (a server's settings: `fuxi serve --max-k ...`)."""

    max_users: int = MAX_USERS
    max_history: int = MAX_HISTORY
    max_k: int = MAX_K


class RequestError(ValueError):
    """A malformed request; `field` names what is wrong (e.g. "dataframe_records[2].item_ids")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_item(x: Any, item_type: str) -> bool:
    if item_type == "string":
        return isinstance(x, str) and 0 < len(x) <= MAX_ID_CHARS
    return _is_int(x) and INT64[0] <= x <= INT64[1]


def _is_time(x: Any) -> bool:
    return _is_int(x) and TIMES[0] <= x < TIMES[1]


@dataclass
class Request:
    histories: list[list[Any]]  # raw item ids
    timestamps: list[list[int]]
    request_times: list[int | None]
    k: int
    filter_seen: bool
    use_index: bool


def _names(obj: dict[Any, Any], at: str) -> list[str]:
    """The keys of a JSON-ish object, which must all be strings (a DataFrame's columns may be anything)."""
    bad = next((k for k in obj if not isinstance(k, str)), None)
    if bad is not None:
        raise RequestError(at, f"field name {str(bad)[:40]!r} is not a string")
    return list(obj)


def check_request(
    records: Any,
    params: Any,
    item_type: str = "long",
    where: str = "inputs",
    limits: Limits = Limits(),
) -> Request:
    """Validate users' records + params (the raw JSON shape: lists, dicts, scalars) into a Request.
    Raises RequestError naming the first bad field. Shared by the pyfunc and `fuxi serve`."""
    if not isinstance(records, list):
        raise RequestError(where, "expected a list of users")
    if not records:
        raise RequestError(where, "no users")
    if len(records) > limits.max_users:
        raise RequestError(where, f"{len(records)} users, at most {limits.max_users} per request")
    histories, stamps, nows = [], [], []
    for u, rec in enumerate(records):
        at = f"{where}[{u}]"
        if not isinstance(rec, dict):
            raise RequestError(at, "expected an object with item_ids (and timestamps, request_time)")
        unknown = sorted(set(_names(rec, at)) - set(FIELDS))
        if unknown:
            raise RequestError(f"{at}.{unknown[0]}", f"unknown field (expected one of {', '.join(FIELDS)})")
        items = rec.get("item_ids")
        if items is None:
            raise RequestError(f"{at}.item_ids", "missing")
        if not isinstance(items, list):
            raise RequestError(f"{at}.item_ids", "expected a list")
        if not items:
            raise RequestError(f"{at}.item_ids", "empty history: at least one item id is needed")
        if len(items) > limits.max_history:
            raise RequestError(f"{at}.item_ids", f"{len(items)} items, at most {limits.max_history}")
        if not all(_is_item(i, item_type) for i in items):
            kind = f"strings of 1..{MAX_ID_CHARS} characters" if item_type == "string" else "64-bit integers"
            raise RequestError(f"{at}.item_ids", f"expected a list of {kind}")
        times = rec.get("timestamps")
        if times is None:
            times = [0] * len(items)
        elif not isinstance(times, list) or not all(_is_time(t) for t in times):
            raise RequestError(f"{at}.timestamps", "expected a list of integers in 0..2^40 (seconds)")
        elif len(times) != len(items):
            raise RequestError(f"{at}.timestamps", f"{len(times)} timestamps for {len(items)} item ids")
        now = rec.get("request_time")
        if now is not None and not _is_time(now):
            raise RequestError(f"{at}.request_time", "expected an integer in 0..2^40 (seconds)")
        histories.append(list(items))
        stamps.append([int(t) for t in times])
        nows.append(None if now is None else int(now))
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RequestError("params", "expected an object")
    unknown = sorted(set(_names(params, "params")) - set(PARAMS))
    if unknown:
        raise RequestError(f"params.{unknown[0]}", f"unknown parameter (expected one of {', '.join(PARAMS)})")
    k = params.get("k", PARAMS["k"])
    if not _is_int(k):
        raise RequestError("params.k", "expected an integer")
    if not 1 <= k <= limits.max_k:
        shown = str(k) if abs(k) < 10**12 else f"{str(k)[:12]}..."
        raise RequestError("params.k", f"{shown}: expected 1 <= k <= {limits.max_k}")
    flags = {}
    for name in ("filter_seen", "use_index"):
        value = params.get(name, PARAMS[name])
        if not isinstance(value, (bool, np.bool_)):
            raise RequestError(f"params.{name}", "expected true or false")
        flags[name] = bool(value)
    return Request(histories, stamps, nows, int(k), flags["filter_seen"], flags["use_index"])


def _plain(x: Any) -> Any:
    """A DataFrame cell as plain Python: arrays -> lists, NaN/None -> None, numpy scalars -> Python."""
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, np.generic):
        return x.item()
    return x


def frame_records(model_input: pd.DataFrame | dict | list) -> list[dict[str, Any]]:
    """The pyfunc's input (what MLflow hands `predict` after its schema enforcement) as records."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = pd.DataFrame(model_input).to_dict(orient="records")
    else:
        rows = list(model_input)
    return [{str(k): _plain(v) for k, v in r.items() if _plain(v) is not None} for r in rows]


# ---------------------------------------------------------------------------------------------------
# the pyfunc


class TopKModel:
    """A checkpoint served as top-k: `predict(DataFrame, params)` -> DataFrame(item_ids, scores, ignored).
    The checkpoint is a local folder or a URI on a store (staged locally by `load_checkpoint_model`).
    Exact scan over the item table by default (`serving.item_index.exact_top_k`, the same function the
    batch job uses), the faiss index with use_index."""

    def __init__(self, checkpoint: str | Path) -> None:
        from serving.item_index import read_index
        from serving.loading import load_checkpoint_model

        self.loaded = load_checkpoint_model(checkpoint, device="cpu")  # checked: serving/trust.py
        self.items_VD = self.loaded.item_vectors()
        found = read_index(self.loaded.path, self.items_VD)  # checked against the table it indexes
        self.index, self.index_meta = found if found is not None else (None, {})
        vocab = self.loaded.vocab
        self.item_type = "string" if vocab is not None and vocab.key_type == "string" else "long"

    def answer(self, req: Request) -> list[dict[str, Any]]:
        """One {"item_ids", "scores", "ignored"} per user, plain Python: best first, never the padding
        row, a seen item (with filter_seen) or a non-finite score, so fewer than k when the catalogue runs
        out (a user with no known item gets empty lists)."""
        from serving.item_index import exact_top_k, index_top_k, valid_slots

        if req.use_index and self.index is None:
            raise RequestError("params.use_index", "this model version has no item index")
        rows, stamps, ignored = self.loaded.known_rows(req.histories, req.timestamps)
        # the raw history's last timestamp is the default request time, even when that item is unknown
        nows = [
            now if now is not None else (raw[-1] if raw else 0)
            for now, raw in zip(req.request_times, req.timestamps)
        ]
        known = [u for u, r in enumerate(rows) if r]  # a user with no known item gets no recommendations
        out = [{"item_ids": [], "scores": [], "ignored": int(n)} for n in ignored]
        if known:
            user_BD = self.loaded.user_vectors(
                [rows[u] for u in known], [stamps[u] for u in known], [nows[u] for u in known]
            )
            seen = [rows[u] for u in known] if req.filter_seen else None
            if req.use_index:
                scores, top = index_top_k(self.index, user_BD, seen, req.k)
            else:
                scores, top = exact_top_k(user_BD, self.items_VD, seen, req.k)
            for j, u in enumerate(known):
                kept_s, kept_r = valid_slots(scores[j], top[j])
                out[u]["item_ids"] = self.loaded.raw_ids(kept_r)
                out[u]["scores"] = [float(x) for x in kept_s]
        return out

    def recommend(self, req: Request) -> pd.DataFrame:
        """`answer` as the pyfunc's DataFrame (columns item_ids, scores, ignored)."""
        rows = self.answer(req)
        return pd.DataFrame(
            {
                "item_ids": [r["item_ids"] for r in rows],
                "scores": [np.asarray(r["scores"], dtype=np.float64) for r in rows],
                "ignored": [r["ignored"] for r in rows],
            }
        )

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.recommend(check_request(frame_records(model_input), params, self.item_type))
        except (RequestError, ValueError) as exc:
            # MLflow's scoring server answers MlflowException with its error code's HTTP status (400
            # here) and a JSON body of error_code + message; no stack_trace is attached
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def _load_pyfunc(data_path: str) -> TopKModel:
    """MLflow's loader_module entry point: data_path is the model's copy of the checkpoint folder."""
    return TopKModel(data_path)


def signature(item_type: str = "long") -> Any:
    """The request/response schema of the served model (shown by MLflow's UI and `models:/` metadata)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(Array(item_type), "item_ids"),
                ColSpec(Array("long"), "timestamps", required=False),
                ColSpec("long", "request_time", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec(Array(item_type), "item_ids"),
                ColSpec(Array("double"), "scores"),
                ColSpec("long", "ignored"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("k", "long", PARAMS["k"]),
                ParamSpec("filter_seen", "boolean", PARAMS["filter_seen"]),
                ParamSpec("use_index", "boolean", PARAMS["use_index"]),
            ]
        ),
    )
