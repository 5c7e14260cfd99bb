"""The item vocabulary: raw 64-bit and string ids -> rows 1..N, append-only across days, admission by count.

Builds go through the real Ray Data path (one local Ray for the module, tests/conftest.py).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.data.build import BuildConfig, append_day, build_sequences, read_manifest
from pipeline.data.ingest import IngestRules
from pipeline.data.readers import prepare_sequences
from pipeline.data.sequences import read_sequences
from pipeline.data.vocab import Vocabulary, find_vocabulary, read_vocabulary

T = 1_704_067_200  # 2024-01-01 00:00 UTC
DAY = 86_400
BIG = 2**62
NEG = -7_046_029_254_386_353_131  # a negative 64-bit hash

pytestmark = pytest.mark.usefixtures("ray_local")


INT = pa.int64()


def write_day(logs, date, rows, types=None, item_type=INT, user_type=INT):
    """rows of (user_id, item_id, timestamp[, event_type]); None is a null."""
    folder = logs / f"date={date}"
    folder.mkdir(parents=True, exist_ok=True)
    cols = list(zip(*rows))
    table = {
        "user_id": pa.array(cols[0], user_type),
        "item_id": pa.array(cols[1], item_type),
        "timestamp": pa.array(cols[2], pa.int64()),
    }
    if len(cols) > 3:
        table["event_type"] = pa.array(cols[3], types or pa.string())
    path = folder / "part-00000.parquet"
    pq.write_table(pa.table(table), path)
    return path


def raw_sequences(seqdir):
    """Every user's items as raw ids (through the directory's vocabulary), by user."""
    data = read_sequences(seqdir)
    vocab = read_vocabulary(data.vocab)
    return {r["user_id"]: vocab.raw_ids(r["item_ids"]) for r in data.table.to_pylist()}


def test_huge_negative_and_string_ids_build_with_rows_from_the_vocabulary(tmp_path):
    logs = tmp_path / "logs"
    write_day(logs, "2024-01-01", [(BIG, BIG, T + 1), (BIG, NEG, T + 2), (-1, 0, T + 3), (-1, BIG, T + 4)])
    cfg = BuildConfig(max_length=10, num_partitions=2)
    report = build_sequences(logs, tmp_path / "seq", cfg, progress=False)
    data = read_sequences(tmp_path / "seq")
    assert report.num_items == data.num_items == 4  # 3 distinct items + padding, not 2^62 + 1
    assert raw_sequences(tmp_path / "seq") == {BIG: [BIG, NEG], -1: [0, BIG]}  # 0 and -1 are ordinary ids
    vocab = read_vocabulary(find_vocabulary(tmp_path / "seq"))
    assert vocab.raw_ids([1, 2, 3]) == [NEG, 0, BIG]  # rows in ascending raw-id order
    assert sorted(i for r in data.table.to_pylist() for i in r["item_ids"]) == [1, 2, 3, 3]

    strings = tmp_path / "slogs"
    rows = [("ann", "tt0111", T + 1), ("ann", "tt0042", T + 2), ("bob", "tt0111", T + 3), ("bob", "x", T + 4)]
    write_day(strings, "2024-01-01", rows, item_type=pa.string(), user_type=pa.string())
    build_sequences(strings, tmp_path / "sseq", cfg, progress=False)
    assert raw_sequences(tmp_path / "sseq") == {"ann": ["tt0111", "tt0042"], "bob": ["tt0111", "x"]}
    manifest = read_manifest(tmp_path / "sseq")
    assert manifest["vocab"]["key_type"] == "string" and manifest["user_key"] == "string"
    assert manifest["num_items"] == 4


def test_vocabulary_is_append_only_and_append_equals_rebuild(tmp_path):
    logs = tmp_path / "logs"
    days = {
        "2024-01-01": [(1, 50, T + 1), (1, BIG, T + 2), (2, 50, T + 3)],
        "2024-01-02": [(1, NEG, T + DAY + 1), (2, 7, T + DAY + 2), (3, 50, T + DAY + 3)],
        "2024-01-03": [(3, 7, T + 2 * DAY + 1), (3, 10**15, T + 2 * DAY + 2), (2, -3, T + 2 * DAY + 3)],
    }
    for d, rows in days.items():
        write_day(logs, d, rows)
    cfg = BuildConfig(max_length=10, num_partitions=2)
    build_sequences(logs, tmp_path / "inc", cfg, dates=["2024-01-01"], progress=False)
    seen: dict[int, int] = {}
    for d in ["2024-01-01", "2024-01-02", "2024-01-03"]:
        if d != "2024-01-01":
            report = append_day(logs, d, tmp_path / "inc", progress=False)
            assert report.new_items == len({r[1] for r in days[d]} - set(seen))
        vocab = read_vocabulary(find_vocabulary(tmp_path / "inc"))
        pairs = {r["raw_id"]: r["row"] for r in vocab.table.to_pylist()}
        assert all(pairs[k] == v for k, v in seen.items())  # a row never changes meaning
        assert sorted(pairs.values()) == list(range(1, len(pairs) + 1))
        seen = pairs
    assert seen == {50: 1, BIG: 2, NEG: 3, 7: 4, -3: 5, 10**15: 6}  # by day, then ascending within a day
    full = build_sequences(logs, tmp_path / "full", cfg, progress=False)
    a, b = read_sequences(tmp_path / "inc"), read_sequences(tmp_path / "full")
    assert a.table.sort_by("user_id").equals(b.table.sort_by("user_id"))
    assert read_vocabulary(a.vocab).table.equals(read_vocabulary(b.vocab).table)
    assert full.num_items == 7 and not list((tmp_path / "inc").glob("vocab-g000001*"))  # old one removed


def test_min_count_admission_counts_reconcile(tmp_path):
    logs = tmp_path / "logs"
    # item 9 reaches min_count=2 only on day 2; item 8 never does; item 5 on day 1
    write_day(logs, "2024-01-01", [(1, 5, T + 1), (2, 5, T + 2), (1, 9, T + 3), (2, 8, T + 4), (None, 5, T)])
    write_day(logs, "2024-01-02", [(1, 9, T + DAY + 1), (2, 5, T + DAY + 2), (3, 9, T + DAY + 3)])
    cfg = BuildConfig(max_length=10, num_partitions=2, min_count=2)
    r1 = build_sequences(logs, tmp_path / "seq", cfg, dates=["2024-01-01"], progress=False)
    r2 = append_day(logs, "2024-01-02", tmp_path / "seq", progress=False)
    for r, read, kept, quarantined, below in ((r1, 5, 2, 1, 2), (r2, 3, 3, 0, 0)):
        i = r.ingest
        assert (i.rows_read, i.rows_kept, i.rows_quarantined, i.below_admission) == (
            read,
            kept,
            quarantined,
            below,
        )
        assert i.rows_read == i.rows_kept + i.rows_quarantined + i.below_admission + i.filtered_event_type
    vocab = read_vocabulary(find_vocabulary(tmp_path / "seq"))
    table = {r["raw_id"]: r for r in vocab.table.to_pylist()}
    assert table[5]["row"] == 1 and table[5]["admitted_day"] == "2024-01-01"
    assert table[9]["row"] == 2 and table[9]["admitted_day"] == "2024-01-02" and table[9]["count"] == 3
    assert table[8]["row"] is None and table[8]["count"] == 1  # pending: counted, not lost
    # item 9's day-1 event is not in the sequences (before its admission); its day-2 events are
    assert raw_sequences(tmp_path / "seq") == {1: [5, 9], 2: [5, 5], 3: [9]}
    full = build_sequences(logs, tmp_path / "full", cfg, progress=False)
    assert full.ingest.below_admission == 2 and read_sequences(tmp_path / "full").table.sort_by(
        "user_id"
    ).equals(read_sequences(tmp_path / "seq").table.sort_by("user_id"))


def test_null_ids_quarantined_mixed_key_types_refused_event_types_filtered(tmp_path):
    logs = tmp_path / "logs"
    rows = [
        ("u1", "a", T + 1, "play"),
        (None, "a", T + 2, "play"),
        ("u1", None, T + 3, "like"),
        ("u1", " ", T + 4, "like"),  # blank text is a missing id
        ("u2", "b", T + 5, "view"),  # not a positive interaction
        ("u2", "a", T + 6, None),
        ("u2", "c", T + 7, "collect"),
    ]
    write_day(logs, "2024-01-01", rows, item_type=pa.string(), user_type=pa.string())
    rules = IngestRules(event_types=("collect", "like", "play"))
    r = build_sequences(logs, tmp_path / "seq", BuildConfig(num_partitions=2, rules=rules), progress=False)
    i = r.ingest
    assert i.reasons == {"missing_user_id": 1, "missing_item_id": 2, "missing_event_type": 1}
    assert (i.rows_read, i.rows_kept, i.rows_quarantined, i.filtered_event_type) == (7, 2, 4, 1)
    assert "1 of other event types" in r.summary()
    assert raw_sequences(tmp_path / "seq") == {"u1": ["a"], "u2": ["c"]}
    q = pq.read_table(
        tmp_path / "seq" / "quarantine" / "date=2024-01-01" / "part-00000.g000001.quarantine.parquet"
    )
    assert q.column("reason").to_pylist() == [
        "missing_user_id",
        "missing_item_id",
        "missing_item_id",
        "missing_event_type",
    ]
    write_day(logs, "2024-01-02", [("u3", 5, T + DAY, "play")], user_type=pa.string())  # integer item ids
    with pytest.raises(
        ValueError, match=r"date=2024-01-02/part-00000\.parquet: column 'item_id' holds int64"
    ):
        append_day(logs, "2024-01-02", tmp_path / "seq", progress=False)


def test_prepare_maps_raw_ids_and_cli_flags(tmp_path):
    events = pa.table(
        {
            "user_id": pa.array([BIG, BIG, BIG, -5, -5], pa.int64()),
            "item_id": pa.array([NEG, BIG, 3, BIG, NEG], pa.int64()),
            "timestamp": pa.array([T + 1, T + 2, T + 3, T + 4, T + 5], pa.int64()),
        }
    )
    pq.write_table(events, tmp_path / "events.parquet")
    data, report = prepare_sequences(tmp_path / "events.parquet", tmp_path / "seq.parquet", min_count=2)
    assert data.num_items == 3 and report.reasons == {"below_admission": 1}  # item 3 seen once
    assert find_vocabulary(tmp_path / "seq.parquet") == tmp_path / "seq.vocab.parquet" == data.vocab
    back = read_sequences(tmp_path / "seq.parquet")
    vocab = read_vocabulary(back.vocab)
    assert {r["user_id"]: vocab.raw_ids(r["item_ids"]) for r in back.table.to_pylist()} == {
        BIG: [NEG, BIG],
        -5: [BIG, NEG],
    }
    assert vocab.table.column("first_day").to_pylist()[:2] == ["2024-01-01", "2024-01-01"]
    assert vocab.lookup([BIG, NEG, 3, 12345]).tolist() == [2, 1, 0, 0]
    with pytest.raises(ValueError, match="row 3 is not an item row"):
        vocab.raw_ids([3])

    logs = tmp_path / "logs"
    write_day(logs, "2024-01-01", [(1, BIG, T + 1, "1"), (1, NEG, T + 2, "0"), (1, 4, T + 3, "2")])
    args = [
        "data",
        "build-sequences",
        "--logs",
        str(logs),
        "--out",
        str(tmp_path / "cli"),
        "--partitions",
        "2",
    ]
    assert main([*args, "--event-types", "1,2"]) == 0
    assert raw_sequences(tmp_path / "cli") == {1: [BIG, 4]}
    assert main([*args, "--num-items", "10"]) == 2


def test_vocabulary_extend_is_order_independent_within_a_day() -> None:
    import numpy as np

    a, _ = Vocabulary.empty("int64").extend(
        "d1", pa.array([9, 3, 5]), np.array([1, 1, 1]), np.array([3, 1, 2])
    )
    b, _ = Vocabulary.empty("int64").extend(
        "d1", pa.array([5, 9, 3]), np.array([1, 1, 1]), np.array([2, 3, 1])
    )
    assert a.table.equals(b.table) and a.raw_ids([1, 2, 3]) == [3, 5, 9]


def test_string_ids_build_train_and_return_raw_ids_in_top_k(tmp_path):
    """Logs keyed by strings (items and users) -> shards -> `fuxi train` -> a checkpoint that carries the
    vocabulary -> top-k in raw string ids; unknown ids in a request are dropped and counted."""
    import json

    import numpy as np

    from serving.loading import load_checkpoint_model

    rng = np.random.default_rng(0)
    logs = tmp_path / "logs"
    items = [f"sku-{k:04x}" for k in range(40)]
    for d in range(2):
        rows = [
            (f"user-{u}", items[(u + 3 * j + rng.integers(0, 3)) % 40], T + d * DAY + 60 * j + u)
            for u in range(30)
            for j in range(6)
        ]
        write_day(logs, f"2024-01-0{d + 1}", rows, item_type=pa.string(), user_type=pa.string())
    seq, report = tmp_path / "seq", tmp_path / "report.json"
    assert main(["data", "build-sequences", "--logs", str(logs), "--out", str(seq), "--partitions", "2"]) == 0
    args = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(seq),
        "--set",
        "epochs=1",
        "--set",
        "tracking.enabled=false",
    ]
    assert main([*args, "--set", f"output_dir={tmp_path / 'runs'}", "--report-json", str(report)]) == 0
    loaded = load_checkpoint_model(json.loads(report.read_text())["checkpoint"])
    assert loaded.vocab is not None and loaded.vocab.key_type == "string"
    ids, scores, ignored = loaded.top_k([["sku-0001", "sku-0004"], ["sku-0010", "no-such-item"]], k=5)
    assert all(len(u) == 5 and all(i in items for i in u) for u in ids) and ignored == [0, 1]
    assert not {"sku-0001", "sku-0004"} & set(ids[0]) and (np.diff(scores, axis=1) <= 0).all()
