"""Trainer: the training step, the evaluation schedule and model selection. Receives built components.

Protocols (see pipeline/data/sequences.py):
  validated  evaluate the validation split every `eval_every_epochs`; keep the weights of the best
             validation NDCG@10; at the end load them and report the test split once.
  anchor     the official code: evaluate the test split every epoch, report the last epoch (the
             best-on-test epoch is also logged, marked optimistic, as the official code offers no other).
  temporal   as validated, on the window after the cut; the test split is the window after that. When
             the data has no events there (no "test" split: `evaluate("test")` raises KeyError("test")),
             the report's "test" holds the selected epoch's valid metrics and "test_is_valid" is True.

Distributed: each rank trains on its slice of the global batch. The loss each rank backpropagates is
world_size * (sum of its position losses) / (global number of positions); with gradients averaged over
ranks (see pipeline/train/parallelize.py) that is the gradient of the global mean, as in one process.
Randomness is a pure function of (seed, step, rank): negatives are drawn from a generator reseeded
every step (with rank 0's seed on every rank in the shared mode, so all ranks score the same R
negatives as one process would), and dropout from the global generator reseeded every step, from a
different seed stream (`step_seed`). Resuming at step k therefore needs no saved generator state, and a
run resumed on another world size draws the same shared negatives.

Checkpoints: the trainer decides when (`checkpoint_every_epochs` at epoch ends, after the evaluation;
`checkpoint_every_steps` also mid-epoch) and hands its `state_dict()` (loop state + the data's position)
to the checkpointer, which saves it with the model and optimizer. A run resumed from a mid-epoch
checkpoint continues the epoch at the next batch: no sequence is trained twice or skipped, and every
later step equals the uninterrupted run's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from model.loss import NegativeSampler, sampled_softmax_loss
from model.recommender import SequentialRecommender
from pipeline.data.collate import Batch
from pipeline.train.checkpoint import MemoryCheckpoints
from pipeline.train.config import TrainConfig
from pipeline.train.tracking import MetricLogger, NullLogger

SELECT_METRIC = "ndcg_at_10"


DROPOUT_STREAM, NEGATIVES_STREAM = 0, 1


class NonFiniteLossError(RuntimeError):
    """The global training loss was NaN or infinite: the run stops at that step (nothing is saved)."""


def step_seed(seed: int, step: int, rank: int = 0, stream: int = DROPOUT_STREAM) -> int:
    """A 63-bit seed that depends on (seed, step, rank, stream) only. Dropout and negatives use different
    streams: seeded alike, the two generators would replay the same random numbers (on rank 0, and on
    every rank with shared negatives), tying the dropout masks to the negative ids."""
    state = np.random.SeedSequence([seed, step, rank, stream]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


MAX_HISTORY = 100_000  # epochs a trainer state may record


def check_state(state: Any) -> None:
    """A saved trainer state (train.json's "trainer") has the types and ranges TrainState writes; raises
    ValueError naming the field (the caller names the file)."""
    if not isinstance(state, dict):
        raise ValueError("trainer: expected an object")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, low in (("step", 0), ("epoch", 0), ("batch_in_epoch", 0), ("best_epoch", -1)):
        if key in state and not (is_int(state[key]) and low <= state[key] < 2**53):
            raise ValueError(f"trainer.{key}: expected an integer in {low}..2^53 (got {state[key]!r:.40})")
    for key in ("epoch_loss_sum", "best_metric"):
        value = state.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"trainer.{key}: expected a finite number (got {value!r:.40})")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("trainer.history: expected a list of objects")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"trainer.history: {len(history)} entries, at most {MAX_HISTORY}")
    if "data" in state and not isinstance(state["data"], dict):
        raise ValueError("trainer.data: expected an object")


@dataclass
class TrainState:
    """The loop's position and model-selection record; with the model, optimizer and data position it is
    everything a checkpoint must restore."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # data position: batches of the current epoch already trained
    epoch_loss_sum: float = 0.0  # sum of those batches' losses (the epoch mean survives a mid-epoch resume)
    best_metric: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_loss_sum": self.epoch_loss_sum,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        self.history = list(state.get("history", []))


AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "auto": None}


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The learning-rate factor of optimizer step `step` (0-based) out of `total_steps`: linear warm-up
    (step + 1) / warmup over the first `warmup` steps, then constant, or a cosine / linear decay from 1
    to `min_ratio` at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * progress


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the world; the default is one process on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"
    reduce_sum: Callable[[Tensor], Tensor] | None = None  # sum over ranks (None: one process)


class TrainData(Protocol):
    """The training batches of this rank (pipeline.data.batches.SequenceBatches,
    pipeline.data.stream.ShardBatches)."""

    def __len__(self) -> int: ...  # batches per epoch (the progress bar's total)
    def epoch(self, epoch: int, start_batch: int) -> Iterable[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...  # JSON-able: position and the plan it belongs to
    def load_state_dict(self, state: dict[str, Any]) -> None: ...  # refuses a plan it cannot continue


class Checkpoints(Protocol):
    """Where the trainer's checkpoints go: pipeline.train.checkpoint.RunCheckpoints (DCP on disk) or
    pipeline.train.checkpoint.MemoryCheckpoints (in memory: tests, benchmarks, the default).
      save(step, trainer_state)  model + optimizer + the trainer's JSON-able state, as one checkpoint
      resume()                   the latest into model + optimizer; (where, trainer_state), or None
      save_best() / load_best()  the current weights as the best so far / back into the model
    """

    def save(self, step: int, trainer_state: dict[str, Any]) -> Any: ...
    def resume(self) -> tuple[str, dict[str, Any]] | None: ...
    def save_best(self) -> None: ...
    def load_best(self) -> None: ...


class Trainer:
    def __init__(
        self,
        model: SequentialRecommender,
        optimizer: torch.optim.Optimizer,
        sampler: NegativeSampler,
        data: TrainData,
        evaluate: Callable[[str], dict[str, float]],  # split name -> metrics
        cfg: TrainConfig,  # the run's tree: the loop reads its own fields, the loss's, optim's schedule
        dist: DistInfo = DistInfo(),
        logger: MetricLogger | None = None,
        checkpointer: Checkpoints | None = None,  # None: MemoryCheckpoints(model, optimizer)
        # the precision resolved at start-up (pipeline/train/precision.py: none | bf16); None: cfg.amp,
        # where "auto" without a probe means fp32
        amp: str | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.data = data
        self.evaluate = evaluate
        self.cfg = cfg
        self.dist = dist
        self.device = torch.device(dist.device)
        self.logger = logger or NullLogger()
        self.checkpointer = checkpointer or MemoryCheckpoints(model, optimizer)
        self.amp_dtype = AMP_DTYPES[amp or cfg.amp]
        self.progress = cfg.progress and dist.rank == 0  # one progress bar, on rank 0
        self.generator = torch.Generator(device=self.device)  # negatives; reseeded every step
        self.state = TrainState()
        self.epoch_seconds: list[float] = []
        self.stop_reason: str | None = None  # "patience" or "max_steps" when the run stopped early
        # every param group's configured lr, the base the schedule multiplies (the dense AdamW's groups;
        # a fused table optimizer that exposes no param groups keeps its own constant lr)
        self._base_lrs = [float(g["lr"]) for g in self._param_groups()]

    def _param_groups(self) -> list[dict[str, Any]]:
        return [g for g in getattr(self.optimizer, "param_groups", []) if "lr" in g]

    def total_steps(self) -> int:
        """The step the schedule ends at: the step budget, else epochs * batches per epoch."""
        by_epochs = self.cfg.epochs * len(self.data)
        return min(self.cfg.max_steps, by_epochs) if self.cfg.max_steps > 0 else by_epochs

    def _set_lr(self) -> None:
        optim = self.cfg.optim
        if optim.warmup_steps == 0 and optim.schedule == "constant":
            return  # the official recipe: the optimizer's lr untouched
        factor = lr_multiplier(
            self.state.step, self.total_steps(), optim.warmup_steps, optim.schedule, optim.min_lr_ratio
        )
        for group, base in zip(self._param_groups(), self._base_lrs):
            group["lr"] = base * factor

    # -- what a checkpoint holds besides model and optimizer ------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the loop's state and the data position (identical on every rank)."""
        return {**self.state.state_dict(), "data": self.data.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        if "data" in state:
            self.data.load_state_dict(state["data"])

    def resume(self) -> str | None:
        """Continue from the checkpointer's latest checkpoint, if any; returns where it came from."""
        found = self.checkpointer.resume()
        if found is None:
            return None
        where, state = found
        self.load_state_dict(state)
        return where

    def _save(self) -> None:
        self.checkpointer.save(self.state.step, self.state_dict())
        self.logger.flush()  # the run's record is complete up to every checkpoint a retry resumes from

    # ------------------------------------------------------------------------------------------
    def _reseed(self) -> None:
        seed, step, rank = self.cfg.seed, self.state.step, self.dist.rank
        torch.manual_seed(step_seed(seed, step, rank))  # dropout: differs per rank
        negatives_rank = 0 if self.sampler.mode != "per_position" else rank
        self.generator.manual_seed(step_seed(seed, step, negatives_rank, NEGATIVES_STREAM))

    def train_step(self, batch: Batch) -> float:
        """One optimizer step; returns the global mean loss (the same on every rank)."""
        batch = batch.to(self.device)
        self._reseed()
        negatives = self.sampler.sample(batch.history_lengths(), self.generator)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(batch.seq, negatives.lookup)
            loss_mean = sampled_softmax_loss(out, negatives, self.cfg.loss.temperature).float()
        positions = float(out.user_TD.shape[0])
        totals = torch.stack(
            [torch.tensor(positions, device=loss_mean.device), loss_mean.detach() * positions]
        )
        if self.dist.reduce_sum is not None:
            totals = self.dist.reduce_sum(totals.double()).to(loss_mean.dtype)
        global_loss = (totals[1] / totals[0]).item()  # the same on every rank, so all stop together
        if not math.isfinite(global_loss):
            # before backward and the optimizer step: the weights stay those of the last good step, and the
            # run ends before anything non-finite is checkpointed, selected or promoted
            raise NonFiniteLossError(
                f"training loss is {global_loss} at step {self.state.step + 1} "
                f"(epoch {self.state.epoch + 1}); stopped, the last checkpoint is unchanged"
            )
        loss = loss_mean * (positions * self.dist.world_size / totals[0])  # gradients are averaged over ranks
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._set_lr()
        self.optimizer.step()
        self.state.step += 1
        return global_loss

    def train_epoch(self, epoch: int) -> float:
        """The rest of `epoch` from the current position; returns the epoch's mean loss. With
        `checkpoint_every_steps` a checkpoint follows every such step but an epoch's last (fit() saves
        there, after the evaluation)."""
        cfg = self.cfg
        self.model.train()
        start = self.state.batch_in_epoch
        bar = tqdm(
            self.data.epoch(epoch, start),
            total=len(self.data) - start,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            loss = self.train_step(batch)
            self.state.batch_in_epoch += 1
            self.state.epoch_loss_sum += loss
            if self.state.step % cfg.tracking.log_every_steps == 0:
                self.logger.log({"train/loss": loss}, self.state.step)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self._budget_spent():
                break  # the step budget ends the run here (fit evaluates and selects as at a last epoch)
            if self._step_checkpoint_due() and self.state.batch_in_epoch < len(self.data):
                self._save()
        mean = self.state.epoch_loss_sum / max(self.state.batch_in_epoch, 1)
        self.state.batch_in_epoch, self.state.epoch_loss_sum = 0, 0.0
        return mean

    def _budget_spent(self) -> bool:
        return self.cfg.max_steps > 0 and self.state.step >= self.cfg.max_steps

    def _patience_spent(self) -> bool:
        """Early stopping: the last `patience` evaluations found no better selection metric."""
        cfg = self.cfg
        if cfg.patience <= 0 or not self._selects_on_valid() or self.state.best_epoch < 0:
            return False
        evals_since = (self.state.epoch - self.state.best_epoch) // cfg.eval_every_epochs
        return evals_since >= cfg.patience

    def _step_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every_steps
        return every > 0 and self.state.step % every == 0

    def _epoch_checkpoint_due(self) -> bool:
        every, epoch = self.cfg.checkpoint_every_epochs, self.state.epoch
        last = epoch == self.cfg.epochs or self.stop_reason is not None
        return (every > 0 and (epoch % every == 0 or last)) or self._step_checkpoint_due()

    def _selects_on_valid(self) -> bool:
        return self.cfg.data.protocol in ("validated", "temporal")

    def _select_split(self) -> str:
        return "valid" if self._selects_on_valid() else "test"

    def fit(self) -> dict[str, Any]:
        split = self._select_split()
        start_epoch = self.state.epoch
        for epoch in range(start_epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            mean_loss = self.train_epoch(epoch)
            self.epoch_seconds.append(time.perf_counter() - t0)
            self.state.epoch = epoch + 1
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": mean_loss,
                "epoch_seconds": self.epoch_seconds[-1],
            }
            self.logger.log(
                {"train/epoch_loss": mean_loss, "train/epoch_seconds": self.epoch_seconds[-1]},
                self.state.step,
            )
            if self._budget_spent():
                self.stop_reason = "max_steps"
            last = epoch + 1 == self.cfg.epochs or self.stop_reason is not None
            if (epoch + 1) % self.cfg.eval_every_epochs == 0 or last:
                metrics = self.evaluate(split)
                record.update({f"{split}/{k}": v for k, v in metrics.items()})
                self.logger.log(
                    {f"{split}/{k}": v for k, v in metrics.items() if k != "num_users"}, self.state.step
                )
                if math.isfinite(metrics[SELECT_METRIC]) and metrics[SELECT_METRIC] > self.state.best_metric:
                    self.state.best_metric, self.state.best_epoch = metrics[SELECT_METRIC], epoch + 1
                    if self._selects_on_valid():
                        self.checkpointer.save_best()
                flush = getattr(self.logger, "flush", None)
                if flush is not None:  # per-epoch metrics visible at once (a tuner prunes on them)
                    flush()
                if self.progress:
                    tqdm.write(
                        f"epoch {epoch + 1:3d}  loss {mean_loss:.4f}  {split} "
                        + "  ".join(f"{k} {metrics[k]:.4f}" for k in ("hr_at_10", "ndcg_at_10", "mrr"))
                        + f"  ({self.epoch_seconds[-1]:.1f}s)"
                    )
            self.state.history.append(record)
            if self.stop_reason is None and self._patience_spent():
                self.stop_reason = "patience"
            if self._epoch_checkpoint_due():
                self._save()
            if self.stop_reason is not None:
                break
        return self.final_report()

    def _test_metrics(self, report: dict[str, Any]) -> dict[str, float]:
        """The test split's metrics; temporal data without a test window: the selected valid metrics."""
        try:
            return self.evaluate("test")
        except KeyError as exc:
            if self.cfg.data.protocol != "temporal" or exc.args != ("test",):
                raise
        report["test_is_valid"] = True
        selected = next((r for r in self.state.history if r["epoch"] == self.state.best_epoch), {})
        return {k.split("/", 1)[1]: v for k, v in selected.items() if k.startswith("valid/")}

    def final_report(self) -> dict[str, Any]:
        """Test metrics of the selected model, plus timing."""
        report: dict[str, Any] = {
            "protocol": self.cfg.data.protocol,
            "epochs": self.state.epoch,
            "steps": self.state.step,
        }
        if self.stop_reason is not None:
            report["stopped_early"] = self.stop_reason
        if self._selects_on_valid():
            if self.state.best_epoch > 0:
                self.checkpointer.load_best()
            report["selected_epoch"] = self.state.best_epoch
            report["valid_ndcg_at_10"] = self.state.best_metric
            report["test"] = self._test_metrics(report)
        else:
            last = self.state.history[-1]
            report["selected_epoch"] = self.state.epoch
            report["test"] = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("test/")}
            report["best_test_epoch_optimistic"] = self.state.best_epoch
            report["best_test_ndcg_at_10_optimistic"] = self.state.best_metric
        if self.epoch_seconds:
            report["seconds_per_epoch"] = sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.logger.log(
            {f"final_test/{k}": v for k, v in report["test"].items() if k != "num_users"}, self.state.step
        )
        return report
