"""Inference: a checkpoint loaded as a model on one process (`serving.loading`), exact and faiss top-k
(`item_index`), batch recommendations over Ray Data (`recommend`), the MLflow pyfunc and its HTTP app
(`pyfunc`), the model registry (`registry`) and torch.export of the user encoder (`export`). It reads
checkpoints through model/ and pipeline/; nothing below it imports it."""
