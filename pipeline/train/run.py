"""Entry point: config -> process group -> data -> sharded model -> Trainer.fit() -> checkpoint -> close.

One code path for every world size: without torchrun the process is a world of one
(pipeline/train/distributed.py). Each rank reads the data and trains on its slice of every global
batch; only rank 0 logs to MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import storage
from model.loss import NegativeSampler
from pipeline.data.batches import SequenceBatches, temporal_batches
from pipeline.data.checks import check_sequences
from pipeline.data.sequences import PROTOCOLS, SequenceData, read_sequences
from pipeline.data.synthetic import synthetic_sequences
from pipeline.data.vocab import VOCAB_FILE, check_vocabulary
from pipeline.train.builder import ParallelModel, build_parallel_model
from pipeline.train.checkpoint import Checkpointer, RunCheckpoints, read_meta
from pipeline.train.config import TrainConfig, to_dict, to_flat_dict, validate
from pipeline.train.distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    teardown,
)
from pipeline.train.evaluate import evaluate_sharded
from pipeline.train.grow import warm_start
from pipeline.train.precision import AmpChoice, choose_amp, model_probe
from pipeline.train.tracking import MetricLogger, MLflowLogger, NullLogger
from pipeline.train.trainer import DistInfo, Trainer

if TYPE_CHECKING:
    from pipeline.data.stream import ShardBatches


def load_data(cfg: TrainConfig) -> SequenceData:
    """The training data, checked before a model is sized from it: the item table's size and every item
    id (check_sequences), and the vocabulary it names against that table, since every checkpoint ships a
    copy of it."""
    if cfg.data.source == "synthetic":
        return synthetic_sequences(cfg.data.synthetic)
    data = check_sequences(read_sequences(cfg.data.source), cfg.data.source)
    if data.vocab:
        check_vocabulary(data.vocab, data.num_items, table="the data's item table (num_items)")
    return data


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


RUN_RECORD = "mlflow_run.json"  # in the run directory: the MLflow run every attempt of the job logs to
CHECKPOINTS = "checkpoints"  # in the run directory: the Checkpointer's root


def make_logger(
    cfg: TrainConfig, data: SequenceData, run_dir: str | None = None, amp: AmpChoice | None = None
) -> MetricLogger:
    """Rank 0's MLflow run. With a run directory, one run per job: a resumed attempt that finds a
    checkpoint continues the run its record names (the curve goes on where the checkpoint left it); an
    attempt that finds none marks the earlier run KILLED and starts a new one. `amp`: the precision the
    run chose (params `amp.*` of a new run; a continued run's attempt records its own as tags, since
    MLflow params never change)."""
    if not cfg.tracking.enabled:
        return NullLogger()
    record = storage.join(run_dir, RUN_RECORD) if run_dir is not None else None
    found = record is not None and storage.is_file(record)
    previous = json.loads(storage.read_bytes(record)) if record is not None and found else None
    resumable = (
        cfg.resume and run_dir is not None and Checkpointer(storage.join(run_dir, CHECKPOINTS)).latest()
    )
    continued = None
    if previous is not None:
        if resumable:
            continued = previous["run_id"]
        else:
            MLflowLogger.end_run(previous["run_id"], cfg.tracking.uri, "KILLED")
    logger = MLflowLogger(
        cfg.tracking.experiment,
        cfg.tracking.run_name or cfg.name,
        cfg.tracking.uri,
        parent_run_id=cfg.tracking.parent_run_id,
        run_id=continued,
    )
    amp_params = amp.to_params() if amp is not None else {}
    if continued is None:
        logger.log_params({**to_flat_dict(cfg), **amp_params})
        logger.set_tags({"git_commit": git_commit(), "data.meta": json.dumps(data.meta, default=str)[:5000]})
    attempt = (previous or {}).get("attempt", 0) + 1 if continued else 1
    # attempts that reached this point; torchrun restarts of the job (some may have died before it)
    logger.set_tags(
        {"fuxi.attempt": str(attempt), "fuxi.restarts": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}
    )
    if continued is not None and amp_params:
        logger.set_tags({f"fuxi.attempt{attempt}.{k}": v for k, v in amp_params.items()})
    if record is not None:  # one PUT, or a temporary file renamed over it: never a torn record
        storage.write_bytes(record, json.dumps({"run_id": logger.run_id, "attempt": attempt}).encode())
    return logger


def load_model_weights(
    model: torch.nn.Module,
    checkpoint: str | Path,
    optimizer: Any | None = None,
    init_optimizer_state: Any | None = None,
) -> str:
    """Warm start: the model part of a checkpoint (folder, or a root), resharded by DCP into `model`:
    a plain model in one process, or the DMP of a sharded one (every rank calls it). The item table may
    have grown since (new rows keep their init); with `optimizer` its state is loaded too
    (pipeline/train/grow.py). Returns the resolved checkpoint's URI."""
    return warm_start(model, checkpoint, optimizer, init_optimizer_state)


def negative_rows(cfg: TrainConfig, data: SequenceData, train: Any) -> int:
    """The item rows negatives are drawn from (1..high-1). Under a time cut, only the rows the training
    split reaches: items that first appear after the cut (the newest rows: rows are given in order of
    arrival) keep a cold start's initialisation instead of being pushed down as negatives only."""
    if cfg.data.protocol == "temporal" and isinstance(train, SequenceBatches):
        return max(train.data.max_item(), 1) + 1
    return data.num_items


def build_batches(
    cfg: TrainConfig, data: SequenceData, rank: int = 0, world_size: int = 1
) -> dict[str, SequenceBatches | ShardBatches]:
    if cfg.data.protocol == "temporal":
        if cfg.data.stream:
            raise ValueError("data.stream is not supported with data.protocol=temporal (in-memory only)")
        return dict(
            temporal_batches(
                data,
                cfg.data.cut,
                cfg.data.window_seconds,
                cfg.batch_size,
                cfg.eval_batch_size,
                cfg.model.max_sequence_length,
                seed=cfg.seed,
                rank=rank,
                world_size=world_size,
                batch_tokens=cfg.data.batch_tokens,
            )
        )
    drops = PROTOCOLS[cfg.data.protocol]
    splits: dict[str, SequenceBatches | ShardBatches] = {
        split: SequenceBatches(
            data,
            drop,
            cfg.batch_size if split == "train" else cfg.eval_batch_size,
            cfg.model.max_sequence_length,
            shuffle=split == "train",
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            batch_tokens=cfg.data.batch_tokens if split == "train" else 0,
        )
        for split, drop in drops.items()
    }
    if cfg.data.stream:
        from pipeline.data.stream import ShardBatches

        if cfg.data.batch_tokens:
            raise ValueError(
                "data.batch_tokens is not supported with data.stream (the stream batches by users)"
            )
        if storage.is_file(cfg.data.source) or not storage.exists(cfg.data.source):
            raise ValueError(
                f"data.stream needs a shard directory (fuxi data build-sequences), got {cfg.data.source}"
            )
        splits["train"] = (
            ShardBatches(  # same Batch stream API, read shard by shard with a resumable position
                cfg.data.source,
                cfg.batch_size,
                cfg.model.max_sequence_length,
                drop_last_items=drops["train"],
                shuffle=True,
                seed=cfg.seed,
                rank=rank,
                world_size=world_size,
                backend=cfg.data.stream_backend,
                prefetch=cfg.data.stream_prefetch,
            )
        )
    return splits


def run(cfg: TrainConfig, device: str = "cpu", logger: MetricLogger | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint; the same code in one process and under torchrun with N ranks.
    `logger`: used on this rank instead of the default (MLflow on rank 0, nothing elsewhere)."""
    validate(cfg)  # before any process group, data or model: a bad value fails in one line
    ctx = init_distributed(device, cfg.dist_timeout_seconds)
    try:
        return _run(cfg, ctx, logger)
    finally:
        teardown(ctx)


def _run(cfg: TrainConfig, ctx: DistContext, logger: MetricLogger | None) -> dict[str, Any]:
    data = load_data(cfg)
    if cfg.model.num_items != data.num_items:
        cfg.model = dataclasses.replace(cfg.model, num_items=data.num_items)
    splits = build_batches(cfg, data, ctx.rank, ctx.world_size)
    # amp=auto: decided on rank 0 (a probe of this model when the CPU has native bf16), the same on all ranks
    amp = None
    if ctx.is_main:
        amp = _resumed_amp(cfg)  # a resumed run keeps the precision it trained in
        if amp is None:
            probe = model_probe(cfg, splits["train"], negative_rows(cfg, data, splits["train"]), ctx.device)
            amp = choose_amp(cfg.amp, ctx.device.type, probe=probe)
    amp = broadcast_object(amp)
    assert isinstance(amp, AmpChoice)
    pm = build_parallel_model(
        cfg.model, cfg.parallel, cfg.optim, ctx.device, cfg.seed, batch_size=cfg.batch_size
    )
    if logger is None:
        logger = make_logger(cfg, data, cfg.run_dir or None, amp) if ctx.is_main else NullLogger()
    else:  # a caller's logger: a new run, the amp choice among its params
        logger.log_params(amp.to_params())
    status = "FAILED"
    try:
        report = _train(cfg, ctx, data, splits, pm, logger, amp)
        status = "FINISHED"
        return report
    finally:
        logger.close(status)


def _resumed_amp(cfg: TrainConfig) -> AmpChoice | None:
    """amp=auto on a resumed job: the choice its latest checkpoint recorded (None: nothing to resume)."""
    if cfg.amp != "auto" or not (cfg.resume and cfg.run_dir):
        return None
    latest = Checkpointer(storage.join(cfg.run_dir, CHECKPOINTS)).latest()
    recorded = read_meta(latest).get("amp") if latest else None
    if not recorded:
        return None
    return dataclasses.replace(AmpChoice(**recorded), reason=f"resumed: {recorded['reason']}")


def _train(
    cfg: TrainConfig,
    ctx: DistContext,
    data: SequenceData,
    splits: dict[str, Any],
    pm: ParallelModel,
    logger: MetricLogger,
    amp: AmpChoice,
) -> dict[str, Any]:
    run_dir = cfg.run_dir or storage.join(
        cfg.output_dir, cfg.name, logger.run_id or time.strftime("%Y%m%d-%H%M%S"), field="run directory"
    )
    run_dir = str(broadcast_object(run_dir))
    ckpt = RunCheckpoints(
        storage.join(run_dir, CHECKPOINTS),
        pm.dmp,
        pm.optimizer,
        pm.init_optimizer_state,
        meta={
            "config": to_dict(cfg),
            "world_size": ctx.world_size,
            "sharding": pm.table_sharding(),
            "mlflow_run_id": logger.run_id,
            "amp": amp.to_dict(),
        },
        # the rows -> raw item ids map travels with every checkpoint (top-k, serving speak raw ids)
        files={VOCAB_FILE: data.vocab} if data.vocab else None,
        keep=cfg.keep_checkpoints,
    )
    trainer = Trainer(
        model=pm.model,
        optimizer=pm.optimizer,
        sampler=NegativeSampler(
            cfg.loss.num_negatives,
            cfg.loss.negatives,
            low=1,
            high=negative_rows(cfg, data, splits["train"]),
            dedup=cfg.loss.dedup_negatives,
        ),
        data=splits["train"],
        evaluate=lambda split: evaluate_sharded(pm, splits[split], ctx.device),
        cfg=cfg,
        dist=DistInfo(ctx.rank, ctx.world_size, ctx.device, all_reduce_sum),
        logger=logger,
        checkpointer=ckpt,
        amp=amp.resolved,
    )
    resumed = trainer.resume() if cfg.resume else None
    if resumed is not None:
        logger.set_tags({"resumed_from": resumed})
    elif cfg.init_checkpoint:  # a new run from a checkpoint's weights (and optimizer state): its own step 0
        init = load_model_weights(
            pm.dmp,
            cfg.init_checkpoint,
            pm.optimizer if cfg.init_optimizer else None,
            pm.init_optimizer_state,
        )
        logger.set_tags({"init_checkpoint": str(init), "init_optimizer": str(cfg.init_optimizer)})
    report = trainer.fit()
    report["amp"] = amp.to_dict()
    final = ckpt.save_final(trainer.state_dict(), report)
    if ctx.is_main:  # MLflow logs local files: the train.json of the final checkpoint, through a copy
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "train.json")
            storage.copy_file(storage.join(final, "train.json"), local)
            logger.log_artifacts(local)
    report.update(
        checkpoint=str(final),
        run_id=logger.run_id,
        run_dir=run_dir,
        world_size=ctx.world_size,
        resumed_from=resumed,
        sharding=pm.table_sharding(),
        parameters=pm.num_parameters(),
        users={s: b.num_rows() for s, b in splits.items()},
        skipped_users={s: b.skipped_users for s, b in splits.items()},
        history=trainer.state.history,
    )
    return report
