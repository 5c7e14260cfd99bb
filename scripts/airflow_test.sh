#!/usr/bin/env bash
# End-to-end check of the nightly DAG with Airflow's `dag.test()` on the embedded synthetic data.
# Airflow lives in its own venv (.venv-airflow: its pins collide with the ML stack); the DAG's tasks call
# the ML venv's `fuxi`. Creates .venv-airflow on first use (apache-airflow==3.3.2, ~30 s, ~300 MB).
#   scripts/airflow_test.sh [WORKDIR]      (default: a fresh temporary folder)
# Env: FUXI_AIRFLOW_NIGHTLY_ARGS overrides the training arguments of the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
AIRFLOW_VENV=${AIRFLOW_VENV:-.venv-airflow}
ML_VENV=${VENV:-.venv}
if [ ! -x "$AIRFLOW_VENV/bin/airflow" ]; then
  python3 -m venv "$AIRFLOW_VENV"
  "$AIRFLOW_VENV/bin/python" -m pip install --disable-pip-version-check -q "apache-airflow==3.3.2"
fi
WORK=${1:-$(mktemp -d -t fuxi-airflow-XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export AIRFLOW_HOME="$WORK/airflow_home"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/jobs/dags"
export AIRFLOW__LOGGING__LOGGING_LEVEL=${AIRFLOW_LOG_LEVEL:-WARNING}
export FUXI_BIN="$ROOT/$ML_VENV/bin/fuxi"
export FUXI_NIGHTLY_WORKDIR="$WORK/nightly"
export MLFLOW_TRACKING_URI="sqlite:///$WORK/nightly/mlflow.db"
export FUXI_NIGHTLY_ARGS=${FUXI_AIRFLOW_NIGHTLY_ARGS:-"--preset tiny --set epochs=2 --set optim.lr=0.005"}
mkdir -p "$FUXI_NIGHTLY_WORKDIR"
echo "workdir: $WORK"
t0=$(date +%s)
"$AIRFLOW_VENV/bin/airflow" db migrate > "$WORK/db_migrate.log" 2>&1
"$AIRFLOW_VENV/bin/python" scripts/airflow_dag_test.py --dag-file jobs/dags/fuxi_nightly.py --workdir "$FUXI_NIGHTLY_WORKDIR"
echo "airflow_test.sh: passed in $(( $(date +%s) - t0 )) s"
