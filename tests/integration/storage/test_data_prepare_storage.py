"""The single-file readers on a real S3 endpoint (SeaweedFS, conftest.py): `fuxi data prepare` with s3://
input and output writes what the same run writes on disk (sequences, vocabulary and bad rows), a missing
bucket is one line and exit 2 with nothing written, KuaiRand logs on S3 prepare as on disk, and a MovieLens
download lands on S3 through a local temporary folder (served by a loopback HTTP server: no internet).
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from pipeline.data.download import download_movielens
from pipeline.data.kuairand import preprocess_kuairand
from pipeline.data.readers import prepare_sequences
from pipeline.data.sequences import read_parquet, read_sequences
from pipeline.data.vocab import read_vocabulary

REPO = Path(__file__).resolve().parents[3]
T0 = 978_300_000  # 2001-01-01, plausible unix seconds


def s3_prefix(server: Any, name: str) -> str:
    return f"s3://{server.bucket}/{name}-{uuid.uuid4().hex[:8]}"


def good_events(seed: int = 7) -> list[tuple[int, int, float, int]]:
    """(user, raw item id, rating, timestamp): 40 users of 3 to 12 events over 60 sparse raw item ids, and
    user 99 with one event (dropped as too short)."""
    rng = np.random.default_rng(seed)
    items = 1000 + 7 * np.arange(60)
    rows = []
    for user in range(40):
        for k in range(int(rng.integers(3, 13))):
            rows.append((user, int(rng.choice(items)), float(rng.integers(1, 6)), T0 + 3600 * user + 60 * k))
    rows.append((99, int(items[0]), 4.0, T0))
    return rows


# bad rows planted in the CSV, one per reason, and one exact duplicate of the first good row
BAD_CSV_LINES = ["x,1000,3.0,978300000", "5,1007,4.0,", "5,1007,4.0", f"6,1014,2.0,{T0 * 1000}"]
CSV_REASONS = {
    "non_integer_user_id": 1,
    "missing_timestamp": 1,
    "wrong_field_count": 1,
    "absurd_timestamp": 1,
    "duplicate_event": 1,
    "user_too_short": 1,
}


def write_csv(path: Path, bad: bool = True) -> Path:
    rows = good_events()
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r},{t}" for u, i, r, t in rows]
    if bad:
        lines[3:3] = BAD_CSV_LINES  # lines 4 to 7 of the file
        u, i, r, t = rows[0]
        lines.append(f"{u},{i},{r},{t}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_events_parquet(path: Path) -> Path:
    rows = good_events(seed=8)
    users = [u for u, _, _, _ in rows] + [None, 3]
    items = [str(i) for _, i, _, _ in rows] + ["1000", "1007"]  # string raw ids stay strings
    times = [t for _, _, _, t in rows] + [T0, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"user_id": pa.array(users, pa.int64()), "item_id": items, "timestamp": times}), path
    )
    return path


def fuxi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )


def assert_same_prepared(remote_out: str, local_out: Path, remote_in: str) -> None:
    """The sequences table-equal, the vocabulary and the bad rows byte-equal, the metadata equal but for
    where the input and outputs are (named by their URIs on S3)."""
    here, there = read_sequences(local_out), read_sequences(remote_out)
    assert there.table.equals(here.table) and there.num_items == here.num_items
    assert isinstance(there.vocab, str) and there.vocab == storage.join(
        storage.parent(remote_out), local_out.stem + ".vocab.parquet"
    )
    assert storage.read_bytes(there.vocab) == Path(here.vocab).read_bytes()
    assert read_vocabulary(there.vocab).table.equals(read_vocabulary(here.vocab).table)
    local_q = local_out.parent / (Path(storage.name_of(remote_in)).stem + ".quarantine.parquet")
    remote_q = storage.join(storage.parent(remote_out), local_q.name)
    assert storage.read_bytes(remote_q) == local_q.read_bytes()
    meta_here, meta_there = dict(here.meta), dict(there.meta)
    assert meta_there.pop("source") == remote_in
    assert meta_here.pop("source").endswith(os.sep + storage.name_of(remote_in))
    report_here, report_there = meta_here.pop("report"), meta_there.pop("report")
    assert report_there.pop("path") == remote_in
    assert report_there.pop("quarantine_path") == remote_q
    for name in ("path", "quarantine_path"):
        report_here.pop(name)
    assert report_there == report_here and meta_there == meta_here


def test_prepare_from_and_to_s3_writes_what_the_local_run_writes(s3_env: Any, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in" / "ratings.csv")
    local_out = tmp_path / "out" / "seq.parquet"
    _, local_report = prepare_sequences(src, local_out)
    assert local_report.reasons == CSV_REASONS

    root = s3_prefix(s3_env, "prepare")
    remote_in = storage.join(root, "raw", "ratings.csv")
    storage.copy_file(str(src), remote_in)
    remote_out = storage.join(root, "seq", "seq.parquet")
    proc = fuxi("data", "prepare", "--input", remote_in, "--out", remote_out)
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.splitlines()[0]
    assert summary == local_report.summary().replace(
        str(local_report.quarantine_path), storage.join(root, "seq", "ratings.quarantine.parquet")
    )
    assert_same_prepared(remote_out, local_out, remote_in)
    # exactly the three outputs, published whole (no temporary object left), nothing beside the input
    assert storage.walk(root) == [
        "raw/ratings.csv",
        "seq/ratings.quarantine.parquet",
        "seq/seq.parquet",
        "seq/seq.vocab.parquet",
    ]
    assert not (REPO / "s3:").exists()  # the URIs were never taken as local paths


def test_prepare_parquet_events_on_s3_equal_the_local_run(s3_env: Any, tmp_path: Path) -> None:
    src = write_events_parquet(tmp_path / "events.parquet")
    local_out = tmp_path / "out" / "seq.parquet"
    _, local_report = prepare_sequences(src, local_out, min_count=2)
    assert local_report.reasons["missing_user_id"] == 1 and local_report.reasons["absurd_timestamp"] == 1

    root = s3_prefix(s3_env, "prepare-pq")
    remote_in = storage.join(root, "events.parquet")
    storage.copy_file(str(src), remote_in)
    remote_out = storage.join(root, "out", "seq.parquet")
    _, report = prepare_sequences(remote_in, remote_out, min_count=2)
    assert report.path == remote_in and report.reasons == local_report.reasons
    assert_same_prepared(remote_out, local_out, remote_in)


def test_bad_rows_on_s3_are_counted_set_aside_and_a_clean_rerun_removes_them(
    s3_env: Any, tmp_path: Path
) -> None:
    root = s3_prefix(s3_env, "bad-rows")
    remote_in = storage.join(root, "ml", "ratings.csv")
    storage.copy_file(str(write_csv(tmp_path / "ratings.csv")), remote_in)
    qdir = storage.join(root, "rejects")

    data, report = prepare_sequences(remote_in, storage.join(root, "seq.parquet"), quarantine_dir=qdir)
    assert (report.rows_read, report.rows_quarantined, report.rows_dropped) == (
        len(good_events()) + 5,
        4,
        2,
    )
    assert report.rows_kept == data.num_interactions
    assert report.reasons == CSV_REASONS
    assert report.quarantine_path == storage.join(qdir, "ratings.quarantine.parquet")
    bad = read_parquet(report.quarantine_path).to_pylist()
    assert [(r["source"], r["row_number"], r["reason"], r["field"], r["raw"]) for r in bad] == [
        ("ratings.csv", 4, "non_integer_user_id", "user_id", BAD_CSV_LINES[0]),
        ("ratings.csv", 5, "missing_timestamp", "timestamp", BAD_CSV_LINES[1]),
        ("ratings.csv", 6, "wrong_field_count", None, BAD_CSV_LINES[2]),
        ("ratings.csv", 7, "absurd_timestamp", "timestamp", BAD_CSV_LINES[3]),
    ]
    assert storage.listdir(storage.join(root, "ml")) == ["ratings.csv"]  # nothing set aside in the input

    storage.copy_file(str(write_csv(tmp_path / "clean" / "ratings.csv", bad=False)), remote_in)
    _, report = prepare_sequences(remote_in, storage.join(root, "seq.parquet"), quarantine_dir=qdir)
    assert report.rows_quarantined == 0 and report.quarantine_path is None
    assert not storage.exists(storage.join(qdir, "ratings.quarantine.parquet"))  # the stale file is gone


@pytest.mark.parametrize("missing", ["input", "output"])
def test_prepare_with_a_missing_bucket_is_one_line_exit_2_and_writes_nothing(
    s3_env: Any, tmp_path: Path, missing: str
) -> None:
    root = s3_prefix(s3_env, "no-bucket")
    remote_in = storage.join(root, "ratings.csv")
    storage.copy_file(str(write_csv(tmp_path / "ratings.csv")), remote_in)
    nowhere = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x"
    if missing == "input":
        src, out = storage.join(nowhere, "ratings.csv"), storage.join(root, "out", "seq.parquet")
    else:
        src, out = remote_in, storage.join(nowhere, "seq.parquet")
    proc = fuxi("data", "prepare", "--input", src, "--out", out)
    assert proc.returncode == 2
    shown = src if missing == "input" else out
    assert proc.stderr == f"fuxi: error: {shown}: no such bucket\n" and proc.stdout == ""
    assert storage.walk(root) == ["ratings.csv"]  # no output, no quarantine file
    assert not (REPO / "s3:").exists()

    proc = fuxi("data", "prepare", "--input", storage.join(root, "nope.csv"), "--out", out)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# KuaiRand logs and the MovieLens download

KR_HEADER = "user_id,video_id,date,hourmin,time_ms,is_click,is_like"


def write_kuairand(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name, start in (
        ("log_standard_4_08_to_4_21_1k.csv", 1_000_000),
        ("log_standard_4_22_to_5_08_1k.csv", 9e8),
    ):
        lines = [KR_HEADER]
        for k in range(120):
            user, video, click = (
                int(rng.integers(0, 15)),
                int(rng.integers(100, 140)),
                int(rng.random() < 0.7),
            )
            lines.append(f"{user},{video},20220408,1200,{int(start) + 997 * k},{click},0")
        lines.insert(10, "x,101,20220408,1200,1000000,1,0")  # a bad user id
        (folder / name).write_text("\n".join(lines) + "\n")
    (folder / "log_random_4_22_to_5_08_1k.csv").write_text(KR_HEADER + "\n1,100,20220408,1200,5000,1,0\n")


def test_kuairand_logs_on_s3_prepare_as_on_disk(s3_env: Any, tmp_path: Path) -> None:
    write_kuairand(tmp_path / "logs")
    local, report_here = preprocess_kuairand(tmp_path / "logs", tmp_path / "out" / "kr.parquet", min_length=3)
    root = s3_prefix(s3_env, "kuairand")
    storage.copy_tree(str(tmp_path / "logs"), storage.join(root, "logs"))

    remote, report = preprocess_kuairand(  # a prefix: its log_*.csv, the random log left out
        storage.join(root, "logs"), storage.join(root, "out", "kr.parquet"), min_length=3
    )
    assert remote.table.equals(local.table) and remote.num_items == local.num_items
    assert report.reasons == report_here.reasons and report_here.reasons["non_integer_user_id"] == 2
    assert report.path == storage.join(root, "logs") and report.rows_quarantined == 2
    for name in ("kr.item_map.parquet", "kr.quarantine.parquet"):
        there = storage.read_bytes(storage.join(root, "out", name))
        assert there == (tmp_path / "out" / name).read_bytes(), name
    meta = read_sequences(storage.join(root, "out", "kr.parquet")).meta
    assert meta["sources"] == [
        storage.join(root, "logs", "log_standard_4_08_to_4_21_1k.csv"),
        storage.join(root, "logs", "log_standard_4_22_to_5_08_1k.csv"),
    ]
    assert meta["random_logs_left_out"] == [storage.join(root, "logs", "log_random_4_22_to_5_08_1k.csv")]
    assert meta["item_map"] == storage.join(root, "out", "kr.item_map.parquet")
    assert meta["per_file"] == read_sequences(tmp_path / "out" / "kr.parquet").meta["per_file"]


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def movielens_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A loopback HTTP server holding ml-1m.zip; yields its base URL."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "ml-1m.zip", "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
        zf.writestr("ml-1m/README", "readme")
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_to_s3_uploads_the_unpacked_data_set(s3_env: Any, movielens_site: str) -> None:
    dest = s3_prefix(s3_env, "raw")
    ratings = download_movielens("ml-1m", dest, base_url=movielens_site, progress=False)
    assert ratings == storage.join(dest, "ml-1m", "ratings.dat")
    assert storage.read_bytes(ratings) == b"1::1193::5::978300760\n1::661::3::978302109\n"
    assert storage.walk(dest) == ["ml-1m/README", "ml-1m/ratings.dat"]  # the zip stays behind
    assert download_movielens("ml-1m", dest, base_url=movielens_site, progress=False) == ratings
    assert _Handler.requests == ["/ml-1m.zip"]  # already there: not fetched again

    with pytest.raises(storage.StorageError) as err:
        download_movielens(
            "ml-1m", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/raw", base_url=movielens_site
        )
    assert str(err.value).endswith(": no such bucket") and _Handler.requests == ["/ml-1m.zip"]


@pytest.mark.slow
def test_diagnose_fuxi_subsamples_a_sequence_file_on_s3_with_its_vocabulary(
    s3_env: Any, tmp_path: Path
) -> None:
    """benchmarks/diagnose_fuxi.py (run as a script) on --data s3://...: the subsample is written to the
    local work folder with a copy of the vocabulary the S3 file names, and the model trains on it."""
    root = s3_prefix(s3_env, "diagnose")
    data, _ = prepare_sequences(write_csv(tmp_path / "ratings.csv"), storage.join(root, "seq.parquet"))
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "benchmarks/diagnose_fuxi.py", "norms", "--data", storage.join(root, "seq.parquet")]
        + ["--users", "12", "--steps", "1", "--variants", "official", "--work", str(work)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient norms on the probe batch" in proc.stdout
    assert sorted(p.name for p in work.iterdir()) == ["seq-12u-s0.parquet", "seq.vocab.parquet"]
    assert (work / "seq.vocab.parquet").read_bytes() == storage.read_bytes(str(data.vocab))
    sub = read_sequences(work / "seq-12u-s0.parquet")
    assert sub.num_users == 12 and sub.vocab == work / "seq.vocab.parquet"
