"""Red-team corpus, data sets: crafted sequence files, shard manifests and the vocabularies they name,
given to `fuxi train` (docs/RELIABILITY.md).

Training copies the data's vocabulary into every checkpoint and sizes the item table from the data's
num_items, so both are read and checked before a model is built (pipeline/train/run.py `load_data`:
pipeline/data/checks.py, pipeline/data/vocab.py `check_vocabulary`). One row = one crafted data set and the
exact line `fuxi train` prints (exit 2); no run folder is written. The genuine data set, a sequence file
and a shard directory made from it, passes the same checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.redteam import files_under, write_vocab

RAW = list(range(1001, 1061))  # 60 items: rows 1..60, num_items 61
SEQ = "seq.parquet"
VOC = "seq.vocab.parquet"
VOCAB = "vocab.parquet"  # a shard directory's


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence file with its vocabulary sidecar (prepare_sequences), and beside it a shard directory
    `shards/` holding the same rows under a manifest."""
    from pipeline.data.readers import prepare_sequences

    base = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    n = 2000
    events = pa.table(
        {
            "user_id": rng.integers(0, 60, n),
            "item_id": rng.integers(RAW[0], RAW[-1] + 1, n),
            "timestamp": 1_700_000_000 + np.arange(n),
            "rating": np.ones(n),
        }
    )
    pq.write_table(events, base / "events.parquet")
    data, _ = prepare_sequences(base / "events.parquet", base / "g" / SEQ)
    assert data.num_items == 61 and Path(data.vocab).name == VOC
    shards = base / "g" / "shards"
    shards.mkdir()
    shutil.copyfile(base / "g" / SEQ, shards / "part-00000.parquet")
    shutil.copyfile(base / "g" / VOC, shards / VOCAB)
    manifest = {"num_items": 61, "shards": [{"file": "part-00000.parquet"}], "vocab": {"file": VOCAB}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return base / "g"


# ---------------------------------------------------------------------------------------------------
# mutations


def _meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        table = pq.read_table(d / SEQ)
        meta = json.loads(table.schema.metadata[b"fuxi.meta"])
        edit(meta)
        pq.write_table(table.replace_schema_metadata({b"fuxi.meta": json.dumps(meta)}), d / SEQ)

    return mutate


def _raw_meta(raw: bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        table = pq.read_table(d / SEQ)
        pq.write_table(table.replace_schema_metadata({b"fuxi.meta": raw}), d / SEQ)

    return mutate


def _column(name: str, make: Callable[[list], pa.Array]) -> Callable[[Path], None]:
    """Replace a list column with `make(its rows as Python lists)`, keeping the file's metadata."""

    def mutate(d: Path) -> None:
        table = pq.read_table(d / SEQ)
        meta = table.schema.metadata
        column = make(table[name].to_pylist())
        table = table.set_column(table.column_names.index(name), name, column)
        pq.write_table(table.replace_schema_metadata(meta), d / SEQ)

    return mutate


def _first_item(value: object) -> Callable[[Path], None]:
    return _column("item_ids", lambda r: pa.array([[value, *r[0][1:]], *r[1:]], pa.list_(pa.int64())))


def _vocab(raw_ids: list, rows: list | None = None) -> Callable[[Path], None]:
    return lambda d: write_vocab(d / VOC, raw_ids, rows)


def _vocab_column(name: str, values: pa.Array) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        table = pq.read_table(d / VOC)
        pq.write_table(table.set_column(table.column_names.index(name), name, values), d / VOC)

    return mutate


def _link(name: str, target: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / name).unlink()
        (d / name).symlink_to(target)

    return mutate


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        doc = json.loads((d / "shards" / "manifest.json").read_text())
        out = edit(doc)
        (d / "shards" / "manifest.json").write_text(json.dumps(doc if out is None else out))

    return mutate


def _manifest_text(text: str) -> Callable[[Path], None]:
    return lambda d: (d / "shards" / "manifest.json").write_text(text)


def _hard_link_vocab(d: Path) -> None:
    """A hard link to a file outside: the same inode, a plain file by every test; its content is checked."""
    secret = d.parent / f"{d.name}-secret.parquet"
    write_vocab(secret, RAW[:10])
    (d / VOC).unlink()
    os.link(secret, d / VOC)


L = r"(?:ListType\(list<item: int64>\)|list<item: int64>)"
F = r"{d}/seq\.parquet: "
V = r"{d}/seq\.vocab\.parquet: "
M = r"{d}/shards/manifest\.json: "
D = r"{d}/shards: "
# (id, mutation, the data set given to fuxi train: file or shards, the exact message after "fuxi: error: ")
# fmt: off
CASES = [
    # sequence file metadata
    ("num-items-2^40", _meta(lambda m: m.update(num_items=2**40)), SEQ,
     F + r"num_items 1099511627776 is not in 2\.\.2\^31 \(rows of the item table\)"),
    ("num-items-2^40-no-vocab", _meta(lambda m: (m.update(num_items=2**40), m.pop("vocab"))), SEQ,
     F + r"num_items 1099511627776 is not in 2\.\.2\^31 \(rows of the item table\)"),
    ("num-items-negative", _meta(lambda m: m.update(num_items=-5)), SEQ,
     F + r"num_items -5 is not in 2\.\.2\^31 \(rows of the item table\)"),
    ("num-items-one", _meta(lambda m: m.update(num_items=1)), SEQ,
     F + r"num_items 1 is not in 2\.\.2\^31 \(rows of the item table\)"),
    ("num-items-string", _meta(lambda m: m.update(num_items="61")), SEQ,
     F + r"fuxi\.meta num_items '61' is not an integer"),
    ("num-items-float", _meta(lambda m: m.update(num_items=61.0)), SEQ,
     F + r"fuxi\.meta num_items '61\.0' is not an integer"),
    ("num-items-bool", _meta(lambda m: m.update(num_items=True)), SEQ,
     F + r"fuxi\.meta num_items 'True' is not an integer"),
    ("num-items-smaller-than-ids", _meta(lambda m: (m.update(num_items=30), m.pop("vocab"))), SEQ,
     F + r"row \d+: item id \d+ outside 1\.\.29 \(num_items 30; 0 is padding\)"),
    ("meta-list", _raw_meta(b"[1]"), SEQ, F + r"not a sequence file \(fuxi\.meta is not a JSON object\)"),
    ("meta-not-json", _raw_meta(b"{x"), SEQ, F + r"not a sequence file \(Expecting property name .*\)"),
    ("meta-deep", _raw_meta(b"[" * 100_000 + b"]" * 100_000), SEQ,
     F + r"not a sequence file \(maximum recursion depth exceeded.*\)"),
    ("meta-5000-digits", _raw_meta(b'{"num_items": ' + b"9" * 5000 + b"}"), SEQ,
     F + r"not a sequence file \(Exceeds the limit \(4300 digits\).*\)"),
    ("vocab-absolute", _meta(lambda m: m.update(vocab="/etc/passwd")), SEQ,
     r"{d}: fuxi\.meta: vocab = '/etc/passwd' is an absolute path; names must stay inside it"),
    ("vocab-dotdot", _meta(lambda m: m.update(vocab="../x.parquet")), SEQ,
     r"{d}: fuxi\.meta: vocab = '\.\./x\.parquet' climbs out with '\.\.'; names must stay inside it"),
    ("vocab-number", _meta(lambda m: m.update(vocab=5)), SEQ, F + r"fuxi\.meta\.vocab is not a str \('5'\)"),
    ("vocab-nul", _meta(lambda m: m.update(vocab="seq.vocab.parquet\x00.txt")), SEQ,
     r"{d}: fuxi\.meta: vocab = 'seq\.vocab\.parquet\\x00\.txt' holds a NUL or backslash; names must stay "
     r"inside it"),
    # sequence file columns
    ("item-past-table", _first_item(10**6), SEQ,
     F + r"row 0: item id 1000000 outside 1\.\.60 \(num_items 61; 0 is padding\)"),
    ("item-negative", _first_item(-3), SEQ,
     F + r"row 0: item id -3 outside 1\.\.60 \(num_items 61; 0 is padding\)"),
    ("item-padding", _first_item(0), SEQ,
     F + r"row 0: item id 0 outside 1\.\.60 \(num_items 61; 0 is padding\)"),
    ("item-int64-max", _first_item(2**63 - 1), SEQ,
     F + r"row 0: item id 9223372036854775807 outside 1\.\.60 \(num_items 61; 0 is padding\)"),
    ("item-null-element", _first_item(None), SEQ, F + r"item_ids or timestamps hold nulls"),
    ("items-null-row", _column("item_ids", lambda r: pa.array([None, *r[1:]], pa.list_(pa.int64()))), SEQ,
     F + r"not a sequence file \(Casting field 'item_ids' with null values to non-nullable\)"),
    ("items-float", _column("item_ids", lambda r: pa.array([[x + 0.5 for x in y] for y in r])), SEQ,
     F + r"not a sequence file \(Float value \d+\.50* was truncated converting to int64\)"),
    ("items-string", _column("item_ids", lambda r: pa.array([[f"i{x}" for x in y] for y in r])), SEQ,
     F + r"not a sequence file \(Failed to parse string: 'i\d+' as a scalar of type int64\)"),
    ("items-int8-wraps", _column("item_ids", lambda r: pa.array(r, pa.list_(pa.int64())).cast(
        pa.list_(pa.int64()))), SEQ, None),  # fmt: skip  # the genuine rows, re-encoded: accepted
    ("timestamps-short", _column("timestamps", lambda r: pa.array([r[0][:1], *r[1:]], pa.list_(pa.int64()))),
     SEQ, F + r"row 0: item_ids and timestamps have different lengths"),
    ("timestamps-null-row", _column("timestamps", lambda r: pa.array([None, *r[1:]], pa.list_(pa.int64()))),
     SEQ, F + r"not a sequence file \(Casting field 'timestamps' with null values to non-nullable\)"),
    ("items-not-a-list", _column("item_ids", lambda r: pa.array([y[0] for y in r])), SEQ,
     F + r"not a sequence file \(Unsupported cast from int64 to list using function cast_list\)"),
    ("not-parquet", lambda d: (d / SEQ).write_text("user_id,item_ids\n"), SEQ,
     F + r"not a readable Parquet file \(.*\)"),
    ("empty-file", lambda d: (d / SEQ).write_bytes(b""), SEQ, F + r"not a readable Parquet file \(.*\)"),
    ("truncated", lambda d: (d / SEQ).write_bytes((d / SEQ).read_bytes()[:-100]), SEQ,
     F + r"not a readable Parquet file \(.*\)"),
    # the vocabulary a data set names (copied into every checkpoint)
    ("vocab-duplicate-id", _vocab([*RAW[:-1], RAW[0]]), SEQ, V + r"raw id 1001 appears more than once"),
    ("vocab-fewer-rows", _vocab(RAW[:50]), SEQ,
     V + r"50 item rows, the data's item table \(num_items\) has 60 \(plus padding row 0\)"),
    ("vocab-more-rows", _vocab(list(range(1001, 1101))), SEQ,
     V + r"100 item rows, the data's item table \(num_items\) has 60 \(plus padding row 0\)"),
    ("vocab-row-gap", _vocab(RAW, [*range(1, 30), *range(31, 62)]), SEQ,
     V + r"vocabulary rows must be 1\.\.N in table order \(admitted ids first\)"),
    ("vocab-rows-from-0", _vocab(RAW, list(range(60))), SEQ,
     V + r"vocabulary rows must be 1\.\.N in table order \(admitted ids first\)"),
    ("vocab-pending-first", _vocab(RAW, [None, *range(1, 60)]), SEQ,
     V + r"vocabulary rows must be 1\.\.N in table order \(admitted ids first\)"),
    ("vocab-null-id", _vocab_column("raw_id", pa.array([None, *RAW[1:]], pa.int64())), SEQ,
     V + r"Casting field 'raw_id' with null values to non-nullable"),
    ("vocab-negative-count", _vocab_column("count", pa.array([-1] * 60, pa.int64())), SEQ,
     V + r"count must be >= 1 for every id \(an id is listed once it is seen\)"),
    ("vocab-rows-as-strings", _vocab_column("row", pa.array([f"r{i}" for i in range(1, 61)])), SEQ,
     V + r"Failed to parse string: 'r\d+' as a scalar of type int64"),
    ("vocab-float-ids", _vocab_column("raw_id", pa.array([float(x) for x in RAW])), SEQ,
     V + r"type double, expected integers or strings"),
    ("vocab-meta-list", lambda d: pq.write_table(pq.read_table(d / VOC).replace_schema_metadata(
        {b"fuxi.meta": b"[1]"}), d / VOC), SEQ,
     V + r"fuxi\.meta is not a JSON object with an integer min_count >= 1"),
    ("vocab-min-count-zero", lambda d: pq.write_table(pq.read_table(d / VOC).replace_schema_metadata(
        {b"fuxi.meta": b'{"min_count": 0}'}), d / VOC), SEQ,
     V + r"fuxi\.meta is not a JSON object with an integer min_count >= 1"),
    ("vocab-not-parquet", lambda d: (d / VOC).write_text("raw_id,row\n"), SEQ,
     V + r"not a readable vocabulary Parquet file \(.*\)"),
    ("vocab-missing", lambda d: (d / VOC).unlink(), SEQ, V + r"not a plain file"),
    ("vocab-link-outside", _link(VOC, "/etc/hostname"), SEQ,
     r"{d}: fuxi\.meta: vocab = 'seq\.vocab\.parquet' is a link that leads outside \(/etc/hostname\); names "
     r"must stay inside it"),
    ("vocab-hard-link", _hard_link_vocab, SEQ,
     V + r"10 item rows, the data's item table \(num_items\) has 60 \(plus padding row 0\)"),
    ("vocab-folder", lambda d: ((d / VOC).unlink(), (d / VOC).mkdir()), SEQ, V + r"not a plain file"),
    # shard directories: the manifest and what it names
    ("manifest-shard-absolute", _manifest(lambda m: m["shards"][0].update(file="/etc/passwd")), "shards",
     D + r"manifest\.json: shards\[0\]\.file = '/etc/passwd' is an absolute path; names must stay inside it"),
    ("manifest-shard-dotdot", _manifest(lambda m: m["shards"][0].update(file="../seq.parquet")), "shards",
     D + r"manifest\.json: shards\[0\]\.file = '\.\./seq\.parquet' climbs out with '\.\.'; names must stay "
     r"inside it"),
    ("manifest-shard-number", _manifest(lambda m: m["shards"][0].update(file=7)), "shards",
     M + r"every shard must be an object with a string 'file'"),
    ("manifest-shards-object", _manifest(lambda m: m.update(shards={"file": "x"})), "shards",
     M + r"expected an object with a list 'shards' and an integer 'num_items'"),
    ("manifest-no-num-items", _manifest(lambda m: m.__delitem__("num_items")), "shards",
     M + r"expected an object with a list 'shards' and an integer 'num_items'"),
    ("manifest-num-items-2^40", _manifest(lambda m: m.update(num_items=2**40)), "shards",
     D + r"num_items 1099511627776 is not in 2\.\.2\^31 \(rows of the item table\)"),
    ("manifest-list", _manifest(lambda m: [m]), "shards", M + r"expected a JSON object"),
    ("manifest-not-json", _manifest_text("{shards: []"), "shards", M + r"not valid JSON \(.*\)"),
    ("manifest-nan", _manifest_text('{"num_items": NaN, "shards": []}'), "shards",
     M + r"expected an object with a list 'shards' and an integer 'num_items'"),
    ("manifest-deep", _manifest_text("[" * 100_000 + "]" * 100_000), "shards",
     M + r"not valid JSON \(maximum recursion depth exceeded.*\)"),
    ("manifest-vocab-absolute", _manifest(lambda m: m.update(vocab={"file": "/etc/passwd"})), "shards",
     D + r"manifest\.json: vocab\.file = '/etc/passwd' is an absolute path; names must stay inside it"),
    ("manifest-vocab-string", _manifest(lambda m: m.update(vocab="vocab.parquet")), "shards",
     M + r"vocab is not a dict \('vocab\.parquet'\)"),
    ("manifest-vocab-duplicate", lambda d: write_vocab(d / "shards" / "vocab.parquet", [RAW[0]] * 60),
     "shards", r"{d}/shards/vocab\.parquet: raw id 1001 appears more than once"),
    ("manifest-shard-link", _link("shards/part-00000.parquet", "/etc/hostname"), "shards",
     D + r"manifest\.json: shards\[0\]\.file = 'part-00000\.parquet' is a link that leads outside "
     r"\(/etc/hostname\); names must stay inside it"),
    ("manifest-shard-wrong-type", lambda d: pq.write_table(pa.table({"user_id": [1], "item_ids": ["x"],
        "timestamps": [[1]]}), d / "shards" / "part-00000.parquet"), "shards",
     r"{d}/shards/part-00000\.parquet: not a sequence shard \(Unsupported cast from string to list .*\)"),
]
# fmt: on


@pytest.mark.parametrize("mutate, given, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_crafted_data_set_refused_by_train(
    genuine: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    mutate: Callable[[Path], None],
    given: str,
    pattern: str | None,
) -> None:
    from jobs.cli import main
    from pipeline.train.presets import tiny
    from pipeline.train.run import load_data

    d = shutil.copytree(genuine, tmp_path / "d", symlinks=True)
    mutate(d)
    if pattern is None:  # a re-encoding of the genuine data: accepted
        cfg = tiny()
        cfg.data.source = str(d / given)
        assert load_data(cfg).num_items == 61
        return
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    argv = ["train", "--preset", "tiny", "--data", str(d / given), "--set", "tracking.enabled=false"]
    assert main([*argv, "--set", f"output_dir={tmp_path}/runs"]) == 2
    lines = capsys.readouterr().err.splitlines()
    regex = "fuxi: error: " + pattern.replace("{d}", re.escape(str(d)))
    assert len(lines) == 1 and re.fullmatch(regex, lines[0]), f"\n{lines}\n!~ {regex}"
    assert files_under(tmp_path) == before  # no run folder, checkpoint or MLflow store


@pytest.mark.parametrize("given", [SEQ, "shards"])
def test_genuine_data_set_is_accepted(genuine: Path, given: str) -> None:
    from pipeline.data.vocab import check_vocabulary
    from pipeline.train.presets import tiny
    from pipeline.train.run import load_data

    cfg = tiny()
    cfg.data.source = str(genuine / given)
    data = load_data(cfg)
    assert data.num_items == 61 and data.num_users == 60
    assert check_vocabulary(data.vocab, 61).raw_ids(range(1, 61)) == RAW
