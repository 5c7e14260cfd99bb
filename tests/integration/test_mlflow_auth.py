"""infra/mlflow_server.sh runs MLflow's basic-auth app by default: a real server on a free loopback port
answers 401 to anonymous and wrong-password requests (so nobody can register a version or move
@champion without an account) and 200 to the admin; an open server off loopback is refused."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.http import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "mlflow_server.sh"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
PASSWORD = "redteam-admin-password"


def _call(url: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    env = dict(
        os.environ,
        MLFLOW_BIN=MLFLOW,
        MLFLOW_HOME=str(home),
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD,
    )
    env.pop("MLFLOW_AUTH", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError((home / "server.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError("mlflow server did not answer /health in 60 s")
        yield url, home
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's own session: mlflow and its workers
        proc.wait(timeout=30)
        log.close()


def test_basic_auth_is_on_by_default(server: tuple[str, Path]) -> None:
    url, home = server
    api = f"{url}/api/2.0/mlflow"
    search = f"{api}/registered-models/search"
    assert _call(search) == 401
    assert _call(search, "admin", "password1234") == 401  # no well-known default password
    assert _call(search, "admin", "wrong") == 401
    assert _call(search, "admin", PASSWORD) == 200
    # what an attacker needs to choose what `fuxi serve` loads: create a model, move @champion
    assert _call(f"{api}/registered-models/create", body={"name": "fuxi-alpha"}) == 401
    alias = {"name": "fuxi-alpha", "alias": "champion", "version": "1"}
    assert _call(f"{api}/registered-models/alias", body=alias) == 401
    assert (home / "basic_auth.ini").exists() and oct((home / "flask_secret_key").stat().st_mode)[
        -3:
    ] == "600"


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"MLFLOW_AUTH": "none", "MLFLOW_HOST": "0.0.0.0"},
            "MLFLOW_AUTH=none with MLFLOW_HOST=0.0.0.0: an open server off loopback lets anyone register and "
            "promote models; use MLFLOW_AUTH=basic",
        ),
        ({"MLFLOW_AUTH": "open"}, "MLFLOW_AUTH must be basic or none, not 'open'"),
    ],
)
def test_open_server_off_loopback_is_refused(tmp_path: Path, env: dict, message: str) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env=dict(os.environ, MLFLOW_BIN=MLFLOW, MLFLOW_HOME=str(tmp_path / "home"), **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [message])
