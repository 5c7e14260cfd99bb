"""Readers and KuaiRand preprocessing, on tiny hand-written files (the MovieLens downloader:
tests/integration/test_download.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.kuairand import preprocess_kuairand
from pipeline.data.readers import detect_layout, prepare_sequences, read_interactions
from pipeline.data.sequences import read_sequences
from pipeline.data.vocab import read_vocabulary

# (user, item, rating, timestamp); user 1 has a timestamp tie (items 10 and 5 at t=100),
# user 2 too (30, 20 at 300): ties keep the file's order, not the item order
ROWS = [
    (2, 30, 4, 300),
    (1, 10, 5, 100),
    (1, 5, 3, 100),
    (2, 1, 2, 200),
    (1, 7, 1, 50),
    (2, 20, 5, 300),
]
EXPECTED_EVENTS = [{"user_id": u, "item_id": i, "timestamp": t, "rating": float(r)} for u, i, r, t in ROWS]
EXPECTED_SEQUENCES = [
    {"user_id": 1, "item_ids": [7, 10, 5], "timestamps": [50, 100, 100]},
    {"user_id": 2, "item_ids": [1, 30, 20], "timestamps": [200, 300, 300]},
]


def write_layout(folder: Path, layout: str, rows=ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "ml-dat":
        path = folder / "ratings.dat"
        path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    elif layout == "ml-tsv":
        path = folder / "u.data"
        path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    elif layout == "ml-csv":
        path = folder / "ratings.csv"
        path.write_text(
            "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in rows)
        )
    else:
        path = folder / "events.parquet"
        u, i, r, t = zip(*rows)
        pq.write_table(
            pa.table(
                {
                    "timestamp": list(t),
                    "item_id": list(i),
                    "user_id": list(u),
                    "rating": [float(x) for x in r],
                    "extra": ["x"] * len(rows),
                }
            ),
            path,
        )
    return path


LAYOUTS = ["ml-dat", "ml-tsv", "ml-csv", "parquet"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_identical_events_and_sequences(tmp_path, layout):
    path = write_layout(tmp_path / "in", layout)
    events, report = read_interactions(path)  # auto-detected
    assert report.layout == layout
    assert events.column_names == ["user_id", "item_id", "timestamp", "rating"]
    assert [events.schema.field(c).type for c in events.column_names] == [pa.int64()] * 3 + [pa.float64()]
    assert events.to_pylist() == EXPECTED_EVENTS
    assert (report.rows_read, report.rows_kept, report.rows_quarantined, report.reasons) == (6, 6, 0, {})
    assert report.quarantine_path is None
    assert not list((tmp_path / "in").glob("*.quarantine.parquet"))

    # the default maps item ids through a vocabulary: rows in ascending id order, back to the same ids
    mapped, _ = prepare_sequences(path, tmp_path / "mapped.parquet")
    vocab = read_vocabulary(mapped.vocab)
    assert [
        {**r, "item_ids": vocab.raw_ids(r["item_ids"])} for r in mapped.table.to_pylist()
    ] == EXPECTED_SEQUENCES
    ids = sorted({i for r in EXPECTED_SEQUENCES for i in r["item_ids"]})
    assert mapped.num_items == len(ids) + 1 and vocab.raw_ids(range(1, len(ids) + 1)) == ids

    data, report = prepare_sequences(path, tmp_path / "seq.parquet", identity_ids=True)
    assert data.table.to_pylist() == EXPECTED_SEQUENCES
    assert data.num_items == 31  # max id + 1, ids not remapped
    back = read_sequences(tmp_path / "seq.parquet")
    assert back.table.to_pylist() == EXPECTED_SEQUENCES
    assert back.num_items == 31
    assert back.meta["layout"] == layout
    assert back.meta["source"] == str(path.resolve())
    assert back.meta["report"]["rows_kept"] == 6
    assert report.summary() == f"{path.name} [{layout}]: 6 rows read, 6 kept, 0 quarantined"


def test_auto_detection(tmp_path):
    assert detect_layout("x/ratings.dat") == "ml-dat"
    assert detect_layout("x/u.data") == "ml-tsv"
    assert detect_layout("x/ratings.csv") == "ml-csv"
    assert detect_layout("x/events.parquet") == "parquet"
    odd = tmp_path / "ratings.txt"
    odd.write_text("1::2::3::4\n")
    with pytest.raises(ValueError, match=r"ratings\.txt: cannot detect the layout .*ml-dat"):
        read_interactions(odd)
    events, report = read_interactions(odd, layout="ml-dat")  # explicit layout overrides the name
    assert events.to_pylist() == [{"user_id": 1, "item_id": 2, "timestamp": 4, "rating": 3.0}]
    with pytest.raises(ValueError, match="unknown layout 'xml'"):
        read_interactions(odd, layout="xml")


def test_missing_column_names_file_and_column(tmp_path):
    csv = tmp_path / "ratings.csv"
    csv.write_text("userId,rating,timestamp\n1,4.0,100\n")
    with pytest.raises(ValueError, match=r"ratings\.csv: missing column\(s\) \['movieId'\]"):
        read_interactions(csv)
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), parquet)
    with pytest.raises(ValueError, match=r"events\.parquet: missing column\(s\) \['timestamp'\]"):
        read_interactions(parquet)


BAD_DAT = (
    "1::10::5::100\n"
    "abc::11::4::101\n"  # line 2: non-integer user id
    "1::12::3::\n"  # line 3: missing timestamp
    "2::-4::3::105\n"  # line 4: negative item id
    "2::20::5::110\n"
    "2::21::1::120\n"
)


def test_bad_rows_are_quarantined_with_reasons(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text(BAD_DAT)
    events, report = read_interactions(path)
    assert events.to_pylist() == [
        {"user_id": 1, "item_id": 10, "timestamp": 100, "rating": 5.0},
        {"user_id": 2, "item_id": 20, "timestamp": 110, "rating": 5.0},
        {"user_id": 2, "item_id": 21, "timestamp": 120, "rating": 1.0},
    ]
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (6, 3, 3)
    assert report.reasons == {"non_integer_user_id": 1, "missing_timestamp": 1, "negative_item_id": 1}
    assert report.quarantine_path == tmp_path / "ratings.quarantine.parquet"  # default: next to the input
    assert pq.read_table(report.quarantine_path).to_pylist() == [
        {
            "source": "ratings.dat",
            "row_number": 2,
            "reason": "non_integer_user_id",
            "field": "user_id",
            "value": "abc",
            "raw": "abc::11::4::101",
        },
        {
            "source": "ratings.dat",
            "row_number": 3,
            "reason": "missing_timestamp",
            "field": "timestamp",
            "value": "",
            "raw": "1::12::3::",
        },
        {
            "source": "ratings.dat",
            "row_number": 4,
            "reason": "negative_item_id",
            "field": "item_id",
            "value": "-4",
            "raw": "2::-4::3::105",
        },
    ]
    assert "3 quarantined" in report.summary() and str(report.quarantine_path) in report.summary()

    # prepare_sequences: the good rows become sequences; the one-item user 1 is dropped and counted
    qdir = tmp_path / "q"
    data, report = prepare_sequences(path, tmp_path / "seq.parquet", quarantine_dir=qdir, identity_ids=True)
    assert report.quarantine_path == qdir / "ratings.quarantine.parquet"
    assert pq.read_table(report.quarantine_path).num_rows == 3
    assert data.table.to_pylist() == [{"user_id": 2, "item_ids": [20, 21], "timestamps": [110, 120]}]
    assert data.num_items == 22
    assert (report.rows_read, report.rows_kept, report.rows_quarantined, report.rows_dropped) == (6, 2, 3, 1)
    assert report.reasons == {
        "non_integer_user_id": 1,
        "missing_timestamp": 1,
        "negative_item_id": 1,
        "user_too_short": 1,
    }
    assert read_sequences(tmp_path / "seq.parquet").meta["users_dropped"] == 1


def test_bad_rows_in_csv_and_parquet(tmp_path):
    csv = tmp_path / "ratings.csv"
    csv.write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,4.5,100\n"
        "1,2.5,4.0,101\n"  # line 3: non-integer item id
        "1,11,4.0\n"  # line 4: 3 fields
        "1,0,4.0,102\n"  # line 5: item 0 is the padding id
        "\n"  # line 6: blank
        "1,12,x,103\n"  # line 7: unparsable rating
    )
    events, report = read_interactions(csv)
    assert events.to_pylist() == [{"user_id": 1, "item_id": 10, "timestamp": 100, "rating": 4.5}]
    assert pq.read_table(report.quarantine_path).select(
        ["row_number", "reason", "value", "raw"]
    ).to_pylist() == [
        {"row_number": 3, "reason": "non_integer_item_id", "value": "2.5", "raw": "1,2.5,4.0,101"},
        {"row_number": 4, "reason": "wrong_field_count", "value": "3 fields, expected 4", "raw": "1,11,4.0"},
        {"row_number": 5, "reason": "zero_item_id", "value": "0", "raw": "1,0,4.0,102"},
        {"row_number": 6, "reason": "empty_line", "value": None, "raw": ""},
        {"row_number": 7, "reason": "unparsable_rating", "value": "x", "raw": "1,12,x,103"},
    ]
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (6, 1, 5)

    parquet = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, -3, 1], pa.int64()),
                "item_id": [5, 6, 7],
                "timestamp": pa.array([100, 101, None], pa.int64()),
            }
        ),
        parquet,
    )
    events, report = read_interactions(parquet, quarantine_dir=tmp_path / "q")
    assert events.to_pylist() == [{"user_id": 1, "item_id": 5, "timestamp": 100}]
    assert report.reasons == {"negative_user_id": 1, "missing_timestamp": 1}
    assert pq.read_table(tmp_path / "q" / "events.quarantine.parquet").to_pylist() == [
        {
            "source": "events.parquet",
            "row_number": 2,
            "reason": "negative_user_id",
            "field": "user_id",
            "value": "-3",
            "raw": "user_id=-3, item_id=6, timestamp=101",
        },
        {
            "source": "events.parquet",
            "row_number": 3,
            "reason": "missing_timestamp",
            "field": "timestamp",
            "value": None,
            "raw": "user_id=1, item_id=7, timestamp=null",
        },
    ]
    # a clean re-run removes the stale quarantine file
    pq.write_table(pa.table({"user_id": [1], "item_id": [5], "timestamp": [100]}), parquet)
    _, report = read_interactions(parquet, quarantine_dir=tmp_path / "q")
    assert report.quarantine_path is None
    assert not (tmp_path / "q" / "events.quarantine.parquet").exists()


def test_all_rows_bad_raises_naming_file_and_field(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("u1::10::5::100\n1::x::5::100\n")
    expected = r"ratings\.dat: all 2 rows are bad; first bad row 1: non_integer_user_id field user_id='u1'"
    with pytest.raises(ValueError, match=expected):
        read_interactions(path)
    assert pq.read_table(tmp_path / "ratings.quarantine.parquet").column("reason").to_pylist() == [
        "non_integer_user_id",
        "non_integer_item_id",
    ]
    empty = tmp_path / "u.data"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"u\.data: contains no data rows"):
        read_interactions(empty)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.dat: file does not exist"):
        read_interactions(tmp_path / "nope.dat")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_interactions(tmp_path, layout="ml-dat")
    corrupt = tmp_path / "events.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"events\.parquet: not a readable Parquet file"):
        read_interactions(corrupt)
    binary = tmp_path / "ratings.dat"
    binary.write_bytes(b"\xff\xfe\x00\x01::2::3::4\n")
    with pytest.raises(ValueError, match=r"ratings\.dat: not a readable text file"):
        read_interactions(binary)


# ------------------------------------------------------------------------------------------------------------
# KuaiRand

KR_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,long_view,"
    "play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab"
)


def kr_row(user, video, time_ms, click, is_rand=0) -> str:
    return f"{user},{video},20220408,1200,{time_ms},{click},0,0,0,0,0,0,5000,10000,0,0,0,{is_rand},1"


def write_kuairand(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    a = folder / "log_standard_4_08_to_4_21_1k.csv"
    a.write_text(
        "\n".join(
            [
                KR_HEADER,
                kr_row(0, 300, 1_000_500, 1),  # line 2
                kr_row(0, 500, 1_000_000, 1),  # same second, 0.5 s earlier: first in the sequence
                kr_row(1, 300, 999_000, 1),  # earliest click: video 300 gets item id 1
                kr_row(1, 700, 1_001_000, 0),  # not clicked
                kr_row(0, 800, 1_002_000, 1),
                kr_row(2, 900, 1_003_000, 1),  # user 2: one click only
                kr_row("x", 100, 1_004_000, 1),  # line 8: bad user id
            ]
        )
        + "\n"
    )
    b = folder / "log_standard_4_22_to_5_08_1k.csv"
    b.write_text(
        "\n".join(
            [
                KR_HEADER,
                kr_row(1, 500, 2_000_000, 1),
                kr_row(1, 800, 2_000_000, 1),
                kr_row(0, 300, 2_500_000, 1),  # a repeat: kept
                kr_row(1, 600, "", 1),  # line 5: missing time_ms
            ]
        )
        + "\n"
    )
    r = folder / "log_random_4_22_to_5_08_1k.csv"
    r.write_text("\n".join([KR_HEADER, kr_row(0, 999, 3_000_000, 1, is_rand=1)]) + "\n")
    return [a, b, r]


def test_kuairand_sequences_and_mapping(tmp_path):
    a, b, r = write_kuairand(tmp_path / "logs")
    out = tmp_path / "out" / "kr.parquet"
    data, report = preprocess_kuairand([a, b, r], out, min_length=3)
    assert data.table.to_pylist() == [
        # video 500 (item 2) 0.5 s before video 300 (item 1) in the same second: millisecond order kept
        {"user_id": 0, "item_ids": [2, 1, 3, 1], "timestamps": [1000, 1000, 1002, 2500]},
        {"user_id": 1, "item_ids": [1, 2, 3], "timestamps": [999, 2000, 2000]},
    ]
    assert data.num_items == 4
    item_map = tmp_path / "out" / "kr.item_map.parquet"
    assert pq.read_table(item_map).to_pylist() == [
        {"item_id": 1, "video_id": 300, "first_time_ms": 999_000},
        {"item_id": 2, "video_id": 500, "first_time_ms": 1_000_000},
        {"item_id": 3, "video_id": 800, "first_time_ms": 1_002_000},
    ]
    assert (report.rows_read, report.rows_kept, report.rows_quarantined, report.rows_dropped) == (11, 7, 2, 2)
    assert report.reasons == {
        "non_integer_user_id": 1,
        "missing_time_ms": 1,
        "not_positive": 1,
        "user_too_short": 1,
    }
    assert report.quarantine_path == tmp_path / "out" / "kr.quarantine.parquet"
    assert pq.read_table(report.quarantine_path).to_pylist() == [
        {
            "source": a.name,
            "row_number": 8,
            "reason": "non_integer_user_id",
            "field": "user_id",
            "value": "x",
            "raw": "user_id=x, video_id=100, time_ms=1004000, is_click=1",
        },
        {
            "source": b.name,
            "row_number": 5,
            "reason": "missing_time_ms",
            "field": "time_ms",
            "value": "",
            "raw": "user_id=1, video_id=600, time_ms=, is_click=1",
        },
    ]
    assert any(r.name in note for note in report.notes)  # the random log was left out, and says so
    meta = read_sequences(out).meta
    assert meta["random_logs_left_out"] == [str(r.resolve())]
    assert meta["positive"] == "is_click" and meta["num_items"] == 4

    data, report = preprocess_kuairand(tmp_path / "logs", out, include_random=True, min_length=3)  # a folder
    assert data.table.to_pylist()[0] == {
        "user_id": 0,
        "item_ids": [2, 1, 3, 1, 4],
        "timestamps": [1000, 1000, 1002, 2500, 3000],
    }
    assert pq.read_table(item_map).column("video_id").to_pylist() == [300, 500, 800, 999]

    data, report = preprocess_kuairand([a, b], out, positive="all", min_length=3)
    assert pq.read_table(item_map).column("video_id").to_pylist() == [300, 500, 700, 800]
    assert data.table.to_pylist()[1] == {
        "user_id": 1,
        "item_ids": [1, 3, 2, 4],
        "timestamps": [999, 1001, 2000, 2000],
    }
    assert "not_positive" not in report.reasons


def test_kuairand_missing_positive_column(tmp_path):
    a, _, _ = write_kuairand(tmp_path)
    with pytest.raises(
        ValueError, match=r"log_standard_4_08_to_4_21_1k\.csv: missing column\(s\) \['is_watched'\]"
    ):
        preprocess_kuairand([a], tmp_path / "kr.parquet", positive="is_watched")


def test_prepare_flags_absurd_timestamps_drops_duplicates_and_quarantines_beside_the_output(tmp_path):
    t = 978_300_000  # 2001
    rows = [
        (1, 10, 5, t),
        (1, 11, 4, t + 60),
        (1, 11, 4, t + 60),  # an exact duplicate of the row above
        (1, 12, 3, (t + 120) * 1000),  # milliseconds
        (2, 10, 5, t + 5),
        (2, 12, 2, 0),  # zero
        (2, 13, 1, 5_000_000_000),  # 2128: far future
        (2, 14, 1, t + 9),
    ]
    src = write_layout(tmp_path / "in", "ml-dat", rows)
    out = tmp_path / "out" / "ml.parquet"
    data, report = prepare_sequences(src, out, identity_ids=True)
    assert report.reasons == {"absurd_timestamp": 3, "duplicate_event": 1}
    assert (report.rows_read, report.rows_kept, report.rows_quarantined, report.rows_dropped) == (8, 4, 3, 1)
    assert "1 exact duplicate events dropped" in report.summary()
    assert report.quarantine_path == tmp_path / "out" / "ratings.quarantine.parquet"  # beside the output
    assert not list((tmp_path / "in").glob("*.quarantine.parquet"))  # nothing written into the data set
    q = pq.read_table(report.quarantine_path).to_pylist()
    assert [(r["row_number"], r["reason"], r["value"]) for r in q] == [
        (4, "absurd_timestamp", str((t + 120) * 1000)),
        (6, "absurd_timestamp", "0"),
        (7, "absurd_timestamp", "5000000000"),
    ]
    assert data.table.to_pylist() == [
        {"user_id": 1, "item_ids": [10, 11], "timestamps": [t, t + 60]},
        {"user_id": 2, "item_ids": [10, 14], "timestamps": [t + 5, t + 9]},
    ]
