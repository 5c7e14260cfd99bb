"""Trainer: the training step, the evaluation schedule and model selection. Receives built components.

Protocols (see pipeline/sequences.py):
  validated  evaluate the validation split every `eval_every_epochs`; keep the weights of the best
             validation NDCG@10; at the end load them and report the test split once.
  anchor     the official code: evaluate the test split every epoch, report the last epoch (the
             best-on-test epoch is also logged, marked optimistic, as the official code offers no other).

Distributed: each rank trains on its slice of the global batch. The loss each rank backpropagates is
world_size * (sum of its position losses) / (global number of positions); with gradients averaged over
ranks (see pipeline/parallelize.py) that is the gradient of the global mean, as in one process. Randomness is a pure
function of (seed, step, rank): negatives are drawn from a generator reseeded every step (with rank 0's
seed on every rank in the shared mode, so all ranks score the same R negatives as one process would),
and dropout from the global generator reseeded every step, from a different seed stream (`step_seed`).
Resuming at step k therefore needs no saved generator state, and a run resumed on another world size
draws the same shared negatives.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from model.loss import NegativeSampler, sampled_softmax_loss
from model.recommender import SequentialRecommender
from pipeline.data.collate import Batch
from pipeline.train.tracking import MetricLogger, NullLogger

SELECT_METRIC = "ndcg_at_10"


DROPOUT_STREAM, NEGATIVES_STREAM = 0, 1


def step_seed(seed: int, step: int, rank: int = 0, stream: int = DROPOUT_STREAM) -> int:
    """A 63-bit seed that depends on (seed, step, rank, stream) only. Dropout and negatives use different
    streams: seeded alike, the two generators would replay the same random numbers (on rank 0, and on
    every rank with shared negatives), tying the dropout masks to the negative ids."""
    state = np.random.SeedSequence([seed, step, rank, stream]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


@dataclass
class TrainState:
    """Everything about the loop's position that a checkpoint must restore (with the model and optimizer)."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # data position: batches of the current epoch already trained
    best_metric: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        self.history = list(state.get("history", []))


AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16}


class Trainer:
    def __init__(
        self,
        model: SequentialRecommender,
        optimizer: torch.optim.Optimizer,
        sampler: NegativeSampler,
        train_batches: Callable[[int, int], Iterable[Batch]],  # (epoch, start batch) -> batches
        steps_per_epoch: int,
        evaluate: Callable[[str], dict[str, float]],  # split name -> metrics
        protocol: str,
        temperature: float,
        epochs: int,
        eval_every_epochs: int = 1,
        logger: MetricLogger | None = None,
        log_every_steps: int = 10,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: bool = True,
        on_epoch_end: Callable[["Trainer"], None] | None = None,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,  # sum over ranks (None: one process)
        seed: int | None = None,  # per-step reseeding of negatives and dropout (None: generators run on)
        rank: int = 0,
        world_size: int = 1,
        keep_best: Callable[[], None] | None = None,  # store the current weights as the best (default: in memory)
        restore_best: Callable[[], None] | None = None,  # load them back into the model
        amp: str = "none",  # "bf16": forward + loss under autocast (TrainConfig.amp)
    ) -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.amp_dtype = AMP_DTYPES[amp]
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.train_batches = train_batches
        self.steps_per_epoch = steps_per_epoch
        self.evaluate = evaluate
        self.protocol = protocol
        self.temperature = temperature
        self.epochs = epochs
        self.eval_every_epochs = eval_every_epochs
        self.logger = logger or NullLogger()
        self.log_every_steps = log_every_steps
        self.generator = generator
        self.device = torch.device(device)
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.reduce_sum = reduce_sum
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.keep_best = keep_best or self._keep_best_in_memory
        self.restore_best = restore_best or self._restore_best_from_memory
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.epoch_seconds: list[float] = []

    # ------------------------------------------------------------------------------------------
    def _reseed(self) -> None:
        if self.seed is None:
            return
        step = self.state.step
        torch.manual_seed(step_seed(self.seed, step, self.rank))  # dropout: differs per rank
        if self.generator is not None:
            shared = self.sampler.mode == "shared"
            rank = 0 if shared else self.rank
            self.generator.manual_seed(step_seed(self.seed, step, rank, NEGATIVES_STREAM))

    def train_step(self, batch: Batch) -> float:
        """One optimizer step; returns the global mean loss (the same on every rank)."""
        batch = batch.to(self.device)
        self._reseed()
        negatives = self.sampler.sample(batch.history_lengths(), self.generator)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(batch.seq, negatives.lookup)
            loss_mean = sampled_softmax_loss(out, negatives, self.temperature).float()
        positions = float(out.user_TD.shape[0])
        totals = torch.stack([torch.tensor(positions, device=loss_mean.device), loss_mean.detach() * positions])
        if self.reduce_sum is not None:
            totals = self.reduce_sum(totals.double()).to(loss_mean.dtype)
        loss = loss_mean * (positions * self.world_size / totals[0])  # gradients are averaged over ranks
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.step += 1
        return (totals[1] / totals[0]).item()

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        losses = []
        start = self.state.batch_in_epoch
        bar = tqdm(
            self.train_batches(epoch, start), total=self.steps_per_epoch - start,
            desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress, leave=False, dynamic_ncols=True,
        )
        for batch in bar:
            loss = self.train_step(batch)
            self.state.batch_in_epoch += 1
            losses.append(loss)
            if self.state.step % self.log_every_steps == 0:
                self.logger.log({"train/loss": loss}, self.state.step)
            bar.set_postfix(loss=f"{loss:.4f}")
        self.state.batch_in_epoch = 0
        return sum(losses) / max(len(losses), 1)

    def _keep_best_in_memory(self) -> None:
        self.best_weights = copy.deepcopy(self.model.state_dict())

    def _restore_best_from_memory(self) -> None:
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)

    def _select_split(self) -> str:
        return "valid" if self.protocol == "validated" else "test"

    def fit(self) -> dict[str, Any]:
        split = self._select_split()
        start_epoch = self.state.epoch
        for epoch in range(start_epoch, self.epochs):
            t0 = time.perf_counter()
            mean_loss = self.train_epoch(epoch)
            self.epoch_seconds.append(time.perf_counter() - t0)
            self.state.epoch = epoch + 1
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": mean_loss, "epoch_seconds": self.epoch_seconds[-1]}
            self.logger.log({"train/epoch_loss": mean_loss, "train/epoch_seconds": self.epoch_seconds[-1]}, self.state.step)
            last = epoch + 1 == self.epochs
            if (epoch + 1) % self.eval_every_epochs == 0 or last:
                metrics = self.evaluate(split)
                record.update({f"{split}/{k}": v for k, v in metrics.items()})
                self.logger.log({f"{split}/{k}": v for k, v in metrics.items() if k != "num_users"}, self.state.step)
                if metrics[SELECT_METRIC] > self.state.best_metric:
                    self.state.best_metric, self.state.best_epoch = metrics[SELECT_METRIC], epoch + 1
                    if self.protocol == "validated":
                        self.keep_best()
                if self.progress:
                    tqdm.write(
                        f"epoch {epoch + 1:3d}  loss {mean_loss:.4f}  {split} "
                        + "  ".join(f"{k} {metrics[k]:.4f}" for k in ("hr_at_10", "ndcg_at_10", "mrr"))
                        + f"  ({self.epoch_seconds[-1]:.1f}s)"
                    )
            self.state.history.append(record)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self)
        return self.final_report()

    def final_report(self) -> dict[str, Any]:
        """Test metrics of the selected model, plus timing."""
        report: dict[str, Any] = {"protocol": self.protocol, "epochs": self.state.epoch, "steps": self.state.step}
        if self.protocol == "validated":
            if self.state.best_epoch > 0:
                self.restore_best()
            report["selected_epoch"] = self.state.best_epoch
            report["valid_ndcg_at_10"] = self.state.best_metric
            report["test"] = self.evaluate("test")
        else:
            last = self.state.history[-1]
            report["selected_epoch"] = self.state.epoch
            report["test"] = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("test/")}
            report["best_test_epoch_optimistic"] = self.state.best_epoch
            report["best_test_ndcg_at_10_optimistic"] = self.state.best_metric
        if self.epoch_seconds:
            report["seconds_per_epoch"] = sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.logger.log({f"final_test/{k}": v for k, v in report["test"].items() if k != "num_users"}, self.state.step)
        return report
