"""Sweep report from `search_runs` alone: a Markdown leaderboard and scaling curves (PNG, log axes).

    fuxi report --parent-run-id <id> --out docs --name sweep_report

Reads the parent's child runs, their params (the full resolved config) and final metrics. The parameter
count is rebuilt from the `model.*` params on the meta device (no weights are allocated). Curves: the
metric against each numeric field the grid varied (one line per value of the other fields) and against
the parameter count; runs that differ only in the seed are one point, mean ± std as error bars. Written
to `--out` and logged to the parent run under `report/`.

`--out` is a path or a URI (`s3://bucket/reports`): every file is rendered in memory and written whole
through the storage layer (a rename on disk, one PUT on a store); the file names (`--name`) are confined to
it. MLflow logs local files, so a report on a store is logged from a temporary copy.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import storage

DEFAULT_METRIC = "final_test/ndcg_at_10"
TABLE_METRICS = ("final_test/hr_at_10", "final_test/ndcg_at_10", "final_test/mrr", "valid/ndcg_at_10")
IGNORED_PARAMS = {"tracking.run_name", "run_dir", "tracking.parent_run_id", "output_dir"}
PARAMS_COLUMN = "parameters"
REPLICATE_FIELDS = ("seed",)  # runs that differ only here repeat one point: plotted as mean ± std


def child_runs(client: Any, parent_run_id: str) -> pd.DataFrame:
    """`search_runs` for the parent's children: one row per run, columns params.*, metrics.*, tags.*."""
    import mlflow

    parent = client.get_run(parent_run_id)
    mlflow.set_tracking_uri(client.tracking_uri)
    df = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        output_format="pandas",
    )
    return df


def _literal(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@lru_cache(maxsize=256)
def _count(model_items: tuple[tuple[str, Any], ...]) -> int:
    from pipeline.train.config import ModelConfig
    from serving.loading import parameter_count as count

    return count(ModelConfig(**dict(model_items)))


def parameter_count(params: dict[str, Any]) -> int:
    """Trainable parameters of the model a run's params describe ({'model.num_layers': '2', ...})."""
    from pipeline.train.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    items = {
        k.split(".", 1)[1]: _literal(v)
        for k, v in params.items()
        if k.startswith("model.") and k.split(".", 1)[1] in names and v is not None
    }
    items.pop("extra", None)
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items()))
    return _count(frozen)


def varied_fields(df: pd.DataFrame, grid: dict[str, list[str]] | None = None) -> list[str]:
    """The swept fields: the grid's keys when known, else params with more than one value."""
    if grid:
        return list(grid)
    cols = [c for c in df.columns if c.startswith("params.") and c[7:] not in IGNORED_PARAMS]
    return [c[7:] for c in cols if df[c].nunique(dropna=True) > 1]


def _numeric(values: pd.Series) -> bool:
    return bool(pd.to_numeric(values, errors="coerce").notna().all())


@dataclass
class Report:
    table: pd.DataFrame  # one row per child run, leaderboard order
    fields: list[str]
    metric: str
    series: dict[str, dict[str, list[list[float]]]]  # panel x-field -> line label -> [[x, y], ...]
    markdown: str
    paths: dict[str, str]  # leaderboard, plot, data -> the file's path or URI


# ---------------------------------------------------------------------------------------------------
# report files: a path or a URI, through the storage layer


def report_files(out_dir: str | Path, name: str, kinds: dict[str, str]) -> dict[str, str]:
    """{kind: <out_dir>/<name>.<extension>} for kinds {kind: extension}; `name` is confined to `out_dir`
    (no '/', '..' or absolute path: one line naming --name)."""
    out = os.fspath(out_dir)
    storage.parse(out)  # an unsupported scheme or credentials in the URI: refused before any work
    return {kind: storage.join(out, f"{name}.{ext}", field="--name") for kind, ext in kinds.items()}


def save_figure(fig: Any, uri: str | Path) -> None:
    """A matplotlib figure as one PNG written whole at `uri` (a path or a URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    storage.write_bytes(os.fspath(uri), buf.getvalue())


def log_report(client: Any, run_id: str, paths: dict[str, str], artifact_path: str = "report") -> None:
    """Log report files to a run under `artifact_path`: MLflow uploads local files, so a file on a store
    is copied to a temporary folder first (under its own name)."""
    with tempfile.TemporaryDirectory(prefix="fuxi-report-") as tmp:
        for uri in paths.values():
            local = uri
            if not storage.is_local(uri):
                local = storage.join(tmp, storage.name_of(uri), field="report file")
                storage.copy_file(uri, local)
            client.log_artifact(run_id, local, artifact_path)


def build_table(df: pd.DataFrame, fields: list[str], metric: str) -> pd.DataFrame:
    rows = []
    for _, r in df.iterrows():
        params = {c[7:]: r[c] for c in df.columns if c.startswith("params.")}
        row: dict[str, Any] = {
            "run": r.get("tags.mlflow.runName"),
            "run_id": r["run_id"],
            "status": r["status"],
        }
        for f in fields:
            row[f] = _literal(params.get(f))
        row[PARAMS_COLUMN] = parameter_count(params) if any(k.startswith("model.") for k in params) else None
        for m in dict.fromkeys((metric, *TABLE_METRICS)):
            row[m] = r.get(f"metrics.{m}")
        row["train/epoch_seconds"] = r.get("metrics.train/epoch_seconds")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(metric, ascending=False, na_position="last", kind="stable").reset_index(
        drop=True
    )


def to_markdown(table: pd.DataFrame, fields: list[str], metric: str, title: str) -> str:
    metrics = list(dict.fromkeys((metric, *TABLE_METRICS)))
    head = [
        "#",
        "run",
        *[f.rsplit(".", 1)[-1] for f in fields],
        "params",
        *[m.replace("_at_", "@") for m in metrics],
        "s/epoch",
        "status",
    ]
    lines = [
        f"### {title}",
        "",
        f"Sorted by `{metric}` (the test split at the validation-selected epoch).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def fmt(v: Any, digits: int = 4) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    for i, r in table.iterrows():
        cells = [
            str(i + 1),
            str(r["run"]).rsplit("/", 1)[-1],
            *[fmt(r[f]) for f in fields],
            fmt(r[PARAMS_COLUMN]) if r[PARAMS_COLUMN] is not None else "-",
            *[fmt(r[m]) for m in metrics],
            fmt(r["train/epoch_seconds"], 1),
            str(r["status"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scaling_series(
    table: pd.DataFrame, fields: list[str], metric: str
) -> dict[str, dict[str, list[list[float]]]]:
    """Points of each panel, grouped into lines; only finished runs with the metric. Runs that differ
    only in a replicate field (the seed) are one point: [x, mean, std over runs (0 for one run), runs]."""
    done = table[(table["status"] == "FINISHED") & table[metric].notna()]
    fields = [f for f in fields if f not in REPLICATE_FIELDS]
    series: dict[str, dict[str, list[list[float]]]] = {}
    xs = [f for f in fields if _numeric(done[f])] + [PARAMS_COLUMN]
    for x in xs:
        if x == PARAMS_COLUMN:
            # connect runs that differ only in model fields (the parameter count moves with them)
            others = [f for f in fields if not f.startswith("model.")]
        else:
            others = [f for f in fields if f != x]
        lines: dict[str, list[list[float]]] = {}
        for key, group in done.groupby(others, sort=True) if others else [((), done)]:
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join(f"{f.rsplit('.', 1)[-1]}={v}" for f, v in zip(others, key)) or "all runs"
            pts = []
            for value, runs in group.groupby(x, sort=True):
                ys = runs[metric].astype(float)
                std = float(ys.std(ddof=1)) if len(ys) > 1 else 0.0
                pts.append([float(value), float(ys.mean()), std, len(ys)])
            lines[label] = pts
        series[x] = lines
    return series


def _short(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def plot(series: dict[str, dict[str, list[list[float]]]], metric: str, title: str, path: str | Path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(series)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, x in zip(axes[0], panels):
        ys = [p[1] for pts in series[x].values() for p in pts]
        for label, pts in series[x].items():
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log", base=10 if x == PARAMS_COLUMN else 2)
        if ys and min(ys) > 0:
            ax.set_yscale("log")
            lo, hi = min(ys), max(ys)
            yticks = np.geomspace(lo, hi, 5) if hi > lo else [lo]
            ax.set_yticks(yticks, [f"{t:.3g}" for t in yticks])
        ax.set_xlabel("parameters" if x == PARAMS_COLUMN else x)
        ax.set_ylabel(metric.replace("_at_", "@"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ticks = sorted({p[0] for pts in series[x].values() for p in pts})
        labels = [_short(t) if x == PARAMS_COLUMN else f"{t:g}" for t in ticks]
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def build_report(
    client: Any,
    parent_run_id: str,
    out_dir: str | Path,
    metric: str = DEFAULT_METRIC,
    log_to_parent: bool = True,
    name: str = "sweep_report",
) -> Report:
    """Writes <out_dir>/<name>.md (leaderboard), .png (scaling curves), .json (the plotted data);
    `out_dir` a path or a URI."""
    paths = report_files(out_dir, name, {"leaderboard": "md", "plot": "png", "data": "json"})
    parent = client.get_run(parent_run_id)
    grid = json.loads(parent.data.tags.get("sweep.grid", "{}")) or None
    df = child_runs(client, parent_run_id)
    if df.empty:
        raise ValueError(f"run {parent_run_id} has no child runs")
    fields = varied_fields(df, grid)
    table = build_table(df, fields, metric)
    title = f"{parent.info.run_name}: {len(table)} runs, preset {parent.data.tags.get('sweep.preset', '?')}"
    series = scaling_series(table, fields, metric)
    markdown = to_markdown(table, fields, metric, title)
    storage.write_bytes(paths["leaderboard"], markdown.encode())
    plot(series, metric, title, paths["plot"])
    data = {
        "parent_run_id": parent_run_id,
        "metric": metric,
        "fields": fields,
        "series": series,
        "runs": json.loads(table.to_json(orient="records")),
    }
    storage.write_bytes(paths["data"], json.dumps(data, indent=1).encode())
    if log_to_parent:
        log_report(client, parent_run_id, paths)
    return Report(table, fields, metric, series, markdown, paths)


# ---------------------------------------------------------------------------------------------------
# the nightly timeline: per-date next-window metrics of candidate and champion (jobs/nightly.py)

NIGHTLY_PANELS = (
    ("all targets", "ndcg_at_10"),
    ("targets on items first seen in the window", "new_items/hr_at_10"),
    ("top-10 slots holding items first seen in the 3 days before", "topk_recent_item_share"),
)


def timeline_frame(client: Any, experiment: str, model_name: str) -> pd.DataFrame:
    """One row per nightly date: every metric the nightly job logged to the model's timeline run."""
    from jobs.nightly import TIMELINE_TAG

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r}")
    runs = client.search_runs([exp.experiment_id], f"tags.`{TIMELINE_TAG}` = '{model_name}'", max_results=1)
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no nightly timeline for model {model_name!r}")
    run = runs[0]
    rows: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            rows.setdefault(m.step, {})[key] = m.value
    frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    frame.index = [str(pd.Timestamp("1970-01-01") + pd.Timedelta(days=int(d)))[:10] for d in frame.index]
    frame.index.name = "date"
    return frame


def nightly_markdown(frame: pd.DataFrame, title: str) -> str:
    cols = [
        ("num_items", "items", 0),
        ("candidate/ndcg_at_10", "cand NDCG@10", 4),
        ("champion/ndcg_at_10", "champ NDCG@10", 4),
        ("candidate/new_items/num_targets", "new-item targets", 0),
        ("candidate/new_items/hr_at_10", "cand new-item HR@10", 4),
        ("champion/new_items/hr_at_10", "champ new-item HR@10", 4),
        ("candidate/topk_recent_item_share", "cand top-10 recent share", 3),
        ("candidate/window_recent_item_share", "window recent share", 3),
        ("warm_start", "warm start", 0),
        ("promoted", "promoted", 0),
    ]
    cols = [c for c in cols if c[0] in frame.columns]
    lines = [f"### {title}", "", "| date | " + " | ".join(c[1] for c in cols) + " |"]
    lines.append("|" + "---|" * (len(cols) + 1))
    for date, r in frame.iterrows():
        cells = ["-" if pd.isna(r[c]) else f"{r[c]:.{d}f}" for c, _, d in cols]
        lines.append(f"| {date} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_nightly(frame: pd.DataFrame, title: str, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NIGHTLY_PANELS), figsize=(4.8 * len(NIGHTLY_PANELS), 3.8), squeeze=False)
    x = np.arange(len(frame))
    for ax, (label, metric) in zip(axes[0], NIGHTLY_PANELS):
        for who, style in (("candidate", "o-"), ("champion", "s--")):
            key = f"{who}/{metric}"
            if key in frame.columns:
                ax.plot(x, frame[key].to_numpy(dtype=float), style, label=who)
        if metric == "topk_recent_item_share" and "candidate/window_recent_item_share" in frame.columns:
            ax.plot(x, frame["candidate/window_recent_item_share"].to_numpy(dtype=float), ":", label="window")
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(metric.replace("_at_", "@"))
        ax.set_xticks(x, [d[5:] for d in frame.index], rotation=45)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def build_nightly_report(
    client: Any, experiment: str, model_name: str, out_dir: str | Path, name: str = "nightly_report"
) -> tuple[str, dict[str, str]]:
    """Writes <out_dir>/<name>.md (per-date table), .png (metrics over dates), .json (the frame);
    `out_dir` a path or a URI."""
    paths = report_files(out_dir, name, {"table": "md", "plot": "png", "data": "json"})
    frame = timeline_frame(client, experiment, model_name)
    title = f"nightly {model_name}: next-day metrics, {frame.index[0]}..{frame.index[-1]}"
    markdown = nightly_markdown(frame, title)
    storage.write_bytes(paths["table"], markdown.encode())
    plot_nightly(frame, title, paths["plot"])
    storage.write_bytes(paths["data"], frame.to_json(orient="index", indent=1).encode())
    return markdown, paths
