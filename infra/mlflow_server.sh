#!/usr/bin/env bash
# One MLflow tracking server for a team or a cluster: runs, the model registry and a proxied artifact store.
# Multi-node jobs must log here (MLFLOW_TRACKING_URI=http://<host>:<port>): with a SQLite file each client
# writes artifacts to its own ./mlruns (stack-notes section 4).
#
#   infra/mlflow_server.sh                                    # SQLite + local artifacts under $MLFLOW_HOME
#   MLFLOW_BACKEND=postgres MLFLOW_DB_URI=postgresql://mlflow:$PW@db:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://recsys-mlflow/artifacts infra/mlflow_server.sh
#
# Env:
#   MLFLOW_BACKEND        sqlite (default) | postgres
#   MLFLOW_HOME           state folder for the SQLite file and local artifacts (default ./runs/mlflow-server)
#   MLFLOW_DB_URI         the backend store (postgres: required; sqlite: default sqlite:///$MLFLOW_HOME/mlflow.db)
#   MLFLOW_ARTIFACTS      artifact destination: a folder, s3://..., gs://... (default $MLFLOW_HOME/artifacts)
#   MLFLOW_HOST / MLFLOW_PORT / MLFLOW_WORKERS   bind address (default 127.0.0.1), port (5000), workers (2)
#   MLFLOW_ALLOWED_HOSTS  Host headers to accept (the security middleware), e.g. "mlflow.recsys.svc,localhost:*"
#   MLFLOW_SERVER_ARGS    anything else for `mlflow server`
# Postgres needs psycopg2 (in the image); S3 needs boto3 and the usual AWS_* credentials / MLFLOW_S3_ENDPOINT_URL.
set -euo pipefail
BACKEND=${MLFLOW_BACKEND:-sqlite}
HOME_DIR=${MLFLOW_HOME:-$PWD/runs/mlflow-server}
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
WORKERS=${MLFLOW_WORKERS:-2}
MLFLOW=${MLFLOW_BIN:-mlflow}
mkdir -p "$HOME_DIR"
HOME_DIR=$(cd "$HOME_DIR" && pwd)

case "$BACKEND" in
  sqlite)
    DB_URI=${MLFLOW_DB_URI:-sqlite:///$HOME_DIR/mlflow.db}
    ;;
  postgres)
    DB_URI=${MLFLOW_DB_URI:?set MLFLOW_DB_URI=postgresql://user:password@host:5432/dbname}
    # bring an existing database to this MLflow's schema (a no-op when current; the server creates a new one)
    "$MLFLOW" db upgrade "$DB_URI"
    ;;
  *)
    echo "MLFLOW_BACKEND must be sqlite or postgres, not '$BACKEND'" >&2
    exit 2
    ;;
esac

ARTIFACTS=${MLFLOW_ARTIFACTS:-$HOME_DIR/artifacts}
case "$ARTIFACTS" in
  *://*) ;;
  *) mkdir -p "$ARTIFACTS" ;;
esac

args=(server --backend-store-uri "$DB_URI" --artifacts-destination "$ARTIFACTS" --serve-artifacts
      --host "$HOST" --port "$PORT" --workers "$WORKERS")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
echo "mlflow server: backend $BACKEND ($DB_URI), artifacts $ARTIFACTS, http://$HOST:$PORT" >&2
# shellcheck disable=SC2086
exec "$MLFLOW" "${args[@]}" ${MLFLOW_SERVER_ARGS:-}
