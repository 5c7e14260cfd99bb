"""The nightly Airflow DAG, in Airflow's own environment (.venv-airflow, made by scripts/airflow_test.sh).

Airflow's pins collide with the ML stack, so it is never imported here: the checks run the DAG file with
.venv-airflow's interpreter. Without that venv both tests skip (run `scripts/airflow_test.sh` once to
create it). The end-to-end `dag.test()` run takes 5-12 minutes on 2 shared cores, so it also needs
FUXI_AIRFLOW_E2E=1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_PY = ROOT / ".venv-airflow" / "bin" / "python"
DAG_FILE = ROOT / "jobs" / "dags" / "fuxi_nightly.py"
STEPS = ["ingest", "update_sequences", "train", "evaluate", "register_promote"]

needs_airflow = pytest.mark.skipif(
    not AIRFLOW_PY.exists(),
    reason="no .venv-airflow (Airflow lives in its own venv): run scripts/airflow_test.sh",
)

PARSE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dag_module", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dag = module.dag
print(json.dumps({"dag_id": dag.dag_id, "type": type(dag).__module__ + "." + type(dag).__name__,
                  "tasks": [{"id": t.task_id, "op": type(t).__name__, "cmd": t.bash_command,
                             "down": sorted(t.downstream_task_ids), "env": t.env} for t in dag.tasks]}))
"""


@needs_airflow
def test_dag_parses_with_one_bash_task_per_nightly_step(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        AIRFLOW_HOME=str(tmp_path / "home"),
        FUXI_BIN="/venv/bin/fuxi",
        FUXI_NIGHTLY_WORKDIR=str(tmp_path / "nightly"),
        FUXI_NIGHTLY_ARGS="--preset tiny --set epochs=1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [str(AIRFLOW_PY), "-c", PARSE, str(DAG_FILE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    dag = json.loads(out.stdout.strip().splitlines()[-1])
    assert dag["dag_id"] == "fuxi_nightly" and dag["type"].startswith("airflow.sdk")
    tasks = {t["id"]: t for t in dag["tasks"]}
    assert list(tasks) == STEPS
    for step, nxt in zip(STEPS, STEPS[1:] + [None]):
        t = tasks[step]
        assert t["op"] == "BashOperator"
        assert t["cmd"] == (
            f"/venv/bin/fuxi nightly --date {{{{ ds }}}} --step {step} "
            f"--workdir {tmp_path / 'nightly'} --preset tiny --set epochs=1"
        )
        assert t["down"] == ([nxt] if nxt else [])
        assert t["env"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'nightly'}/mlflow.db"


@needs_airflow
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FUXI_AIRFLOW_E2E") != "1",
    reason="the dag.test() end-to-end run takes 5-12 min on 2 shared cores: set FUXI_AIRFLOW_E2E=1 "
    "(or run scripts/airflow_test.sh)",
)
def test_dag_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(ROOT / "scripts" / "airflow_test.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("AIRFLOW_TEST_RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1].split(" ", 1)[1])
    assert out.returncode == 0 and all(result["checks"].values()), result
    assert result["final"]["aliases"]["champion"] is not None
