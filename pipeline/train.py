"""Entry point: config -> data -> model -> Trainer.fit() -> checkpoint -> close."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from model.loss import NegativeSampler
from model.recommender import build_model, count_parameters
from pipeline.checkpoint import Checkpointer, resolve_checkpoint
from pipeline.config import TrainConfig, to_flat_dict
from pipeline.datasets import SequenceBatches
from pipeline.evaluate import evaluate
from pipeline.sequences import PROTOCOLS, SequenceData, read_sequences
from pipeline.synthetic import synthetic_sequences
from pipeline.tracking import MetricLogger, MLflowLogger, NullLogger
from pipeline.trainer import Trainer


def load_data(cfg: TrainConfig) -> SequenceData:
    if cfg.data.source == "synthetic":
        return synthetic_sequences(cfg.data.synthetic)
    return read_sequences(cfg.data.source)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def make_logger(cfg: TrainConfig, data: SequenceData) -> MetricLogger:
    if not cfg.tracking.enabled:
        return NullLogger()
    logger = MLflowLogger(
        cfg.tracking.experiment, cfg.tracking.run_name or cfg.name, cfg.tracking.uri, parent_run_id=cfg.tracking.parent_run_id
    )
    logger.log_params(to_flat_dict(cfg))
    logger.set_tags({"git_commit": git_commit(), "data.meta": json.dumps(data.meta, default=str)[:5000]})
    return logger


def load_model_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Warm start: the model part of a checkpoint (folder, or a root with `latest`), resharded by DCP."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(resolve_checkpoint(checkpoint)))
    model.load_state_dict(state["model"])


def build_batches(cfg: TrainConfig, data: SequenceData, rank: int = 0, world_size: int = 1) -> dict[str, SequenceBatches]:
    drops = PROTOCOLS[cfg.data.protocol]
    return {
        split: SequenceBatches(
            data, drop, cfg.batch_size if split == "train" else cfg.eval_batch_size, cfg.model.max_sequence_length,
            shuffle=split == "train", seed=cfg.seed, rank=rank, world_size=world_size,
        )
        for split, drop in drops.items()
    }


def run(cfg: TrainConfig, device: str = "cpu") -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    data = load_data(cfg)
    if cfg.model.num_items != data.num_items:
        cfg.model = dataclasses.replace(cfg.model, num_items=data.num_items)
    splits = build_batches(cfg, data)
    model = build_model(cfg.model, device=device)
    if cfg.init_checkpoint:
        load_model_weights(model, cfg.init_checkpoint)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    sampler = NegativeSampler(cfg.loss.num_negatives, cfg.loss.negatives, low=1, high=data.num_items)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    logger = make_logger(cfg, data)
    run_dir = Path(cfg.run_dir or Path(cfg.output_dir) / cfg.name / (logger.run_id or time.strftime("%Y%m%d-%H%M%S")))
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        sampler=sampler,
        train_batches=splits["train"].epoch,
        steps_per_epoch=len(splits["train"]),
        evaluate=lambda split: evaluate(model, splits[split].epoch(), device),
        protocol=cfg.data.protocol,
        temperature=cfg.loss.temperature,
        epochs=cfg.epochs,
        eval_every_epochs=cfg.eval_every_epochs,
        logger=logger,
        log_every_steps=cfg.tracking.log_every_steps,
        generator=generator,
        device=device,
        progress=cfg.progress,
    )
    status = "FAILED"
    try:
        report = trainer.fit()
        ckpt = Checkpointer(run_dir / "checkpoints").save(
            trainer.state.step,
            {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer),
             "trainer": trainer.state.state_dict()},
            meta={"config": dataclasses.asdict(cfg), "report": report},
        )
        logger.log_artifacts(ckpt / "train.json")
        report.update(
            checkpoint=str(ckpt), run_id=logger.run_id, parameters=count_parameters(model),
            users={s: b.num_rows() for s, b in splits.items()}, skipped_users={s: b.skipped_users for s, b in splits.items()},
            history=trainer.state.history,
        )
        status = "FINISHED"
        return report
    finally:
        logger.close(status)
