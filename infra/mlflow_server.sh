#!/usr/bin/env bash
# One MLflow tracking server for a team or a cluster: runs, the model registry and a proxied artifact store.
# Multi-node jobs must log here (MLFLOW_TRACKING_URI=http://<host>:<port>): with a SQLite file each client
# writes artifacts to its own ./mlruns (stack-notes section 4).
#
#   infra/mlflow_server.sh                                    # SQLite + local artifacts under $MLFLOW_HOME
#   MLFLOW_BACKEND=postgres MLFLOW_DB_URI=postgresql://mlflow:$PW@db:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://recsys-mlflow/artifacts infra/mlflow_server.sh
#
# Artifacts on S3 (AWS, or any S3 endpoint: SeaweedFS, MinIO): `--artifacts-destination s3://...` with
# `--serve-artifacts`, so clients log and read artifacts through this server (mlflow-artifacts:/ URIs) and
# need no storage credentials; the server's boto3 (pinned) takes them from its own environment only:
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_REGION=us-east-1
#   export AWS_ENDPOINT_URL=http://127.0.0.1:8333     # a store other than AWS (or MLFLOW_S3_ENDPOINT_URL)
#   MLFLOW_ARTIFACTS=s3://bucket/mlflow infra/mlflow_server.sh
# Never put keys in MLFLOW_ARTIFACTS (s3://key:secret@bucket is refused): arguments are logged and visible
# in the process list. Tests: tests/integration/storage/test_mlflow_s3.py (against SeaweedFS).
#
# Env:
#   MLFLOW_BACKEND        sqlite (default) | postgres
#   MLFLOW_HOME           state folder for the SQLite file and local artifacts (default ./runs/mlflow-server)
#   MLFLOW_DB_URI         the backend store (postgres: required; sqlite: default sqlite:///$MLFLOW_HOME/mlflow.db)
#   MLFLOW_ARTIFACTS      artifact destination: a folder, s3://..., gs://... (default $MLFLOW_HOME/artifacts)
#   MLFLOW_HOST / MLFLOW_PORT / MLFLOW_WORKERS   bind address (default 127.0.0.1), port (5000), workers (2)
#   MLFLOW_ALLOWED_HOSTS  Host headers to accept (the security middleware), e.g. "mlflow.recsys.svc,localhost:*"
#   MLFLOW_SERVER_ARGS    anything else for `mlflow server`
#   MLFLOW_AUTH           basic (default): MLflow's basic-auth app (`--app-name basic-auth`): every request
#                         needs a user and password; none: no authentication, refused unless MLFLOW_HOST is
#                         a loopback address (anyone who reaches an open server can register a version and
#                         move @champion, i.e. choose what `fuxi serve` loads)
#   MLFLOW_AUTH_ADMIN_PASSWORD  the admin's password, needed on the first start (MLflow 3.17 ships none and
#                         refuses to start without one); later rotate it with the update-password API
#   MLFLOW_AUTH_DB_URI    the users and permissions store (default sqlite:///$MLFLOW_HOME/basic_auth.db)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the auth app; the same on every server behind one name
#                         (default: one generated once into $MLFLOW_HOME/flask_secret_key, mode 600)
# Clients then set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (jobs, `fuxi register`, `fuxi serve`).
# Postgres needs psycopg2 (in the image); S3 needs boto3 (pinned) and the AWS_* variables above.
set -euo pipefail
BACKEND=${MLFLOW_BACKEND:-sqlite}
HOME_DIR=${MLFLOW_HOME:-$PWD/runs/mlflow-server}
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
WORKERS=${MLFLOW_WORKERS:-2}
MLFLOW=${MLFLOW_BIN:-mlflow}
AUTH=${MLFLOW_AUTH:-basic}
if [[ "${MLFLOW_ARTIFACTS:-}" =~ ^[A-Za-z][A-Za-z0-9+.-]*://[^/]*@ ]]; then
  echo "MLFLOW_ARTIFACTS carries credentials (user info in the URI); they would be logged: give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the server's environment" >&2
  exit 2
fi
mkdir -p "$HOME_DIR"
HOME_DIR=$(cd "$HOME_DIR" && pwd)

case "$AUTH" in
  basic)
    AUTH_DB=${MLFLOW_AUTH_DB_URI:-sqlite:///$HOME_DIR/basic_auth.db}
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
      KEY_FILE=$HOME_DIR/flask_secret_key
      if [ ! -s "$KEY_FILE" ]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$KEY_FILE")
      fi
      MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$KEY_FILE")
      export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    # MLflow reads its auth settings from an ini file: this server's own, beside its state
    AUTH_INI=$HOME_DIR/basic_auth.ini
    cat > "$AUTH_INI" <<EOF
[mlflow]
default_permission = READ
database_uri = $AUTH_DB
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    export MLFLOW_AUTH_CONFIG_PATH=$AUTH_INI
    ;;
  none)
    case "$HOST" in
      127.*|localhost|::1) ;;
      *)
        echo "MLFLOW_AUTH=none with MLFLOW_HOST=$HOST: an open server off loopback lets anyone register and promote models; use MLFLOW_AUTH=basic" >&2
        exit 2
        ;;
    esac
    ;;
  *)
    echo "MLFLOW_AUTH must be basic or none, not '$AUTH'" >&2
    exit 2
    ;;
esac

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
if [ "$AUTH" = basic ]; then
  args+=(--app-name basic-auth)
fi
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
echo "mlflow server: backend $BACKEND ($DB_URI), artifacts $ARTIFACTS, auth $AUTH, http://$HOST:$PORT" >&2
# shellcheck disable=SC2086
exec "$MLFLOW" "${args[@]}" ${MLFLOW_SERVER_ARGS:-}
