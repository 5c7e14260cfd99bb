"""Synthetic logs with a growing catalogue (new items every day) and dense / hashed / string ids."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.data.synth_logs import LogConfig, write_logs

FROZEN = LogConfig(
    num_users=200,
    num_items=300,
    num_days=3,
    num_events=6000,
    seed=11,
    num_themes=10,
    rows_per_part=1500,
    duplicate_prob=0.01,
    bad_fraction=0.01,
)
GROWING = LogConfig(
    num_users=300,
    num_items=400,
    num_days=6,
    num_events=30_000,
    seed=3,
    num_themes=10,
    rows_per_part=2500,
    new_items_per_day=20,
)


def _write(cfg: LogConfig, out: Path) -> tuple[dict[str, pa.Table], dict]:
    summary = write_logs(cfg, out, progress=False)
    days = {p.name[5:]: pq.read_table(p) for p in sorted(out.glob("date=*"))}
    return days, summary


def _files(out: Path) -> dict[str, pa.Table]:
    return {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.glob("date=*/*.parquet"))}


def _intro_day(cfg: LogConfig, items: np.ndarray) -> np.ndarray:
    return np.where(
        items <= cfg.num_items, 0, 1 + (items - cfg.num_items - 1) // max(cfg.new_items_per_day, 1)
    )


@pytest.fixture(scope="module")
def growing(tmp_path_factory):
    out = tmp_path_factory.mktemp("growing")
    return (*_write(GROWING, out), out)


def test_frozen_catalogue_is_the_default_and_ignores_the_new_item_knobs(tmp_path):
    explicit = replace(FROZEN, new_items_per_day=0, new_item_share=0.5, new_item_days=1)
    days, summary = _write(FROZEN, tmp_path / "a")
    write_logs(explicit, tmp_path / "b", progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 6 and a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)
    items = np.concatenate([t["item_id"].to_numpy() for t in days.values()])
    valid = items[(items > 0) & (items <= FROZEN.num_items)]
    assert len(valid) > 0.98 * len(items)  # the rest are the planted zero / out-of-catalogue rows
    assert np.unique(valid).size > 0.9 * FROZEN.num_items
    assert summary["num_items"] == FROZEN.num_items and set(summary["new_items"].values()) == {0}


def test_items_never_appear_before_their_introduction_day(growing):
    days, _, _ = growing
    for d, table in enumerate(days.values()):
        items = table["item_id"].to_numpy()
        assert items.min() >= 1 and items.max() <= GROWING.num_items + d * GROWING.new_items_per_day
        assert (_intro_day(GROWING, items) <= d).all()
        if d:  # every item introduced today is seen today
            new = (
                GROWING.num_items
                + (d - 1) * GROWING.new_items_per_day
                + 1
                + np.arange(GROWING.new_items_per_day)
            )
            assert np.isin(new, items).all()


def test_new_items_are_popular_while_new(growing):
    days, _, _ = growing
    tables = list(days.values())
    # share of day d's events on the items introduced on day 1
    share = [(_intro_day(GROWING, t["item_id"].to_numpy()) == 1).mean() for t in tables]
    assert share[0] == 0
    assert 0.03 < share[1] < 0.2  # about new_item_share (the only new items on day 1)
    assert (
        share[1] > 2 * share[3] and share[1] > 5 * share[4]
    )  # fades with age, back to the Zipf tail by day 4
    # all new items together take about new_item_share of every later day's events
    for d, t in enumerate(tables[1:], 1):
        recent = _intro_day(GROWING, t["item_id"].to_numpy())
        assert 0.07 < (recent > max(0, d - GROWING.new_item_days)).mean() < 0.2


def test_logs_json_counts_the_whole_catalogue(growing):
    days, summary, out = growing
    meta = json.loads((out / "_logs.json").read_text())
    assert meta == json.loads(json.dumps(summary))
    k = GROWING.new_items_per_day
    assert meta["num_items"] == GROWING.num_items + (GROWING.num_days - 1) * k == 500
    assert meta["initial_items"] == GROWING.num_items
    assert list(meta["new_items"].values()) == [0] + [k] * (GROWING.num_days - 1)
    assert list(meta["new_items"]) == list(days)
    assert meta["item_ids"] == meta["user_ids"] == "dense"
    assert all(v["new_items"] == meta["new_items"][d] for d, v in meta["days"].items())


def _id_pairs(dense: dict[str, pa.Table], other: dict[str, pa.Table], col: str) -> tuple[np.ndarray, list]:
    a = np.concatenate([t[col].to_numpy(zero_copy_only=False) for t in dense.values()])
    b = sum((t[col].to_pylist() for t in other.values()), [])
    return a, b


def test_hashed_ids_are_a_fixed_distinct_wide_map_of_the_dense_ids(tmp_path):
    cfg = replace(GROWING, num_events=6000, bad_fraction=0.02, duplicate_prob=0.01)
    write_logs(cfg, tmp_path / "d", progress=False)
    dense = _files(tmp_path / "d")
    hashed_cfg = replace(cfg, item_ids="hashed", user_ids="hashed")
    summary = write_logs(hashed_cfg, tmp_path / "h", progress=False)
    hashed = _files(tmp_path / "h")
    assert summary["item_ids"] == summary["user_ids"] == "hashed" and summary["num_items"] == cfg.total_items
    assert all(t.schema.field("item_id").type == pa.int64() for t in hashed.values())
    for col, n in (("item_id", cfg.total_items), ("user_id", cfg.num_users)):
        a, b = _id_pairs(dense, hashed, col)
        valid = (a >= 1) & (a <= n) if col == "item_id" else a >= 0
        b_valid = np.array([x for x, ok in zip(b, valid) if ok], dtype=np.int64)
        # planted negative / zero / out-of-catalogue ids become nulls; everything else keeps a hashed id
        assert all(x is None for x, ok in zip(b, valid) if not ok)
        pairs = np.unique(np.c_[a[valid], b_valid], axis=0)
        assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))  # a bijection
        assert (b_valid < 0).any() and (np.abs(b_valid.astype(np.float64)) > 2.0**62).any()
        assert (b_valid != 0).all()
    # the same rows otherwise, null timestamps included
    for k in dense:
        assert dense[k]["timestamp"].equals(hashed[k]["timestamp"])
    # deterministic by seed
    write_logs(hashed_cfg, tmp_path / "h2", progress=False)
    assert all(t.equals(_files(tmp_path / "h2")[k]) for k, t in hashed.items())
    write_logs(replace(hashed_cfg, seed=4), tmp_path / "h3", progress=False)
    other = np.concatenate([t["item_id"].drop_null().to_numpy() for t in _files(tmp_path / "h3").values()])
    assert not np.isin(
        other, np.concatenate([t["item_id"].drop_null().to_numpy() for t in hashed.values()])
    ).any()


def test_string_ids_are_prefixed_hex_of_the_hashed_ids(tmp_path):
    cfg = replace(GROWING, num_events=4000, bad_fraction=0.02, item_ids="hashed", user_ids="hashed")
    write_logs(cfg, tmp_path / "h", progress=False)
    summary = write_logs(replace(cfg, item_ids="string", user_ids="string"), tmp_path / "s", progress=False)
    hashed, strings = _files(tmp_path / "h"), _files(tmp_path / "s")
    assert summary["item_ids"] == summary["user_ids"] == "string"
    for k in hashed:
        assert strings[k].schema.field("item_id").type == pa.string()
        assert strings[k].schema.field("user_id").type == pa.string()
        for col, prefix in (("item_id", "i"), ("user_id", "u")):
            want = [
                None if x is None else f"{prefix}{x & (2**64 - 1):016x}" for x in hashed[k][col].to_pylist()
            ]
            got = strings[k][col].to_pylist()
            assert got == want
            assert all(re.fullmatch(prefix + "[0-9a-f]{16}", s) for s in got if s is not None)
            assert strings[k][col].null_count > 0  # planted null ids
        assert strings[k]["timestamp"].equals(hashed[k]["timestamp"])


def test_bad_rows_for_dense_ids_keep_every_kind(tmp_path):
    cfg = replace(GROWING, num_events=6000, bad_fraction=0.03)
    days, _ = _write(cfg, tmp_path / "d")
    t = pa.concat_tables(days.values())
    users, items = t["user_id"].fill_null(0).to_numpy(), t["item_id"].to_numpy()
    ts = t["timestamp"].fill_null(0).to_numpy()
    assert t["user_id"].null_count and t["timestamp"].null_count and t["item_id"].null_count == 0
    assert (users < 0).any() and (items == 0).any() and (items > cfg.total_items).any() and (ts > 4e9).any()


def test_cli_flags(tmp_path):
    base = ["data", "synth-logs", "--users", "100", "--items", "300", "--days", "3", "--events", "3000"]
    assert main([*base, "--out", str(tmp_path / "a"), "--item-ids", "hashed", "--user-ids", "string"]) == 0
    meta = json.loads((tmp_path / "a" / "_logs.json").read_text())
    assert meta["config"]["new_items_per_day"] == 3 and meta["num_items"] == 306  # default: items // 100
    assert (meta["item_ids"], meta["user_ids"]) == ("hashed", "string")
    t = pq.read_table(tmp_path / "a" / "date=2024-01-03" / "part-00000.parquet")
    assert t.schema.field("item_id").type == pa.int64() and t.schema.field("user_id").type == pa.string()
    args = ["--new-items-per-day", "0", "--new-item-share", "0.3", "--new-item-days", "2"]
    assert main([*base, "--out", str(tmp_path / "b"), *args]) == 0
    meta = json.loads((tmp_path / "b" / "_logs.json").read_text())
    assert meta["num_items"] == 300 and (
        meta["config"]["new_item_share"],
        meta["config"]["new_item_days"],
    ) == (0.3, 2)
    assert (
        main([*base, "--out", str(tmp_path / "c"), "--new-items-per-day", "7", "--new-item-days", "1"]) == 0
    )
    meta = json.loads((tmp_path / "c" / "_logs.json").read_text())
    assert meta["num_items"] == 314 and meta["new_items"] == {
        "2024-01-01": 0,
        "2024-01-02": 7,
        "2024-01-03": 7,
    }
    t = pq.read_table(tmp_path / "c" / "date=2024-01-02")
    assert t["item_id"].to_numpy().max() <= 307
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "d"), "--item-ids", "uuid"])
