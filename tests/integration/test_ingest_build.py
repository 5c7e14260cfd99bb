"""Raw logs -> sequence shards: validation + quarantine, exact sequences, incremental append, the CLI.

One local Ray instance for the module (the build runs its two stages as Ray Data map tasks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.data.build import (
    BuildConfig,
    append_day,
    build_sequences,
    group_events,
    partition_of,
    read_manifest,
)
from pipeline.data.ingest import IngestRules, check_log_schema
from pipeline.data.readers import prepare_sequences
from pipeline.data.sequences import read_sequences
from pipeline.data.synth_logs import LogConfig, write_logs

T = 1_704_067_200  # 2024-01-01 00:00 UTC
DAY = 86_400


pytestmark = pytest.mark.usefixtures("ray_local")  # tests/conftest.py


def write_day(logs: Path, date: str, rows: list[tuple], part: int = 0, types: dict | None = None) -> Path:
    """rows of (user_id, item_id, timestamp); None is a null."""
    folder = logs / f"date={date}"
    folder.mkdir(parents=True, exist_ok=True)
    u, i, t = zip(*rows)
    types = types or {}
    table = pa.table(
        {
            "user_id": pa.array(u, types.get("user_id", pa.int64())),
            "item_id": pa.array(i, types.get("item_id", pa.int64())),
            "timestamp": pa.array(t, types.get("timestamp", pa.int64())),
            "event_type": pa.array([0] * len(rows), pa.int8()),
        }
    )
    path = folder / f"part-{part:05d}.parquet"
    pq.write_table(table, path)
    return path


def shard_table(seqdir: Path) -> pa.Table:
    return read_sequences(seqdir).table.sort_by("user_id")


# ------------------------------------------------------------------------------------------------------------
# hand-written events: order, ties, dedup, truncation

DAY1 = [  # not grouped by user, not sorted
    (1, 10, T + 100),
    (2, 3, T + 10),
    (1, 5, T + 100),  # user 1: tie at T+100 -> file order, 10 before 5 (not sorted by item)
    (1, 8, T + 50),
    (1, 7, T + 50),  # same time, other item: kept, after 8 (file order)
    (1, 8, T + 50),  # exact duplicate, not adjacent to its first copy: kept once
    (3, 31, T + 1),
    (3, 32, T + 2),
    (3, 33, T + 3),
    (3, 34, T + 4),
    (3, 35, T + 5),
    (3, 36, T + 6),
    (2, 4, T + 20),
]
DAY2 = [
    (1, 9, T + DAY + 5),
    (2, 2, T + 15),  # arrives late (day-1 time in the day-2 file): ordered by time
    (1, 7, T + 50),  # a duplicate of a day-1 event: still kept once (the day-1 copy)
    (3, 37, T + DAY + 1),
    (4, 40, T + DAY + 9),
]
MAX_LEN = 4
EXPECTED = [  # (user, items, timestamps) after both days with max_length 4
    (1, [7, 10, 5, 9], [T + 50, T + 100, T + 100, T + DAY + 5]),  # 8 is the oldest of 5: truncated away
    (2, [3, 2, 4], [T + 10, T + 15, T + 20]),
    (3, [34, 35, 36, 37], [T + 4, T + 5, T + 6, T + DAY + 1]),
    (4, [40], [T + DAY + 9]),
]


def test_group_events_order_ties_dedup_truncation():
    events = pa.table({c: list(v) for c, v in zip(("user_id", "item_id", "timestamp"), zip(*(DAY1 + DAY2)))})
    seq, counts = group_events(events, MAX_LEN)
    assert [(r["user_id"], r["item_ids"], r["timestamps"]) for r in seq.to_pylist()] == EXPECTED
    assert counts == {"events": 18, "duplicates": 2, "truncated": 4}  # user 1's 8; user 3's 31, 32, 33
    untruncated, _ = group_events(events, 100)
    assert untruncated.to_pylist()[0]["item_ids"] == [8, 7, 10, 5, 9]


# ties in time: a user's events at one timestamp keep the logs' order, (day, part file, row), in both the
# Ray build and the single-file readers; a sort by item would give user 1 [10, 15, 20, 25, 30]
TIE_FILES = {  # (date, part) -> rows
    ("2024-01-01", 0): [(1, 30, T + 5), (2, 9, T + 7), (1, 20, T + 5), (1, 10, T + 5)],
    ("2024-01-01", 1): [(1, 25, T + 5), (2, 3, T + 7), (1, 20, T + 5)],  # 20 repeats part 0's: kept once
    ("2024-01-02", 0): [(1, 15, T + 5), (2, 1, T + 7)],  # late events with a day-1 time: after day 1's
}
TIE_EXPECTED = [(1, [30, 20, 10, 25, 15]), (2, [9, 3, 1])]


def test_ties_in_time_keep_the_file_order_in_the_build_and_the_readers(tmp_path):
    logs = tmp_path / "logs"
    for (date, part), rows in TIE_FILES.items():
        write_day(logs, date, rows, part=part)
    cfg = BuildConfig(max_length=10, num_partitions=2, rules=IngestRules(identity_ids=True))
    build_sequences(logs, tmp_path / "full", cfg, progress=False)
    built = shard_table(tmp_path / "full")
    assert [(r["user_id"], r["item_ids"]) for r in built.to_pylist()] == TIE_EXPECTED
    build_sequences(logs, tmp_path / "inc", cfg, dates=["2024-01-01"], progress=False)
    append_day(logs, "2024-01-02", tmp_path / "inc", progress=False)
    assert shard_table(tmp_path / "inc").equals(built)

    # the same rows as one file, in (day, part, row) order, through the readers: the same sequences
    rows = [r for key in sorted(TIE_FILES) for r in TIE_FILES[key]]
    flat = tmp_path / "flat"
    flat.mkdir()
    u, i, t = zip(*rows)
    pq.write_table(pa.table({"user_id": u, "item_id": i, "timestamp": t}), flat / "events.parquet")
    (flat / "u.data").write_text("".join(f"{a}\t{b}\t5\t{c}\n" for a, b, c in rows))
    for name in ("events.parquet", "u.data"):
        for identity in (True, False):  # with a vocabulary the rows of items 1..N are the ids themselves
            data, report = prepare_sequences(
                flat / name, tmp_path / f"{name}.{identity}.seq.parquet", min_length=1, identity_ids=identity
            )
            assert report.reasons["duplicate_event"] == 1
            table = data.table.sort_by("user_id").select(built.column_names)
            if identity:
                assert table.equals(built.cast(table.schema)), name
            else:  # vocabulary rows in ascending raw-id order: map them back
                raw = {row: raw for row, raw in enumerate([0, 1, 3, 9, 10, 15, 20, 25, 30])}
                got = [(r["user_id"], [raw[x] for x in r["item_ids"]]) for r in table.to_pylist()]
                assert got == TIE_EXPECTED, name


def test_full_build_and_append_give_the_exact_sequences(tmp_path):
    logs = tmp_path / "logs"
    write_day(logs, "2024-01-01", DAY1)
    write_day(logs, "2024-01-02", DAY2)
    # identity ids: the sequences hold the log's item ids themselves (the vocabulary:
    # tests/integration/test_vocab.py)
    rules = IngestRules(identity_ids=True)
    cfg = BuildConfig(max_length=MAX_LEN, num_partitions=3, row_group_rows=2, rules=rules)
    full = build_sequences(logs, tmp_path / "full", cfg, progress=False)
    assert (full.users, full.interactions, full.duplicates_dropped, full.truncated) == (4, 12, 2, 4)
    table = shard_table(tmp_path / "full")
    assert [(r["user_id"], r["item_ids"], r["timestamps"]) for r in table.to_pylist()] == EXPECTED

    build_sequences(logs, tmp_path / "inc", cfg, dates=["2024-01-01"], progress=False)
    append_day(logs, "2024-01-02", tmp_path / "inc", progress=False)
    assert shard_table(tmp_path / "inc").equals(table)
    data = read_sequences(tmp_path / "inc")
    assert data.num_items == 41  # no catalogue configured: max item id + 1
    # each user lives in exactly one partition, the one its hash names
    manifest = read_manifest(tmp_path / "inc")
    for shard in manifest["shards"]:
        users = pq.read_table(tmp_path / "inc" / shard["file"])["user_id"].to_numpy()
        assert (partition_of(users, 3) == shard["partition"]).all() and (np.diff(users) > 0).all()
    assert sum(rg[0] for s in manifest["shards"] for rg in s["row_groups"]) == 4


# ------------------------------------------------------------------------------------------------------------
# validation and quarantine

BAD = [  # (user, item, timestamp, expected reason, field, value)
    (None, 5, T + 1, "missing_user_id", "user_id", None),
    (-3, 5, T + 2, "negative_user_id", "user_id", "-3"),
    (7, None, T + 3, "missing_item_id", "item_id", None),
    (7, -1, T + 4, "negative_item_id", "item_id", "-1"),
    (7, 0, T + 5, "zero_item_id", "item_id", "0"),
    (7, 101, T + 6, "out_of_catalogue_item_id", "item_id", "101"),
    (7, 6, None, "missing_timestamp", "timestamp", None),
    (7, 6, (T + 7) * 1000, "absurd_timestamp", "timestamp", str((T + 7) * 1000)),  # milliseconds
    (7, 6, -5, "absurd_timestamp", "timestamp", "-5"),
    (None, 0, None, "missing_user_id", "user_id", None),  # several problems: the first check names it
]


def test_every_bad_row_is_quarantined_with_its_reason(tmp_path):
    logs = tmp_path / "logs"
    good = [(1, 5, T + 1), (1, 100, T + 2), (2, 6, T + 3)]
    rows = []
    for k, bad in enumerate(BAD):  # interleave good and bad rows
        rows.append(bad[:3])
        if k < len(good):
            rows.append(good[k])
    write_day(logs, "2024-01-01", rows)
    cfg = BuildConfig(max_length=10, num_partitions=2, rules=IngestRules(num_items=100, identity_ids=True))
    report = build_sequences(logs, tmp_path / "seq", cfg, progress=False)
    assert (report.ingest.rows_read, report.ingest.rows_kept, report.ingest.rows_quarantined) == (13, 3, 10)
    expected_counts: dict[str, int] = {}
    for b in BAD:
        expected_counts[b[3]] = expected_counts.get(b[3], 0) + 1
    assert report.ingest.reasons == expected_counts

    # named by the generation that committed it, and listed in that day's report in the manifest
    qname = "quarantine/date=2024-01-01/part-00000.g000001.quarantine.parquet"
    assert read_manifest(tmp_path / "seq")["days"]["2024-01-01"]["report"]["quarantine_files"] == [qname]
    qfile = tmp_path / "seq" / qname
    q = pq.read_table(qfile).to_pylist()
    assert [(r["reason"], r["field"], r["value"]) for r in q] == [(b[3], b[4], b[5]) for b in BAD]
    bad_positions = [k for k, r in enumerate(rows, start=1) if r in [b[:3] for b in BAD]]
    assert [r["row_number"] for r in q] == bad_positions
    assert {r["source"] for r in q} == {"date=2024-01-01/part-00000.parquet"}
    assert q[0]["raw"] == f"user_id=null, item_id=5, timestamp={T + 1}, event_type=0"
    day = read_manifest(tmp_path / "seq")["days"]["2024-01-01"]["report"]
    assert day["rows_quarantined"] == 10 and day["reasons"] == dict(sorted(expected_counts.items()))
    data = read_sequences(tmp_path / "seq")
    assert data.num_items == 101 and data.num_interactions == 3  # catalogue 1..100 -> 101 table rows


def test_quarantine_is_published_by_the_commit_that_names_it(tmp_path):
    logs = tmp_path / "logs"
    write_day(logs, "2024-01-01", [(1, 5, T + 1), (1, 6, T + 2), (2, 6, T + 3), (7, -1, T + 4)])
    cfg = BuildConfig(max_length=10, num_partitions=2, rules=IngestRules(num_items=100, identity_ids=True))
    build_sequences(logs, tmp_path / "seq", cfg, progress=False)
    qdir = tmp_path / "seq" / "quarantine" / "date=2024-01-01"
    assert [p.name for p in qdir.iterdir()] == ["part-00000.g000001.quarantine.parquet"]
    # a build killed before its commit leaves its quarantine unnamed by the manifest; the next commit
    # (here a rebuild, generation 2) names its own file and removes both older ones
    (qdir / "part-00000.g000002.quarantine.parquet").write_bytes(b"cut off")
    build_sequences(logs, tmp_path / "seq", cfg, progress=False)
    day = read_manifest(tmp_path / "seq")["days"]["2024-01-01"]["report"]
    assert day["quarantine_files"] == ["quarantine/date=2024-01-01/part-00000.g000002.quarantine.parquet"]
    assert [p.name for p in qdir.iterdir()] == ["part-00000.g000002.quarantine.parquet"]
    assert pq.read_table(qdir / "part-00000.g000002.quarantine.parquet").column("reason").to_pylist() == [
        "negative_item_id"
    ]


def test_schema_errors_name_the_file_and_the_column(tmp_path):
    logs = tmp_path / "logs"
    path = write_day(logs, "2024-01-01", [(1, 2, T)])
    pq.write_table(pa.table({"user_id": [1], "item_id": ["x"], "timestamp": [T]}), path)
    identity = BuildConfig(rules=IngestRules(identity_ids=True))
    with pytest.raises(
        ValueError, match=r"part-00000\.parquet: column 'item_id' has type string, expected int"
    ):
        build_sequences(logs, tmp_path / "seq", identity, progress=False)
    pq.write_table(pa.table({"user_id": [1], "item_id": [2.5], "timestamp": [T]}), path)
    with pytest.raises(ValueError, match=r"column 'item_id' has type double, expected integers or strings"):
        build_sequences(logs, tmp_path / "seq", progress=False)
    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), path)
    with pytest.raises(ValueError, match=r"part-00000\.parquet: missing column\(s\) \['timestamp'\]"):
        check_log_schema(path)


# ------------------------------------------------------------------------------------------------------------
# synthetic logs, incremental append, idempotency

SMALL = LogConfig(
    num_users=400,
    num_items=3000,
    num_days=4,
    num_events=24_000,
    seed=5,
    num_themes=20,
    rows_per_part=2_500,
    duplicate_prob=0.01,
    bad_fraction=0.003,
)
DATES = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]


@pytest.fixture(scope="module")
def small_logs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logs")
    write_logs(SMALL, out, progress=False)
    return out


def test_synth_logs_are_deterministic_time_ordered_and_long_tailed(small_logs, tmp_path):
    write_logs(SMALL, tmp_path / "again", progress=False)
    other = LogConfig(**{**SMALL.__dict__, "seed": 6})
    write_logs(other, tmp_path / "other", progress=False)
    parts = sorted(p.relative_to(small_logs) for p in small_logs.glob("date=*/*.parquet"))
    assert len(parts) == 12 and [p.parent.name for p in parts[::3]] == [f"date={d}" for d in DATES]
    total, users = 0, []
    for rel in parts:
        a, b = pq.read_table(small_logs / rel), pq.read_table(tmp_path / "again" / rel)
        assert a.equals(b)
        assert not a.equals(pq.read_table(tmp_path / "other" / rel))
        ts = a["timestamp"].to_numpy(zero_copy_only=False)
        valid = ts[(ts > 0) & (ts < 4e9)]
        assert (np.diff(valid) >= 0).all()  # time-ordered (planted ms timestamps aside)
        day0 = T + DATES.index(rel.parent.name[5:]) * DAY
        assert ((valid >= day0) & (valid < day0 + DAY)).all()
        total += a.num_rows
        users.append(a["user_id"].fill_null(-1).to_numpy())
    assert total == SMALL.num_events
    u = np.concatenate(users)
    assert (u[1:] != u[:-1]).mean() > 0.9  # interleaved, not grouped by user
    counts = np.bincount(u[u >= 0])
    counts = counts[counts > 0]
    assert 50 <= counts.mean() <= 70 and counts.max() > 5 * counts.mean()  # mean ~ 24000/400 = 60, long tail


def test_appending_day_by_day_equals_a_full_rebuild(small_logs, tmp_path):
    cfg = BuildConfig(max_length=30, num_partitions=3, row_group_rows=32)
    full = build_sequences(small_logs, tmp_path / "full", cfg, progress=False)
    build_sequences(small_logs, tmp_path / "inc", cfg, dates=DATES[:2], progress=False)
    for d in DATES[2:]:
        append_day(small_logs, d, tmp_path / "inc", progress=False)
    assert full.truncated > 0 and full.duplicates_dropped > 0 and full.ingest.rows_quarantined > 0
    assert shard_table(tmp_path / "inc").equals(shard_table(tmp_path / "full"))
    a, b = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "inc")
    assert (a["num_items"], a["users"], a["interactions"]) == (b["num_items"], b["users"], b["interactions"])
    same = {k: v for k, v in a["vocab"].items() if k != "file"}  # the file name carries the generation
    assert same == {k: v for k, v in b["vocab"].items() if k != "file"}
    assert a["num_items"] == a["vocab"]["rows"] + 1  # rows from the vocabulary
    assert pq.read_table(tmp_path / "full" / a["vocab"]["file"]).equals(
        pq.read_table(tmp_path / "inc" / b["vocab"]["file"])
    )

    def reports(manifest: dict) -> dict:  # quarantine file names carry the generation that wrote them
        strip = lambda q: re.sub(r"\.g\d{6}\.", ".", q)  # noqa: E731
        return {
            d: dict(v["report"], quarantine_files=[strip(q) for q in v["report"]["quarantine_files"]])
            for d, v in manifest["days"].items()
        }

    assert reports(a) == reports(b)
    assert [s["row_groups"] for s in a["shards"]] == [s["row_groups"] for s in b["shards"]]
    assert [h["op"] for h in b["history"]] == ["build", "append", "append"]
    assert sorted(p.name for p in (tmp_path / "inc").glob("part-*")) == [s["file"] for s in b["shards"]]


def test_reappending_a_day_is_a_no_op_and_changed_days_are_refused(small_logs, tmp_path):
    seq = tmp_path / "seq"
    cfg = BuildConfig(max_length=30, num_partitions=2)
    build_sequences(small_logs, seq, cfg, dates=DATES[:3], progress=False)
    append_day(small_logs, DATES[3], seq, progress=False)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in seq.glob("*") if p.is_file()}
    again = append_day(small_logs, DATES[3], seq, progress=False)
    assert again.days == [] and again.skipped_days == [DATES[3]] and "already applied" in again.summary()
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in seq.glob("*") if p.is_file()} == before
    assert append_day(small_logs, DATES[0], seq, progress=False).days == []  # a day of the initial build too

    changed = tmp_path / "changed"
    for p in small_logs.rglob("*"):
        if p.is_file():
            (changed / p.relative_to(small_logs)).parent.mkdir(parents=True, exist_ok=True)
            (changed / p.relative_to(small_logs)).write_bytes(p.read_bytes())
    part = changed / f"date={DATES[3]}" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).slice(1), part)
    with pytest.raises(ValueError, match="already applied from different files"):
        append_day(changed, DATES[3], seq, progress=False)


# ------------------------------------------------------------------------------------------------------------
# the CLI contract


def test_cli_synth_build_append_stats_and_train(tmp_path, capsys):
    logs, seq = tmp_path / "logs", tmp_path / "seq"
    assert (
        main(
            [
                "data",
                "synth-logs",
                "--out",
                str(logs),
                "--users",
                "150",
                "--items",
                "400",
                "--days",
                "3",
                "--events",
                "6000",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "build-sequences",
                "--logs",
                str(logs),
                "--out",
                str(seq),
                "--max-length",
                "50",
                "--partitions",
                "2",
                "--dates",
                "2024-01-01,2024-01-02",
            ]
        )
        == 0
    )
    assert (
        main(["data", "append-day", "--logs", str(logs), "--date", "2024-01-03", "--sequences", str(seq)])
        == 0
    )
    assert (
        main(["data", "append-day", "--logs", str(logs), "--date", "2024-01-03", "--sequences", str(seq)])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote") and "6,000 events over 3 days" in out[0]
    assert (
        "4,000 rows read" in out[1]
        and "0 quarantined" in out[1]
        and "sequences written to 2 shards" in out[1]
    )
    assert "append 2024-01-03: 1 files, 2,000 rows read" in out[2]
    assert "already applied; nothing to do" in out[3]
    assert main(["data", "stats", str(seq)]) == 0
    stats = json.loads(capsys.readouterr().out)
    manifest = read_manifest(seq)
    # the items seen (400 at start + 4 new a day by default), at most the catalogue
    assert stats["num_items"] == manifest["vocab"]["rows"] + 1 <= 400 + 2 * 4 + 1
    assert stats["interactions"] == manifest["interactions"]
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                str(seq),
                "--set",
                "epochs=1",
                "--set",
                "tracking.enabled=false",
                "--set",
                f"output_dir={tmp_path / 'runs'}",
                "--report-json",
                str(report),
            ]
        )
        == 0
    )
    in_memory = json.loads(report.read_text())
    assert in_memory["test"]["num_users"] > 100
    # the same training, its train split streamed shard by shard (pipeline/data/stream.py), sees the
    # same users
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                str(seq),
                "--set",
                "epochs=1",
                "--set",
                "tracking.enabled=false",
                "--set",
                "data.stream=true",
                "--set",
                "data.stream_backend=pyarrow",
                "--set",
                f"output_dir={tmp_path / 'runs'}",
                "--report-json",
                str(report),
            ]
        )
        == 0
    )
    streamed = json.loads(report.read_text())
    assert streamed["users"]["train"] == in_memory["users"]["train"]
    assert streamed["steps"] == in_memory["steps"] > 0
    assert streamed["test"]["num_users"] == in_memory["test"]["num_users"]
