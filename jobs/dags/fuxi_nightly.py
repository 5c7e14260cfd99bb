"""Apache Airflow 3 DAG: the nightly retraining job, one BashOperator task per step of `fuxi nightly`.

Airflow runs in its own environment (its pins collide with the ML stack); each task calls the project's
CLI from the ML environment, and the train step submits a TorchX job (`--scheduler kubernetes` etc. via
FUXI_NIGHTLY_ARGS). Every step is idempotent for `{{ ds }}`: clearing and re-running a task or the whole
run changes nothing that is already done, and only the last task can move the `champion` alias.

Environment (read when the scheduler parses this file):
    FUXI_BIN               the `fuxi` executable of the ML environment (default: `fuxi` on PATH)
    FUXI_NIGHTLY_WORKDIR   state, logs, sequences and run folders (default ~/fuxi-nightly)
    FUXI_NIGHTLY_ARGS      extra `fuxi nightly` arguments, e.g. "--preset cpu-demo --scheduler kubernetes
                           --scheduler-args queue=default,namespace=recsys"
    MLFLOW_TRACKING_URI    tracking server (default sqlite:///$FUXI_NIGHTLY_WORKDIR/mlflow.db)
    FUXI_NIGHTLY_RETRIES   task retries (default 0)
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

STEPS = ("ingest", "update_sequences", "train", "evaluate", "register_promote")

FUXI_BIN = os.environ.get("FUXI_BIN", "fuxi")
WORKDIR = os.environ.get("FUXI_NIGHTLY_WORKDIR", str(Path.home() / "fuxi-nightly"))
EXTRA_ARGS = os.environ.get("FUXI_NIGHTLY_ARGS", "")
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path(WORKDIR).resolve()}/mlflow.db")


def step_command(step: str) -> str:
    return (
        f"{shlex.quote(FUXI_BIN)} nightly --date {{{{ ds }}}} --step {step} "
        f"--workdir {shlex.quote(WORKDIR)} {EXTRA_ARGS}"
    ).strip()


with DAG(
    dag_id="fuxi_nightly",
    description="FuXi-alpha nightly: ingest -> sequences -> warm-start train -> evaluate -> register/promote",
    schedule="@daily",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # day N warm-starts from the champion day N-1 may have promoted
    default_args={
        "retries": int(os.environ.get("FUXI_NIGHTLY_RETRIES", "0")),
        "retry_delay": timedelta(minutes=5),
    },
    tags=["fuxi", "retraining"],
) as dag:
    tasks = [
        BashOperator(
            task_id=step,
            bash_command=step_command(step),
            env={"MLFLOW_TRACKING_URI": TRACKING_URI, "PYTHONUNBUFFERED": "1"},
            append_env=True,  # PATH, HOME and FUXI_NIGHTLY_FAIL_STEP (drills) come from the worker
            execution_timeout=timedelta(hours=6 if step == "train" else 1),
        )
        for step in STEPS
    ]
    for upstream, downstream in pairwise(tasks):
        upstream >> downstream
