"""What a reader checks of sequence data someone else wrote, before anything is sized from it.

A sequence file's metadata (or a shard directory's manifest) says how many rows the item table has, and
the trainer builds a table of that size: a claim of 2^40 rows would be allocated before a batch is read,
and an item id past the table (or negative, or the padding row 0) would fail deep inside an embedding
lookup, or silently train the padding row. `check_sequences` refuses these in one line naming the source.
"""

from __future__ import annotations

import pyarrow.compute as pc

from pipeline.data.sequences import SequenceData, check_num_items


def check_sequences(data: SequenceData, source: str) -> SequenceData:
    """`data` if its item table size is sane and every row's item ids lie in 1..num_items-1 with one
    timestamp each; else ValueError, one line naming `source` (and the row)."""
    n = check_num_items(data.num_items, source)
    items, times = data.table["item_ids"], data.table["timestamps"]
    differs = pc.not_equal(pc.list_value_length(items), pc.list_value_length(times))
    if pc.any(differs).as_py():
        row = int(pc.index(differs, True).as_py())
        raise ValueError(f"{source}: row {row}: item_ids and timestamps have different lengths")
    flat = pc.list_flatten(items)
    if flat.null_count or pc.list_flatten(times).null_count:
        raise ValueError(f"{source}: item_ids or timestamps hold nulls")
    if len(flat):
        bounds = pc.min_max(flat)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low < 1 or high >= n:
            bad = low if low < 1 else high
            first = pc.index(flat, bad).as_py()  # the first element holding it, and its row
            row = int(pc.list_parent_indices(items.combine_chunks())[first].as_py())
            raise ValueError(
                f"{source}: row {row}: item id {bad} outside 1..{n - 1} (num_items {n}; 0 is padding)"
            )
    return data
