"""Names the data path and the model share: batch feature keys and the Parquet layouts several modules use.

The only module under `pipeline/` that `model/` may import (tests/unit/test_layout.py): plain constants,
no torch.
"""

from __future__ import annotations

import re

import pyarrow as pa

# KeyedJaggedTensor keys of a `Batch` (pipeline.data.collate): per user, history + target
ITEM_FEATURE = "item_id"
TIME_FEATURE = "timestamp"

# sequence Parquet: one row per user, in time order (pipeline.data.sequences)
SEQUENCE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("timestamps", pa.list_(pa.int64()), nullable=False),
    ]
)


def sequence_schema(user_type: pa.DataType | None = None) -> pa.Schema:
    """SEQUENCE_SCHEMA, or its variant for string user ids (raw user ids are kept as they are)."""
    if user_type is None or pa.types.is_integer(user_type):
        return SEQUENCE_SCHEMA
    return SEQUENCE_SCHEMA.set(0, pa.field("user_id", pa.string(), nullable=False))


SHARD_MANIFEST = "manifest.json"  # a sequence shard directory (`pipeline.data.build`)

# rows rejected by a reader or by log validation (pipeline.data.readers, pipeline.data.ingest)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row_number", pa.int64()),
        ("reason", pa.string()),
        ("field", pa.string()),
        ("value", pa.string()),
        ("raw", pa.string()),
    ]
)

# raw event logs: LOGDIR/date=YYYY-MM-DD/part-*.parquet and LOGDIR/_logs.json (pipeline.data.ingest)
LOGS_META = "_logs.json"
DATE_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")

# Plausible event times (unix seconds) for `fuxi data prepare` (public data sets: MovieLens starts in 1995):
# outside them a timestamp is quarantined as `absurd_timestamp`: zero or negative, milliseconds (> 2100 read
# as seconds), far future. The log ingest applies the same rule with a later default lower bound
# (`IngestRules.min_timestamp`, 2000-01-01: logs are recent).
MIN_TIMESTAMP = 1
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01 UTC
