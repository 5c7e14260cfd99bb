"""The data path: raw logs and public data sets -> sequence Parquet (shards) -> `Batch` streams.

Imports nothing from `model/` or `pipeline.train` (tests/unit/test_layout.py checks it); the names both sides
share live in `pipeline.features` (batch keys) and `pipeline.data.schema`.
"""
