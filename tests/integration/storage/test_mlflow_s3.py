"""MLflow's artifact store on S3 (SeaweedFS, conftest.py), through boto3 (pinned for it):

- a run whose experiment's artifact root is an s3:// prefix logs its artifacts straight to the store;
- `infra/mlflow_server.sh` with MLFLOW_ARTIFACTS=s3://... serves them (`--artifacts-destination`): a client
  with no AWS credentials at all logs and reads artifacts through the server, which alone holds the keys, and
  these appear in no process argument list and not in the server's log;
- an artifact URI carrying credentials is refused before anything starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import storage
from infra.seaweedfs import SeaweedFS
from tests.helpers.http import free_port

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "infra" / "mlflow_server.sh"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
AWS_NAMES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_SESSION_TOKEN",
)


def _prefix(server: SeaweedFS, name: str) -> str:
    return f"s3://{server.bucket}/{name}-{uuid.uuid4().hex[:8]}"


def _find(prefix: str, suffix: str) -> str:
    """The one object under `prefix` whose name ends with `suffix` (MLflow lays out <exp>/<run>/artifacts)."""
    names = [n for n in storage.walk(prefix) if n.endswith(suffix)]
    assert len(names) == 1, (suffix, storage.walk(prefix))
    return storage.join(prefix, names[0])


def test_a_run_logs_its_artifacts_to_an_s3_artifact_root(s3_env: SeaweedFS, tmp_path: Path) -> None:
    root = _prefix(s3_env, "mlflow-direct")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("s3-artifacts", artifact_location=root)
    run = client.create_run(exp).info.run_id
    (tmp_path / "model.json").write_text('{"layers": 2}')
    client.log_artifact(run, str(tmp_path / "model.json"), artifact_path="model")
    client.log_text(run, "hello s3", "notes/hello.txt")

    assert client.get_run(run).info.artifact_uri == f"{root}/{run}/artifacts"
    assert storage.read_bytes(f"{root}/{run}/artifacts/model/model.json") == b'{"layers": 2}'
    assert storage.read_bytes(_find(root, f"{run}/artifacts/notes/hello.txt")) == b"hello s3"
    listed = sorted(a.path for a in client.list_artifacts(run, "model"))
    assert listed == ["model/model.json"]
    back = client.download_artifacts(run, "notes/hello.txt", str(tmp_path / "back"))
    assert Path(back).read_text() == "hello s3"


def _group_cmdlines(pgid: int) -> list[str]:
    """The argument lists of every process in the server's process group (the script, mlflow, uvicorn)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ProcessLookupError):
            continue
    return out


@pytest.mark.slow
def test_mlflow_server_serves_artifacts_from_s3_to_a_client_without_keys(
    s3_env: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _prefix(s3_env, "mlflow-server")
    port = free_port()
    env = dict(
        os.environ,  # the AWS_* variables of s3_env: the server's, and only the server's
        MLFLOW_BIN=MLFLOW,
        MLFLOW_HOME=str(tmp_path / "server"),
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_AUTH="none",
        MLFLOW_ARTIFACTS=root,
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer /health in 90 s"
                time.sleep(0.5)
        secret = s3_env.env()["AWS_SECRET_ACCESS_KEY"]
        cmdlines = _group_cmdlines(proc.pid)
        assert any("--artifacts-destination " + root in c for c in cmdlines), cmdlines
        assert not any(secret in c or s3_env.env()["AWS_ACCESS_KEY_ID"] in c for c in cmdlines)

        for name in AWS_NAMES:  # the client: a tracking URL and nothing else
            monkeypatch.delenv(name, raising=False)
        client = MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("served-s3")).info.run_id
        assert client.get_run(run).info.artifact_uri.startswith("mlflow-artifacts:")
        client.log_text(run, "served from s3", "notes/served.txt")
        back = client.download_artifacts(run, "notes/served.txt", str(tmp_path / "back"))
        assert Path(back).read_text() == "served from s3"

        for name, value in s3_env.env().items():  # look in the store itself
            monkeypatch.setenv(name, value)
        assert storage.read_bytes(_find(root, f"{run}/artifacts/notes/served.txt")) == b"served from s3"
        assert secret not in log_path.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's own session: mlflow and its workers
        proc.wait(timeout=30)


def test_an_artifact_uri_with_credentials_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env=dict(
            os.environ,
            MLFLOW_BIN=MLFLOW,
            MLFLOW_HOME=str(tmp_path / "home"),
            MLFLOW_AUTH="none",
            MLFLOW_ARTIFACTS="s3://AKIAEXAMPLE:s3cr3t@bucket/artifacts",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2,
        [
            "MLFLOW_ARTIFACTS carries credentials (user info in the URI); they would be logged: give them "
            "as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the server's environment"
        ],
    )
    assert "s3cr3t" not in proc.stdout + proc.stderr
