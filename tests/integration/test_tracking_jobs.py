"""Jobs against a real MLflow (SQLite in a temp dir) and real TorchX `local_cwd` jobs on the tiny preset.

One 2x2 sweep (num_layers x num_negatives) is shared by the module: its children are the short runs
whose params / metrics / artifacts are checked, the runs the report is built from, and the candidates
the registry promotes. Then the nightly job runs one date on top of that registry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.report import build_report, parameter_count, plot, scaling_series
from jobs.sweep import expand_grid, parse_grid, point_name, run_sweep
from pipeline.train.config import apply_overrides, to_flat_dict
from pipeline.train.presets import get_preset
from pipeline.train.tracking import mlflow_client
from serving import registry

GRID = {"model.num_layers": ["1", "2"], "loss.num_negatives": ["8", "32"]}
# ~15 s per job on an idle 2-core machine (mostly imports and torchrun): 100 users, 2 epochs,
# every step logged
FAST = ["epochs=2", "data.synthetic.num_users=100", "optim.lr=0.005", "tracking.log_every_steps=1"]
MODEL = "fuxi-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    yield {"root": root, "uri": uri, "client": mlflow_client(uri)}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def sweep(store: dict):
    result = run_sweep(
        "tiny",
        GRID,
        FAST,
        name="test-sweep",
        tracking_uri=store["uri"],
        sweep_dir=store["root"] / "sweeps",
        poll_seconds=0.5,
        parallel=2,
        cpu=1,
    )
    assert result.ok, [(j.name, j.state) for j in result.jobs]
    return result


def _children(store: dict, sweep) -> list:
    return store["client"].search_runs(
        [sweep.experiment_id], f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'"
    )


# ---------------------------------------------------------------------------------------------------


def test_grid_expansion_and_validation() -> None:
    grid = parse_grid(["model.num_layers=1,2,4", "loss.num_negatives=32, 128"])
    points = expand_grid(grid)
    assert len(points) == 6 and points[0] == {"model.num_layers": "1", "loss.num_negatives": "32"}
    assert point_name(points[-1]) == "num_layers4-num_negatives128"
    with pytest.raises(ValueError, match="model.num_layer"):  # a typo fails before any job is launched
        run_sweep("tiny", {"model.num_layer": ["1"]}, tracking_uri="sqlite:///unused.db")


def test_scaling_curves_average_seeds_with_error_bars(tmp_path: Path) -> None:
    # 2 widths x 3 seeds: each width is one point, mean and sample std over its seeds
    table = pd.DataFrame(
        [
            {"status": "FINISHED", "model.embedding_dim": d, "seed": s, "parameters": 10 * d, "m": v}
            for d, vals in ((8, (0.1, 0.2, 0.3)), (16, (0.4, 0.4, 0.7)))
            for s, v in enumerate(vals)
        ]
        + [{"status": "FAILED", "model.embedding_dim": 8, "seed": 3, "parameters": 80, "m": 0.9}]
    )
    series = scaling_series(table, ["model.embedding_dim", "seed"], "m")
    assert set(series) == {"model.embedding_dim", "parameters"}  # no panel over the seed
    (pts,) = series["model.embedding_dim"].values()
    assert [p[0] for p in pts] == [8.0, 16.0] and [p[3] for p in pts] == [3, 3]
    assert pts[0][1] == pytest.approx(0.2) and pts[0][2] == pytest.approx(0.1)
    assert pts[1][1] == pytest.approx(0.5) and pts[1][2] == pytest.approx(np.std([0.4, 0.4, 0.7], ddof=1))
    fig = plot(series, "m", "seeds", tmp_path / "p.png")
    bars = fig.axes[0].containers[0]  # the error bars drawn are the std
    (segments,) = [c for c in bars.lines[2]]
    heights = [seg[1, 1] - seg[0, 1] for seg in segments.get_segments()]
    assert heights == pytest.approx([0.2, 2 * pts[1][2]])


def test_experiments_are_tagged_as_model_development(store: dict) -> None:
    from pipeline.train.tracking import MLflowLogger, get_or_create_experiment

    client = store["client"]
    kind = {"mlflow.experimentKind": "custom_model_development"}
    logger = MLflowLogger("tagged-at-creation", "r", store["uri"], system_metrics=False)
    logger.close()
    assert client.get_experiment(logger.experiment_id).tags.items() >= kind.items()
    untagged = client.create_experiment("created-elsewhere")  # e.g. by an older version, or by hand
    assert get_or_create_experiment(client, "created-elsewhere") == untagged
    assert client.get_experiment(untagged).tags.items() >= kind.items()


@pytest.mark.slow
def test_short_run_logs_params_metrics_artifacts(store: dict, sweep) -> None:
    client = store["client"]
    runs = _children(store, sweep)
    run = next(
        r
        for r in runs
        if r.data.params["model.num_layers"] == "2" and r.data.params["loss.num_negatives"] == "32"
    )
    assert run.info.status == "FINISHED"
    # params: the full resolved config of this point
    cfg = apply_overrides(get_preset("tiny"), FAST + ["model.num_layers=2", "loss.num_negatives=32"])
    expected = {k: str(v) for k, v in to_flat_dict(cfg).items()}
    params = run.data.params
    assert set(expected) <= set(params)
    for key in ("model.num_layers", "loss.num_negatives", "epochs", "optim.lr", "data.synthetic.num_users"):
        assert params[key] == expected[key], key
    # metrics: per-step training loss, per-epoch evaluation, final test
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) >= 2 and all(np.isfinite(m.value) for m in losses)
    assert len(client.get_metric_history(run.info.run_id, "valid/ndcg_at_10")) == 2  # one per epoch
    for key in ("final_test/hr_at_10", "final_test/ndcg_at_10", "final_test/mrr"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert not any("@" in k for k in run.data.metrics)
    # tags and artifacts; the experiment opens on its runs table in the MLflow 3 UI
    assert (
        client.get_experiment(sweep.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    )
    assert run.data.tags["git_commit"] and json.loads(run.data.tags["data.meta"])["source"] == "synthetic"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "train.json" in artifacts
    local = client.download_artifacts(run.info.run_id, "train.json", str(store["root"] / "dl"))
    assert json.loads(Path(local).read_text())["config"]["model"]["num_layers"] == 2


@pytest.mark.slow
def test_sweep_report_matches_search_runs(store: dict, sweep) -> None:
    import mlflow

    client = store["client"]
    runs = _children(store, sweep)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.params["model.num_layers"], r.data.params["loss.num_negatives"]) for r in runs} == {
        (a, b) for a in GRID["model.num_layers"] for b in GRID["loss.num_negatives"]
    }
    report = build_report(client, sweep.parent_run_id, store["root"] / "report")
    assert Path(report.paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 |" in Path(report.paths["leaderboard"]).read_text()
    logged = {a.path for a in client.list_artifacts(sweep.parent_run_id, "report")}
    assert logged == {"report/sweep_report.md", "report/sweep_report.png", "report/sweep_report.json"}

    # the plotted points are exactly what search_runs returns
    df = mlflow.search_runs([sweep.experiment_id], f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    metric = report.metric
    by_point = {
        (int(r["params.model.num_layers"]), int(r["params.loss.num_negatives"])): r[f"metrics.{metric}"]
        for _, r in df.iterrows()
    }
    plotted = json.loads(Path(report.paths["data"]).read_text())["series"]
    for label, pts in plotted["model.num_layers"].items():
        negatives = int(label.split("=")[1])
        assert pts == [[float(layers), by_point[(layers, negatives)], 0.0, 1] for layers in (1, 2)]
    for label, pts in plotted["loss.num_negatives"].items():
        layers = int(label.split("=")[1])
        assert pts == [[float(n), by_point[(layers, n)], 0.0, 1] for n in (8, 32)]
    counts = {
        layers: parameter_count({k[7:]: v for k, v in r.items() if k.startswith("params.")})
        for layers, r in ((int(r["params.model.num_layers"]), r) for _, r in df.iterrows())
    }
    assert counts[2] > counts[1]
    assert sorted(p[0] for pts in plotted["parameters"].values() for p in pts) == sorted(
        float(counts[layers]) for layers, _ in by_point
    )
    # parameter count on the meta device == the real model's
    from model.recommender import build_model, count_parameters

    cfg = apply_overrides(get_preset("tiny"), ["model.num_layers=2", "model.num_items=201"])
    assert counts[2] == count_parameters(build_model(cfg.model))


@pytest.mark.slow
def test_promotion_only_on_improvement(store: dict, sweep) -> None:
    client = store["client"]
    runs = _children(store, sweep)
    scored = sorted(
        (
            (registry.evaluate_checkpoint(registry.run_checkpoint(client, r.info.run_id))["ndcg_at_10"], r)
            for r in runs
        ),
        key=lambda x: x[0],
    )
    (worst_m, worst), (mid_m, mid), (best_m, best) = scored[0], scored[1], scored[-1]
    assert worst_m < mid_m < best_m

    v_worst = registry.register(client, worst.info.run_id, MODEL)
    d = registry.promote_if_better(client, MODEL, v_worst.version)
    assert d.promoted and d.reason == "no champion yet"
    assert d.candidate == pytest.approx(worst_m)

    v_best = registry.register(client, best.info.run_id, MODEL)
    d = registry.promote_if_better(client, MODEL, v_best.version)
    assert d.promoted and d.champion == pytest.approx(worst_m) and d.candidate == pytest.approx(best_m)

    v_mid = registry.register(client, mid.info.run_id, MODEL)
    d = registry.promote_if_better(client, MODEL, v_mid.version)
    assert not d.promoted and d.champion_version == str(v_best.version)
    assert registry.champion(client, MODEL).version == v_best.version
    assert client.get_model_version(MODEL, v_mid.version).tags["valid_ndcg_at_10"] == f"{mid_m:.6f}"


@pytest.mark.slow
def test_registered_model_reloads_with_same_topk(store: dict, sweep) -> None:
    import mlflow

    from model.recommender import build_model
    from pipeline.data.collate import collate_arrow
    from pipeline.train.checkpoint import read_meta
    from pipeline.train.config import TrainConfig, from_dict
    from pipeline.train.run import load_data, load_model_weights

    client = store["client"]
    champ = registry.champion(client, MODEL)
    assert champ is not None, "test_promotion_only_on_improvement registers the champion"
    ckpt = registry.run_checkpoint(client, champ.run_id)
    assert champ.tags["checkpoint"] == str(ckpt)

    # the in-process model, as evaluation uses it: test rows = history + target, scored at the target time
    cfg: TrainConfig = from_dict(TrainConfig, read_meta(ckpt)["config"])
    model = build_model(cfg.model).eval()
    load_model_weights(model, ckpt)
    rows = load_data(cfg).table.slice(0, 16)
    batch = collate_arrow(rows, cfg.model.max_sequence_length, drop_last=0)
    with torch.no_grad():
        scores = model.encode_last(batch.seq) @ model.normalized_item_embeddings().T
    histories = [r[:-1][-cfg.model.max_sequence_length :] for r in rows.column("item_ids").to_pylist()]
    stamps = [r[:-1][-cfg.model.max_sequence_length :] for r in rows.column("timestamps").to_pylist()]
    targets_t = [r[-1] for r in rows.column("timestamps").to_pylist()]
    scores[:, 0] = -torch.inf
    for i, h in enumerate(histories):
        scores[i, h] = -torch.inf
    want = torch.topk(scores, 10, dim=1)

    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    out = loaded.predict(
        pd.DataFrame({"item_ids": histories, "timestamps": stamps, "request_time": targets_t}),
        params={"k": 10},
    )
    got = np.stack(out["item_ids"].to_list())
    np.testing.assert_array_equal(got, want.indices.numpy())
    np.testing.assert_allclose(np.stack(out["scores"].to_list()), want.values.numpy(), rtol=1e-5, atol=1e-6)
    assert not any(set(g) & set(h) for g, h in zip(got.tolist(), histories))  # seen items are filtered


@pytest.mark.slow
def test_nightly_idempotent_and_failure_keeps_champion(store: dict, sweep, tmp_path: Path) -> None:
    """One date on top of the sweep's registry: a forced failure before promotion, the retry, a re-run."""
    from jobs.nightly import FAIL_ENV, NightlyConfig, run_nightly

    client = store["client"]
    before = registry.champion(client, MODEL)
    assert before is not None
    cfg = NightlyConfig(
        date="2024-01-02",
        workdir=tmp_path / "nightly",
        preset="tiny",
        model_name=MODEL,
        overrides=["epochs=1", "optim.lr=0.005"],
        tracking_uri=store["uri"],
        # a catalogue larger than the sweep's 200 synthetic items: the champion's table grows on warm start
        demo_logs={"users": 100, "items": 300, "events": 7000},
    )
    os.environ[FAIL_ENV] = "register_promote"
    try:
        with pytest.raises(RuntimeError, match="forced failure"):
            run_nightly(cfg)
    finally:
        os.environ.pop(FAIL_ENV)
    state = json.loads((Path(cfg.workdir) / "state" / "2024-01-02.json").read_text())
    assert [state["steps"][s]["status"] for s in ("ingest", "update_sequences", "train", "evaluate")] == [
        "done"
    ] * 4
    assert state["steps"]["register_promote"]["status"] == "failed"
    assert state["steps"]["train"]["outputs"]["init_version"] == str(
        before.version
    )  # warm start from the champion
    assert registry.champion(client, MODEL).version == before.version  # untouched by the failure
    versions = len(client.search_model_versions(f"name = '{MODEL}'"))

    state = run_nightly(cfg)  # the retry: only the failed step runs; the version registered before is reused
    decision = state["steps"]["register_promote"]["outputs"]["decision"]
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == versions
    measured = state["steps"]["evaluate"]["outputs"]
    assert decision["promoted"] == (measured["candidate"]["ndcg_at_10"] > measured["champion"]["ndcg_at_10"])
    champion_after = registry.champion(client, MODEL).version

    runs = len(client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id]))
    snapshot = (Path(cfg.workdir) / "state" / "2024-01-02.json").read_bytes()
    run_nightly(cfg)  # re-running the date changes nothing
    assert (Path(cfg.workdir) / "state" / "2024-01-02.json").read_bytes() == snapshot
    assert len(client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])) == runs
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == versions
    assert registry.champion(client, MODEL).version == champion_after
