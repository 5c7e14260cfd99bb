"""A sequence build on a Ray cluster with no CPU left (every worker node lost) fails in bounded time with
one message, and commits nothing: the shard directory keeps its previous generation, byte for byte.

Ray itself would wait forever (ray-project/ray#45909). Here a real local Ray with `num_cpus=0` stands for
the cluster whose worker nodes are gone (infra/box's `ray-host-loss` drill with both workers lost).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import build
from pipeline.data.stream import init_ray

ray = pytest.importorskip("ray")
T = 1_704_067_200  # 2024-01-01 00:00 UTC


def write_day(logs: Path, date: str, day: int) -> None:
    folder = logs / f"date={date}"
    folder.mkdir(parents=True)
    n = 40
    table = pa.table(
        {
            "user_id": pa.array([u % 8 for u in range(n)], pa.int64()),
            "item_id": pa.array([1 + (u * 7) % 30 for u in range(n)], pa.int64()),
            "timestamp": pa.array([T + day * 86_400 + u for u in range(n)], pa.int64()),
            "event_type": pa.array([0] * n, pa.int8()),
        }
    )
    pq.write_table(table, folder / "part-00000.parquet")


# Ray Data's own executor thread, still waiting for a CPU, ends with SystemExit when Ray is shut down
# (Python's default thread hook says nothing of it; pytest's does)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_no_cpu_left_fails_the_build_and_keeps_the_previous_generation(tmp_path, monkeypatch):
    logs, seq = tmp_path / "logs", tmp_path / "seq"
    write_day(logs, "2024-01-01", 0)
    write_day(logs, "2024-01-02", 1)
    init_ray(None, num_cpus=1, log_to_driver=False)
    try:
        build.build_sequences(logs, seq, dates=["2024-01-01"], progress=False)
    finally:
        ray.shutdown()
    manifest = (seq / "manifest.json").read_bytes()

    monkeypatch.setattr(build, "NO_CPU_TIMEOUT_S", 2.0)
    init_ray(None, num_cpus=0, log_to_driver=False)  # a cluster of a 0-CPU head
    try:
        with pytest.raises(RuntimeError) as err:
            build.append_day(logs, "2024-01-02", seq, progress=False)
        assert "the Ray cluster has had no CPU for 2 s (1 node(s) alive" in str(err.value)
        assert str(err.value).endswith("0 of 1 tasks done, nothing committed")
        assert (seq / "manifest.json").read_bytes() == manifest  # generation 1, as it was
        assert build.read_manifest(seq)["days"].keys() == {"2024-01-01"}

        with pytest.raises(RuntimeError, match="no CPU for 2 s"):
            build.build_sequences(logs, tmp_path / "fresh", progress=False)
        assert not (tmp_path / "fresh" / "manifest.json").exists()
    finally:
        ray.shutdown()
