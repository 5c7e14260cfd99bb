"""A shard directory built on local disk from synthetic logs, for tests that read, stream or copy one.

seq = build_shards(tmp_path, LogConfig(num_users=300, ...), BuildConfig(max_length=30, ...))
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.build import BuildConfig, build_sequences
from pipeline.data.synth_logs import LogConfig, write_logs


def build_shards(root: Path, logs: LogConfig, build: BuildConfig) -> Path:
    """Write `logs` to root/logs and build them into root/seq (manifest, shards, vocabulary); returns it."""
    write_logs(logs, root / "logs", progress=False)
    build_sequences(root / "logs", root / "seq", build, progress=False)
    return root / "seq"
