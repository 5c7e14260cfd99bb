"""train.json is read with a size bound on every path that reads it (resume, warm start, eval, serving)."""

from __future__ import annotations

import json

import pytest

from pipeline.train.checkpoint import MAX_TRAIN_JSON_BYTES, read_meta
from storage.errors import StorageError


def test_a_train_json_over_the_bound_is_refused_unread(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # valid JSON one byte over the bound: refused by size, not by parsing
    pad = MAX_TRAIN_JSON_BYTES + 1 - len(json.dumps({"pad": ""}))
    (ckpt / "train.json").write_text(json.dumps({"pad": "x" * pad}))
    assert (ckpt / "train.json").stat().st_size == MAX_TRAIN_JSON_BYTES + 1
    with pytest.raises(StorageError) as err:
        read_meta(ckpt)
    assert (
        str(err.value) == f"{ckpt / 'train.json'}: larger than {MAX_TRAIN_JSON_BYTES:,} bytes; refused unread"
    )


def test_a_train_json_at_the_bound_and_a_missing_one_are_read(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert read_meta(ckpt) == {}
    pad = MAX_TRAIN_JSON_BYTES - len(json.dumps({"pad": ""}))
    (ckpt / "train.json").write_text(json.dumps({"pad": "x" * pad}))
    assert len(read_meta(ckpt)["pad"]) == pad
