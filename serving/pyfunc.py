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

A malformed request (wrong types, empty history, k <= 0, a history longer than MAX_HISTORY, more than
MAX_USERS users, unknown fields) is an `MlflowException(INVALID_PARAMETER_VALUE)`: HTTP 400 whose
message names the field, without a stack trace. Plain `mlflow models serve` drops unknown columns and
params with a warning before the model sees them, and answers some type errors from its own schema
enforcement; `fuxi serve` runs the same MLflow scoring app behind `StrictRequests`, which checks the raw
JSON first (unknown fields included) with the same rules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
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


class RequestError(ValueError):
    """A malformed request; `field` names what is wrong (e.g. "dataframe_records[2].item_ids")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_item(x: Any, item_type: str) -> bool:
    return isinstance(x, str) if item_type == "string" else _is_int(x)


@dataclass
class Request:
    histories: list[list[Any]]  # raw item ids
    timestamps: list[list[int]]
    request_times: list[int | None]
    k: int
    filter_seen: bool
    use_index: bool


def check_request(records: Any, params: Any, item_type: str = "long", where: str = "inputs") -> Request:
    """Validate users' records + params (the raw JSON shape: lists, dicts, scalars) into a Request.
    Raises RequestError naming the first bad field. Shared by the pyfunc and `StrictRequests`."""
    if not isinstance(records, list):
        raise RequestError(where, "expected a list of users")
    if not records:
        raise RequestError(where, "no users")
    if len(records) > MAX_USERS:
        raise RequestError(where, f"{len(records)} users, at most {MAX_USERS} per request")
    histories, stamps, nows = [], [], []
    for u, rec in enumerate(records):
        at = f"{where}[{u}]"
        if not isinstance(rec, dict):
            raise RequestError(at, "expected an object with item_ids (and timestamps, request_time)")
        unknown = sorted(set(rec) - set(FIELDS))
        if unknown:
            raise RequestError(f"{at}.{unknown[0]}", f"unknown field (expected one of {', '.join(FIELDS)})")
        items = rec.get("item_ids")
        if items is None:
            raise RequestError(f"{at}.item_ids", "missing")
        if not isinstance(items, list) or not all(_is_item(i, item_type) for i in items):
            kind = "strings" if item_type == "string" else "integers"
            raise RequestError(f"{at}.item_ids", f"expected a list of {kind}")
        if not items:
            raise RequestError(f"{at}.item_ids", "empty history: at least one item id is needed")
        if len(items) > MAX_HISTORY:
            raise RequestError(f"{at}.item_ids", f"{len(items)} items, at most {MAX_HISTORY}")
        times = rec.get("timestamps")
        if times is None:
            times = [0] * len(items)
        elif not isinstance(times, list) or not all(_is_int(t) for t in times):
            raise RequestError(f"{at}.timestamps", "expected a list of integers")
        elif len(times) != len(items):
            raise RequestError(f"{at}.timestamps", f"{len(times)} timestamps for {len(items)} item ids")
        now = rec.get("request_time")
        if now is not None and not _is_int(now):
            raise RequestError(f"{at}.request_time", "expected an integer")
        histories.append(list(items))
        stamps.append([int(t) for t in times])
        nows.append(None if now is None else int(now))
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RequestError("params", "expected an object")
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise RequestError(f"params.{unknown[0]}", f"unknown parameter (expected one of {', '.join(PARAMS)})")
    k = params.get("k", PARAMS["k"])
    if not _is_int(k):
        raise RequestError("params.k", "expected an integer")
    if not 1 <= int(k) <= MAX_K:
        raise RequestError("params.k", f"{k}: expected 1 <= k <= {MAX_K}")
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
    """A checkpoint folder served as top-k: `predict(DataFrame, params)` -> DataFrame(item_ids, scores,
    ignored). Exact scan over the item table by default (`serving.item_index.exact_top_k`, the same function
    the batch job uses), the faiss index with use_index."""

    def __init__(self, checkpoint: str | Path) -> None:
        from serving.item_index import read_index
        from serving.loading import load_checkpoint_model

        self.loaded = load_checkpoint_model(checkpoint, device="cpu")
        self.items_VD = self.loaded.item_vectors()
        found = read_index(self.loaded.path)
        self.index, self.index_meta = found if found is not None else (None, {})
        vocab = self.loaded.vocab
        self.item_type = "string" if vocab is not None and vocab.key_type == "string" else "long"

    def recommend(self, req: Request) -> pd.DataFrame:
        from serving.item_index import exact_top_k, index_top_k

        if req.use_index and self.index is None:
            raise RequestError("params.use_index", "this model version has no item index")
        rows, stamps, ignored = self.loaded.known_rows(req.histories, req.timestamps)
        # the raw history's last timestamp is the default request time, even when that item is unknown
        nows = [
            now if now is not None else (raw[-1] if raw else 0)
            for now, raw in zip(req.request_times, req.timestamps)
        ]
        known = [u for u, r in enumerate(rows) if r]  # a user with no known item gets no recommendations
        ids: list[list[Any]] = [[] for _ in rows]
        out: list[np.ndarray] = [np.zeros(0) for _ in rows]
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
                ids[u], out[u] = self.loaded.raw_ids(top[j]), scores[j].astype(np.float64)
        return pd.DataFrame(
            {
                "item_ids": ids,
                "scores": out,
                "ignored": ignored,
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


# ---------------------------------------------------------------------------------------------------
# HTTP: MLflow's scoring app behind a strict check of the raw JSON


def body_records(body: bytes) -> tuple[Any, Any, str]:
    """(records, params, the data key) of a JSON /invocations body, in any layout MLflow's scoring server
    takes (dataframe_records, dataframe_split, inputs as records; instances is refused)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError("body", f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RequestError("body", "expected a JSON object")
    unknown = sorted(set(doc) - set(DATA_KEYS) - {"params"})
    if unknown:
        raise RequestError(unknown[0], f"unknown field (expected one of {', '.join(DATA_KEYS)}, params)")
    keys = [k for k in DATA_KEYS if k in doc]
    if len(keys) != 1:
        raise RequestError("body", f"expected exactly one of {', '.join(DATA_KEYS)}")
    key, data = keys[0], doc[keys[0]]
    if key == "instances":  # MLflow parses it as a tensor batch, which the column schema rejects
        raise RequestError(key, "not supported by this model: send dataframe_records (or inputs)")
    if key == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("columns"), list):
            raise RequestError(key, "expected an object with columns and data")
        bad = sorted(set(data) - {"columns", "data", "index"})
        if bad:
            raise RequestError(f"{key}.{bad[0]}", "unknown field (expected columns, data, index)")
        rows = data.get("data")
        if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == len(data["columns"]) for r in rows
        ):
            raise RequestError(f"{key}.data", "expected a list of rows as long as columns")
        data = [dict(zip(data["columns"], r)) for r in rows]
    elif isinstance(data, dict):  # MLflow's column layout cannot carry ragged lists: records only
        raise RequestError(key, 'expected a list of records ({"item_ids": [...], ...} per user)')
    return data, doc.get("params"), key


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class StrictRequests:
    """ASGI wrapper: JSON POSTs to /invocations are checked by `check_request` before MLflow's app sees
    them; a bad one is answered 400 {"error_code": "INVALID_PARAMETER_VALUE", "message": "<field>: ..."}.
    Everything else (other routes, CSV bodies) goes to MLflow's app unchanged."""

    def __init__(self, app: Any, item_type: str = "long") -> None:
        self.app = app
        self.item_type = item_type

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not headers.get(b"content-type", b"application/json").startswith(b"application/json"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            records, params, key = body_records(body)
            check_request(records, params, self.item_type, key)
        except RequestError as exc:
            payload = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": str(exc)}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            return await send({"type": "http.response.body", "body": payload})
        sent = False

        async def replay() -> dict[str, Any]:  # the body, once, then whatever the server sends next
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def model_item_type(model: Any) -> str:
    """ "string" or "long": the item id type of a loaded pyfunc's signature."""
    schema = model.metadata.get_input_schema()
    spec = next((s for s in schema.inputs if s.name == "item_ids"), None) if schema else None
    return "string" if spec is not None and str(spec.type.dtype.name) == "string" else "long"


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Serve a registered model (models:/NAME@alias, models:/NAME/3, or a model folder) over HTTP:
    MLflow's scoring app (/invocations, /ping, /health, /version) in this process, behind
    StrictRequests, on uvicorn (imported from the environment: no PATH lookup)."""
    import mlflow.pyfunc
    import uvicorn
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    app = StrictRequests(scoring_server.init(model), model_item_type(model))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
