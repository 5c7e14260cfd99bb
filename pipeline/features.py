"""Feature keys of a batch: what the data path writes into each `Batch`'s KeyedJaggedTensor and the model
reads from it. Plain constants with no imports, so that `model/` can import them without the data path
(and pyarrow); tests/unit/test_layout.py checks that this is all `model/` imports from `pipeline/`.
"""

# per user, history + target, in time order (pipeline.data.collate builds them)
ITEM_FEATURE = "item_id"
TIME_FEATURE = "timestamp"
