"""Check that two sequence shard directories (`fuxi data build-sequences` / `append-day`) hold the same data.

    python infra/box/compare_sequences.py runs/box-data/seq-ray runs/box-data/seq-local
    python infra/box/compare_sequences.py s3://box/seq runs/box-data/seq-local   # any two URIs
    python infra/box/compare_sequences.py --any-generation runs/x/seq runs/box-data/seq-local

Same partitions, same vocabulary, and per partition the same rows (compared sorted, since the row order
inside a shard may follow task completion); the same manifest generation too, unless --any-generation (a
rebuild over an existing directory is its next generation). Exits 1 with one line naming the first
difference.
"""

import json
import sys

import storage
from pipeline.data.sequences import read_parquet


def manifest(d: str) -> dict:
    uri = storage.join(d, "manifest.json")
    try:
        return json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError) as e:
        raise SystemExit(f"{storage.display(uri)}: {e}") from None


def table(uri: str):
    t = read_parquet(uri)
    keys = [name for name in t.column_names if not _is_list(t.schema.field(name).type)]
    return t.sort_by([(name, "ascending") for name in keys])


def _is_list(t) -> bool:
    return str(t).startswith(("list", "large_list", "fixed_size_list"))


def main() -> int:
    args = sys.argv[1:]
    any_generation = "--any-generation" in args
    args = [a for a in args if a != "--any-generation"]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = args
    ma, mb = manifest(a), manifest(b)
    keys = ("num_items", "num_partitions", "max_length") + (() if any_generation else ("generation",))
    for key in keys:
        if ma.get(key) != mb.get(key):
            print(f"manifest {key}: {ma.get(key)!r} in {a}, {mb.get(key)!r} in {b}", file=sys.stderr)
            return 1
    if sorted(ma["days"]) != sorted(mb["days"]):
        print(f"days differ: {sorted(ma['days'])} vs {sorted(mb['days'])}", file=sys.stderr)
        return 1
    # shards paired by partition (their file names carry the generation)
    sa, sb = ({s["partition"]: s["file"] for s in m["shards"]} for m in (ma, mb))
    if sorted(sa) != sorted(sb) or (not any_generation and sa != sb):
        print("shard files differ", file=sys.stderr)
        return 1
    files = [(sa[p], sb[p]) for p in sorted(sa)]
    files.append((ma["vocab"]["file"], mb["vocab"]["file"]))
    rows = 0
    for fa, fb in files:
        ta, tb = table(storage.join(a, fa)), table(storage.join(b, fb))
        if not ta.equals(tb):
            print(f"{fa}: contents differ ({ta.num_rows} vs {tb.num_rows} rows)", file=sys.stderr)
            return 1
        rows += ta.num_rows
    print(f"equal: {len(files) - 1} shards + vocabulary, {rows} rows, days {', '.join(sorted(ma['days']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
