"""`fuxi serve --model s3://.../checkpoints`: a checkpoint a training run wrote to S3 (SeaweedFS,
conftest.py) is served over real HTTP and answers exactly as the same checkpoint copied to local disk does.

The store's checkpoint is staged into a local folder by `serving.loading.local_checkpoint` (the path
`fuxi recommend` takes) and serving's checks read the staged copy: a crafted train.json on the store is
refused in one line naming its URI. The served version names the generation's URI. A wrong bucket is one
line and exit status 2, before anything binds the port.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import storage
from tests.helpers.http import call_json, free_port

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


def _serve_command(model: str, port: int) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "serve", "--model", model, "--port", str(port)]


@contextlib.contextmanager
def serving(model: str, log: Path, cwd: Path) -> Iterator[str]:
    """`fuxi serve --model MODEL` on a free loopback port until the block ends (stopped by its pid)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(_serve_command(model, port), env=env, cwd=cwd, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"fuxi serve exited {proc.returncode}: {log.read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(f"{url}/ping", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"fuxi serve did not answer /ping in 180 s: {log.read_text()}"
                        ) from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture
def s3_checkpoint(s3_env: Any, tmp_path: Path) -> tuple[str, str]:
    """(the checkpoint root a one-epoch tiny run wrote to S3, a local copy of that root)."""
    from pipeline.train.presets import tiny
    from pipeline.train.run import run

    cfg = tiny()
    cfg.epochs = 1
    cfg.tracking.enabled = False
    cfg.progress = False
    cfg.run_dir = f"s3://{s3_env.bucket}/serve-{tmp_path.name}"
    report = run(cfg)
    root = storage.join(cfg.run_dir, "checkpoints")
    assert report["checkpoint"].startswith(root + "/gen-")  # the run wrote its checkpoints to S3
    local = str(tmp_path / "local-checkpoints")
    storage.copy_tree(root, local)
    return root, local


def _records(n: int = 24) -> list[dict[str, Any]]:
    from pipeline.data.synthetic import SyntheticConfig, synthetic_sequences

    t = synthetic_sequences(SyntheticConfig(num_users=n, num_items=200, mean_length=15, max_length=40)).table
    return [
        {"item_ids": i, "timestamps": s}
        for i, s in zip(t.column("item_ids").to_pylist(), t.column("timestamps").to_pylist())
    ]


def test_checkpoint_on_s3_is_served_as_its_local_copy(s3_checkpoint: tuple[str, str], tmp_path: Path) -> None:
    root, local = s3_checkpoint
    records = _records()
    body = {"dataframe_records": records, "params": {"k": 10}}
    answers, versions = {}, {}
    for name, model in (("s3", root), ("local", local)):
        with serving(model, tmp_path / f"serve-{name}.log", tmp_path) as url:
            status, answers[name] = call_json(f"{url}/invocations", body)
            assert status == 200, answers[name]
            assert call_json(f"{url}/version")[0] == 200
            versions[name] = call_json(f"{url}/version")[1]["model"]

    # the S3 model is named by its generation's URI; the local one by its folder
    s3_gen = versions["s3"]
    assert s3_gen.startswith(f"{root}/gen-") and storage.is_file(storage.join(s3_gen, "train.json"))
    assert storage.name_of(versions["local"]) == storage.name_of(s3_gen)

    s3, disk = answers["s3"]["predictions"], answers["local"]["predictions"]
    assert len(s3) == len(disk) == len(records)
    assert sum(len(p["item_ids"]) for p in s3) == 10 * len(records)  # every user got a full top-10
    for a, b in zip(s3, disk):
        assert a["item_ids"] == b["item_ids"] and a["ignored"] == b["ignored"]
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-6, abs=1e-7)
    assert not (tmp_path / "s3:").exists()  # nothing was written to a local folder named after the URI

    # the staged copy is checked as a local folder is (serving/trust.py), and a refusal names the URI
    train_json = storage.join(s3_gen, "train.json")
    meta = json.loads(storage.read_bytes(train_json))
    meta["config"]["model"]["evil"] = 1
    storage.write_bytes(train_json, json.dumps(meta).encode())
    proc = subprocess.run(
        _serve_command(root, free_port()),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fuxi: error: {train_json}: config.model.evil: unknown field"
    ], proc.stderr[-2000:]


def test_a_wrong_bucket_is_one_line_and_exit_2(s3_env: Any, tmp_path: Path) -> None:
    missing = f"s3://no-such-bucket-{tmp_path.name[-8:].lower()}/runs/x/checkpoints"
    proc = subprocess.run(
        _serve_command(missing, free_port()),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuxi: error: s3://no-such-bucket-"), proc.stderr
    assert "no such bucket" in lines[0]
