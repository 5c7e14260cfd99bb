"""Serving what was trained, against a real MLflow (SQLite in a temp dir), a real local Ray and a real HTTP
server (`fuxi serve`: MLflow's scoring app on uvicorn) on a tiny model trained here.

One tiny FuXi-alpha run (1 epoch) is registered with its faiss index and promoted to @champion; the module
shares it. The batch job (Ray Data), the pyfunc in process and the HTTP endpoint must give the same top-k
for the same histories; malformed requests get a 400 naming the field; the logged model holds no pickle;
the faiss index finds a planted top-k; the exported encoder equals the eager one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from serving import registry
from tests.helpers.http import call_json, free_port

MODEL = "fuxi-serving-test"
ROOT = Path(__file__).resolve().parents[2]
UNKNOWN = 10_000  # an item row far beyond the tiny model's table (201 rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline.data.sequences import SequenceData, write_sequences
    from pipeline.data.synthetic import SyntheticConfig, synthetic_sequences
    from pipeline.train.presets import tiny
    from pipeline.train.run import run
    from pipeline.train.tracking import mlflow_client

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    client = mlflow_client(uri)
    client.create_experiment("serving", artifact_location=str(root / "artifacts"))  # not ./mlruns
    cfg = tiny()
    cfg.epochs = 1
    cfg.tracking.uri, cfg.tracking.experiment = uri, "serving"
    cfg.output_dir = str(root / "runs")
    report = run(cfg)
    mv = registry.register(client, report["run_id"], MODEL, index=True)
    assert registry.promote_if_better(client, MODEL, mv.version).promoted

    # users to recommend for: 40 synthetic sequences (rows of the same 200-item catalogue) + one whose
    # history holds an item the model never saw
    data = synthetic_sequences(SyntheticConfig(num_users=40, num_items=200, mean_length=20, max_length=60))
    extra = pa.table(
        {
            "user_id": pa.array([10_000], pa.int64()),
            "item_ids": pa.array([[3, UNKNOWN, 7, 11]], pa.list_(pa.int64())),
            "timestamps": pa.array([[1_700_000_000, 1_700_000_100, 1_700_000_200, 1_700_000_300]]),
        }
    )
    table = pa.concat_tables([data.table, extra.cast(data.table.schema)])
    seqs = write_sequences(SequenceData(table, UNKNOWN + 1), root / "users.parquet")
    yield {"root": root, "uri": uri, "client": client, "version": str(mv.version), "sequences": seqs}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _records(sequences: Path) -> list[dict]:
    t = pq.read_table(sequences)
    return [
        {"item_ids": i, "timestamps": s}
        for i, s in zip(t.column("item_ids").to_pylist(), t.column("timestamps").to_pylist())
    ]


@pytest.fixture(scope="module")
def server(store: dict):
    """`fuxi serve` on a free localhost port, for the module; stopped by its pid."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "serve",
        "--model",
        f"models:/{MODEL}@champion",
        "--port",
        str(port),
    ]
    log = open(store["root"] / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=store["root"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError((store["root"] / "serve.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError("fuxi serve did not answer /ping in 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# ---------------------------------------------------------------------------------------------------


def test_registered_model_holds_no_pickle_and_loads(store: dict, tmp_path: Path) -> None:
    import mlflow.artifacts
    import mlflow.pyfunc
    import yaml

    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{store['version']}", dst_path=str(tmp_path))
    )
    assert list(local.rglob("*.pkl")) == [] and list(local.rglob("*.pickle")) == []
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "serving.pyfunc" and not flavor.get("code")
    assert "python_model" not in flavor and "artifacts" not in flavor
    ckpt = registry.version_checkpoint(store["client"], MODEL, store["version"], tmp_path / "v")
    assert (ckpt / "train.json").exists() and (ckpt / "item_index.faiss").exists()
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    out = model.predict(pd.DataFrame({"item_ids": [[5, 17, 3]], "timestamps": [[1, 2, 3]]}), params={"k": 7})
    assert len(out["item_ids"][0]) == 7 and not {5, 17, 3} & set(out["item_ids"][0])
    # unknown ids are dropped and counted; a user with only unknown ids gets nothing
    out = model.predict(pd.DataFrame({"item_ids": [[5, UNKNOWN, 3], [UNKNOWN]]}), params={"k": 3})
    assert out["ignored"].tolist() == [1, 1] and len(out["item_ids"][0]) == 3 and len(out["item_ids"][1]) == 0


@pytest.mark.parametrize(
    "frame, params, field",
    [
        ({"item_ids": [[]]}, {}, "item_ids: empty history"),
        ({"item_ids": [[1, 2]]}, {"k": 0}, "params.k"),
        ({"item_ids": [[1, 2]]}, {"k": -3}, "params.k"),
        ({"item_ids": [list(range(1, 1002))]}, {}, "item_ids: 1001 items, at most 1000"),
        ({"item_ids": [[1, 2]], "timestamps": [[1]]}, {}, "timestamps: 1 timestamps for 2 item ids"),
    ],
)
def test_pyfunc_rejects_malformed_requests(store: dict, frame: dict, params: dict, field: str) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    with pytest.raises(MlflowException, match=field) as err:
        model.predict(pd.DataFrame(frame), params=params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400


@pytest.mark.slow
def test_batch_pyfunc_and_http_give_the_same_top_k(store: dict, server: str, tmp_path: Path) -> None:
    import mlflow.pyfunc

    from serving.item_index import recall_at_k
    from serving.recommend import recommend, resolve_model

    k = 10
    model = resolve_model(f"models:/{MODEL}@champion", store["uri"], tmp_path / "cache")
    assert model.version == f"{MODEL}/{store['version']}"
    report = recommend(
        model.checkpoint, store["sequences"], tmp_path / "recs.parquet", k, version=model.version
    )
    batch = pq.read_table(report.out).to_pandas()
    records = _records(store["sequences"])
    assert report.users == len(records) == len(batch)
    assert set(batch["model_version"]) == {model.version}

    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
        pd.DataFrame(records), params={"k": k}
    )
    status, body = call_json(f"{server}/invocations", {"dataframe_records": records, "params": {"k": k}})
    assert status == 200
    http = pd.DataFrame(body["predictions"])

    known = batch["ignored"] == 0
    assert batch["ignored"].tolist()[-1] == 1 and known.sum() == len(records) - 1
    for name, other in (("pyfunc", pyfunc), ("http", http)):
        assert other["ignored"].tolist() == batch["ignored"].tolist(), name
        for b, o in zip(batch.itertuples(), other.itertuples()):
            assert list(b.item_ids) == list(o.item_ids), (name, b.user_id)
            np.testing.assert_allclose(list(b.scores), list(o.scores), rtol=1e-5, atol=1e-6)
    for rec, ids in zip(records, batch["item_ids"]):  # seen items are filtered
        assert not set(rec["item_ids"]) & set(ids)

    # the index path: the same users through the faiss HNSW index, against the exact scan
    approx = recommend(
        model.checkpoint,
        store["sequences"],
        tmp_path / "approx.parquet",
        k,
        version=model.version,
        use_index=True,
    )
    got = pq.read_table(approx.out).to_pandas()
    assert recall_at_k(np.stack(got["item_ids"]), np.stack(batch["item_ids"])) >= 0.95
    status, body = call_json(
        f"{server}/invocations", {"dataframe_records": records[:5], "params": {"k": k, "use_index": True}}
    )
    assert (
        status == 200
        and [p["item_ids"] for p in body["predictions"]] == got["item_ids"].map(list)[:5].tolist()
    )


MALFORMED = [
    ({"dataframe_records": [{"item_ids": []}]}, "dataframe_records[0].item_ids"),
    ({"dataframe_records": [{"item_ids": "5,17"}]}, "dataframe_records[0].item_ids"),
    ({"dataframe_records": [{"item_ids": [5, 1.5]}]}, "dataframe_records[0].item_ids"),
    (
        {"dataframe_records": [{"item_ids": [5, 6], "timestamps": ["a", "b"]}]},
        "dataframe_records[0].timestamps",
    ),
    ({"dataframe_records": [{"item_ids": [5, 6], "timestamps": [1]}]}, "dataframe_records[0].timestamps"),
    ({"dataframe_records": [{"item_ids": [5], "request_time": "now"}]}, "dataframe_records[0].request_time"),
    ({"dataframe_records": [{"item_ids": [5]}], "params": {"k": 0}}, "params.k"),
    ({"dataframe_records": [{"item_ids": [5]}], "params": {"k": -1}}, "params.k"),
    ({"dataframe_records": [{"item_ids": [5]}], "params": {"k": "ten"}}, "params.k"),
    ({"dataframe_records": [{"item_ids": [5]}], "params": {"k": 10**6}}, "params.k"),
    ({"dataframe_records": [{"item_ids": list(range(1, 1500))}]}, "dataframe_records[0].item_ids"),
    ({"dataframe_records": [{"item_ids": [5], "user": 3}]}, "dataframe_records[0].user"),
    ({"dataframe_records": [{"item_ids": [5]}], "params": {"top_k": 3}}, "params.top_k"),
    ({"dataframe_records": [{"item_ids": [5]}], "extra": 1}, "extra"),
    ({"dataframe_records": [{"item_ids": [5]}], "params": {"filter_seen": "yes"}}, "params.filter_seen"),
    ({"dataframe_records": []}, "dataframe_records"),
    ({"dataframe_records": [{"item_ids": [5]}] * 257}, "dataframe_records"),
    ({"inputs": {"item_ids": [[5, 6]]}}, "inputs"),
    ({"instances": [{"item_ids": [5, 6]}]}, "instances"),
    ({"dataframe_records": [[5, 6]]}, "dataframe_records[0]"),
    ({"params": {"k": 3}}, "body"),
    (b"[1, 2", "body"),
]


@pytest.mark.slow
def test_malformed_http_requests_get_400_naming_the_field(server: str) -> None:
    for body, field in MALFORMED:
        status, reply = call_json(f"{server}/invocations", body)
        assert status == 400, (body, status, reply)
        assert reply["error_code"] == "INVALID_PARAMETER_VALUE" and field in reply["message"], (body, reply)
        assert "stack_trace" not in reply and "Traceback" not in reply["message"]
    ok = {"dataframe_records": [{"item_ids": [5, UNKNOWN]}], "params": {"k": 3, "filter_seen": False}}
    status, reply = call_json(f"{server}/invocations", ok)
    assert status == 200 and reply["predictions"][0]["ignored"] == 1


# ---------------------------------------------------------------------------------------------------
# the item index, on vectors whose top-k is known


def _planted(num_items: int = 5000, dim: int = 32, users: int = 20, k: int = 10, seed: int = 0):
    """Random unit item rows, and per user k planted rows at cosine ~0.95 with the user's vector: the
    other rows' cosines are ~N(0, 1/sqrt(dim)) (max ~0.8 over 5000), so the planted rows are the top-k."""
    g = torch.Generator().manual_seed(seed)
    items = torch.nn.functional.normalize(torch.randn(num_items, dim, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(users, dim, generator=g), dim=1)
    planted = torch.randperm(num_items - 1, generator=g)[: users * k].view(users, k) + 1
    for u in range(users):
        noise = 0.3 * torch.randn(k, dim, generator=g) / dim**0.5
        items[planted[u]] = torch.nn.functional.normalize(queries[u] + noise, dim=1)
    return items, queries, planted


def test_exact_and_index_top_k_find_the_planted_items(tmp_path: Path) -> None:
    from serving.item_index import build_index, exact_top_k, index_top_k, read_index, recall_at_k, write_index

    items, queries, planted = _planted()
    k = planted.shape[1]
    scores, rows = exact_top_k(queries, items, None, k, chunk=777)  # many chunks, merged
    assert [set(r) for r in rows.tolist()] == [set(p) for p in planted.tolist()]
    full = torch.topk(queries @ items[1:].T, k, dim=1)
    np.testing.assert_allclose(scores, full.values.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(rows, full.indices.numpy() + 1)

    meta = {"kind": "hnsw", "rows": items.shape[0], "dim": items.shape[1]}
    write_index(build_index(items, "hnsw", m=16), tmp_path, meta)
    index, meta = read_index(tmp_path, items)  # checked against the table it indexes
    assert meta["kind"] == "hnsw" and index.ntotal == len(items)
    _, approx = index_top_k(index, queries, None, k, ef_search=64)
    assert recall_at_k(approx, rows) == 1.0
    # seen rows are filtered: hide two planted rows per user; the next-best (unplanted) rows come in
    seen = [p[:2] for p in planted.tolist()]
    exact_s, exact_r = exact_top_k(queries, items, seen, k)
    _, approx_r = index_top_k(index, queries, seen, k, ef_search=64)
    for u in range(len(queries)):
        assert not set(seen[u]) & set(exact_r[u]) and not set(seen[u]) & set(approx_r[u])
        assert set(planted[u, 2:].tolist()) <= set(exact_r[u]) and set(planted[u, 2:].tolist()) <= set(
            approx_r[u]
        )
    assert recall_at_k(approx_r, exact_r) >= 0.95
    ivf = build_index(items, "ivf", nlist=16)
    _, ivf_r = index_top_k(ivf, queries, None, k, nprobe=16)  # every list probed: exact
    assert recall_at_k(ivf_r, rows) == 1.0


def test_exported_encoder_equals_eager(store: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from serving.export import TOLERANCE, example_inputs, export_encoder
    from serving.loading import load_checkpoint_model

    ckpt = registry.version_checkpoint(store["client"], MODEL, store["version"], tmp_path / "v")
    manifest = export_encoder(ckpt, tmp_path / "export", batch=2, length=20)
    assert manifest["max_abs_difference_vs_eager"] <= TOLERANCE
    program = torch.export.load(tmp_path / "export" / "encoder.pt2").module()
    loaded = load_checkpoint_model(ckpt)
    batches = (1, min(5, manifest["max_batch"])) if manifest["dynamic_batch"] else (2,)
    for b in batches:  # fresh inputs, other batch sizes than the export's example
        items, times = example_inputs(loaded.cfg.model.num_items, b, 20, seed=100 + b)
        with torch.no_grad():
            got = program(items, times)
        want = loaded.user_vectors(items.tolist(), times[:, :20].tolist(), times[:, 20].tolist())
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE)
    vectors = load_file(tmp_path / "export" / "item_vectors.safetensors")["items"]
    torch.testing.assert_close(vectors, loaded.item_vectors(), rtol=0, atol=0)
