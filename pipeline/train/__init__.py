"""The training path: config, parallelism plan, Trainer, evaluation, DCP checkpoints, tracking, entry point
(`pipeline.train.run.run`), and `serving.loading`: the one way to load a checkpoint as a model."""
