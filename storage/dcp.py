"""DCP on any URI: torch.distributed.checkpoint's fsspec writer and reader, opened from the same
environment as storage.fs (so `s3://` checkpoints reach the endpoint and credentials of AWS_*).

A checkpoint is written into a fresh generation of a CommitRoot and made visible by its pointer
(storage/commit.py), so DCP's own `.metadata.tmp` rename is never what publishes it.
"""

from __future__ import annotations

import os
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from storage.fs import fsspec_target, require_bucket
from storage.uri import is_local


def writer(uri: str | os.PathLike[str], **kwargs: Any) -> FsspecWriter:
    """A DCP StorageWriter for `uri` (kwargs: FsspecWriter's own, e.g. thread_count). The bucket must
    exist: the writer's makedirs would otherwise create it. Files are fsynced on local disk only: an
    object-store stream has no file descriptor, and DCP would fall back to `os.sync()` of the whole
    machine for each file (an upload is durable once it completes)."""
    require_bucket(uri)
    kwargs.setdefault("sync_files", is_local(uri))
    url, options = fsspec_target(uri)
    return FsspecWriter(url, **kwargs, **options)


def reader(uri: str | os.PathLike[str]) -> FsspecReader:
    """A DCP StorageReader for `uri`. Stock DCP unpickles `.metadata`; a checkpoint from outside must be
    read through the project's restricted reader (pipeline/train/checkpoint.py) instead."""
    url, options = fsspec_target(uri)
    return FsspecReader(url, **options)
