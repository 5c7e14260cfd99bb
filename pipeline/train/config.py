"""Run configuration: one typed tree, checked by pydantic, and `section.field=value` overrides.

Every field declares its type, choices (Literal) and range (Field(ge=..., lt=...)) once, on the field;
the rules that tie fields together are validators beside them. Named presets (pipeline/train/presets.py)
build a full `TrainConfig`; the CLI applies dotted overrides (`--set model.num_layers=8 --set
data.cut=2024-01-05`), each value coerced by its field's declared type, which is also how sweeps vary any
field. Every error is one line naming the field: pydantic's errors are rendered by `_one_line`.

The nodes are pydantic dataclasses rather than BaseModels so the rest of the code keeps the dataclass API
(`dataclasses.replace`, `fields`, attribute assignment) that the model, the trainer and the checkpoints
already use; assignment is not checked, `validate` checks the whole tree before anything is built.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import typing
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from model.config import TREE, AtLeast0, AtLeast1, ModelConfig, Positive
from pipeline.data.synthetic import SyntheticConfig

__all__ = ["ConfigError", "ModelConfig", "SyntheticConfig", "TrainConfig"]


class ConfigError(ValueError):
    """A config value that would fail later or train nothing; the message is one line naming the field."""


def _parse_cut(value: Any) -> int | datetime.date | str:
    """data.cut: unix seconds (an int, or its digits), a date (a `date`, or "YYYY-MM-DD": 00:00 UTC) or
    "end" (the last two windows of the data are valid and test)."""
    if value == "end":
        return value
    if isinstance(value, datetime.date) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            try:
                return datetime.date.fromisoformat(text)
            except ValueError:
                pass
    raise ValueError("must be a date YYYY-MM-DD, unix seconds or 'end'")


Cut = Annotated[
    int | datetime.date | str,
    PlainValidator(_parse_cut, json_schema_input_type=str | int),
    PlainSerializer(lambda v: v.isoformat() if isinstance(v, datetime.date) else v, when_used="json"),
]
ShardingType = Literal["row_wise", "table_wise", "column_wise", "data_parallel"]


@dataclass(config=TREE)
class DataConfig:
    # "synthetic" (the embedded generator), a sequence Parquet file (`fuxi data prepare`), or a shard
    # directory (`fuxi data build-sequences`)
    source: str = "synthetic"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    # "anchor" / "validated": leave-one-out by position; "temporal": a global time cut
    # (pipeline/data/temporal.py): train before `cut`, validate on [cut, cut + window_seconds), test on
    # the next window when it has events
    protocol: Literal["anchor", "validated", "temporal"] = "validated"
    # temporal: a date (`--set data.cut=2024-01-05`, 00:00 UTC) or unix seconds (`data.cut=1704412800`);
    # "end": the last two windows before 00:00 UTC after the newest event are valid and test (a global
    # time split, `--set data.cut=end data.window_seconds=1209600` for two weeks each);
    # None: 00:00 UTC of the last day that has events (train on everything before the newest day)
    cut: Cut | None = None
    window_seconds: AtLeast1 = 86400
    # stream the training split of a shard directory (pipeline/data/stream.py) instead of holding it in memory
    stream: bool = False
    stream_backend: Literal["ray", "pyarrow"] = "ray"
    # stream: segments (groups of row groups) read ahead of the one being batched, so a step does not wait
    # on the store; 0 reads each in turn. pyarrow: that many background reads; ray: prefetch_batches
    stream_prefetch: AtLeast0 = 2
    # > 0: training batches hold as many users as fit in this many positions per rank (batch_size is then
    # unused for training); steps cost about the same for any length mix. In-memory sources only.
    batch_tokens: AtLeast0 = 0

    @model_validator(mode="after")
    def _check_synthetic_lengths(self) -> DataConfig:
        syn = self.synthetic
        if self.source == "synthetic" and syn.min_length > syn.max_length:
            raise ValueError(
                f"synthetic.min_length ({syn.min_length}) must be <= synthetic.max_length ({syn.max_length})"
            )
        return self


@dataclass(config=TREE)
class LossConfig:
    num_negatives: AtLeast1 = 128  # unused by negatives="full"
    # "per_position": num_negatives fresh uniform ids per position (official); "shared": one set for the
    # batch; "full": every catalogue item is a negative (exact softmax over the catalogue: [positions,
    # items] logits, affordable for small catalogues such as ML-100K's 1,682 items)
    negatives: Literal["per_position", "shared", "full"] = "shared"
    temperature: Positive = 0.05
    dedup_negatives: bool = True  # per_position: look each distinct id up once (same loss, less work)


@dataclass(config=TREE)
class OptimConfig:
    lr: Positive = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: Positive = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0  # AdamW's decoupled decay (official ML-1M gin: 0)
    # learning-rate schedule, a multiplier of lr (and of parallel.embedding_lr) per optimizer step:
    # linear warm-up from lr/warmup_steps to lr over the first warmup_steps steps, then "constant"
    # (official: no warm-up, constant), or "cosine" / "linear" decay to min_lr_ratio * lr at the last step
    # (the run's step budget: max_steps, else epochs * batches per epoch)
    warmup_steps: AtLeast0 = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("must be two values in [0, 1)")
        return betas


@dataclass(config=TREE)
class ParallelConfig:
    """How pipeline/train/parallelize.py shards the model (the dense FuXi blocks are always FSDP2-sharded)."""

    # How the item table is split, as TorchRec sharding types the planner may choose from:
    #   row_wise / table_wise / column_wise: model parallel, each rank holds a part; the optimizer is
    #     fused into the backward (fbgemm TBE), which needs embedding_dim % 4 == 0
    #   data_parallel: every rank holds the whole table, its gradient is all-reduced and the dense AdamW
    #     updates it: exactly the official optimizer (fbgemm's CPU TBE has no Adam); small tables only
    # () = auto: row_wise/table_wise/column_wise on CUDA, data_parallel on CPU or when embedding_dim % 4 != 0
    sharding_types: tuple[ShardingType, ...] = ()
    # optimizer of a model-parallel table (betas/eps/weight_decay from `optim`):
    #   "adam" (CUDA only; updates the rows seen in the batch), "rowwise_adagrad" (CPU and CUDA; one
    #   accumulator per row *of each shard*: column_wise shards change it), "adagrad" (one accumulator
    #   per element: the same under every sharding), "auto": adam on CUDA, rowwise_adagrad on CPU
    embedding_optimizer: Literal["auto", "adam", "rowwise_adagrad", "adagrad"] = "auto"
    embedding_lr: Positive | None = None  # None: optim.lr

    @field_validator("sharding_types")
    @classmethod
    def _replicated_alone(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        if "data_parallel" in types and len(types) > 1:
            raise ValueError("cannot mix data_parallel with model-parallel types")
        return types


@dataclass(config=TREE)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "fuxi-alpha"
    run_name: str | None = None
    parent_run_id: str | None = None  # sweeps: child runs hang under one parent run
    log_every_steps: AtLeast1 = 10


@dataclass(config=TREE)
class TrainConfig:
    name: str = "cpu-demo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    batch_size: AtLeast1 = 128
    eval_batch_size: AtLeast1 = 128
    epochs: AtLeast1 = 101
    eval_every_epochs: AtLeast1 = 1
    seed: AtLeast0 = 42
    output_dir: str = "runs"
    # where checkpoints go; default <output_dir>/<name>/<mlflow run id or timestamp>. Retries of one job
    # share it, and `resume` continues from its latest complete checkpoint.
    run_dir: str | None = None
    resume: bool = False
    checkpoint_every_epochs: AtLeast0 = 1
    # > 0: also checkpoint every this many optimizer steps, mid-epoch included (a streamed epoch resumes
    # at its next batch); 0: at epoch ends only
    checkpoint_every_steps: AtLeast0 = 0
    # bound on process-group set-up and on every collective (a dead peer fails the job, torchrun restarts it)
    dist_timeout_seconds: AtLeast1 = 600
    # step checkpoints kept on disk (the newest N; `best` and `final` are separate); 0: keep all
    keep_checkpoints: AtLeast0 = 3
    # warm start (the nightly job's champion): a new run from a checkpoint's weights; the item table may
    # have grown since (new rows get the cold-start init). The trainer's position is not taken from it.
    init_checkpoint: str | None = None
    # with init_checkpoint: also load its optimizer state (a training checkpoint, step-*: final/best hold
    # the model only); false: weights only, fresh optimizer state
    init_optimizer: bool = True
    progress: bool = True
    # "bf16": forward and loss under torch.autocast(bfloat16) (matmuls in bf16, weights, optimizer and
    # evaluation in fp32). On CPUs with AVX512-BF16 the encoder's d=50 GEMMs run ~4x faster
    # (benchmarks/bench_kernels.py); on GPUs it is the usual setting (the official code scores its loss
    # under bf16 autocast). "none": fp32. "auto": chosen at start-up (pipeline/train/precision.py): bf16
    # on CUDA when supported, on a CPU with native bf16 when a probe of the model shows it faster; the
    # choice is recorded in the run's params (amp.*) and train.json
    amp: Literal["auto", "none", "bf16"] = "auto"
    # early stopping (protocols that select on validation): stop after this many evaluations in a row
    # without a better valid NDCG@10; 0: off (official: always the full epochs)
    patience: AtLeast0 = 0
    # step budget: stop after this many optimizer steps (mid-epoch included; the run then evaluates and
    # selects as at its last epoch); 0: epochs only
    max_steps: AtLeast0 = 0

    @model_validator(mode="after")
    def _check_split_table(self) -> TrainConfig:
        types = self.parallel.sharding_types
        if types and "data_parallel" not in types and self.model.embedding_dim % 4:
            raise ValueError(
                f"parallel.sharding_types {', '.join(types)} need model.embedding_dim % 4 == 0 (fbgemm's "
                f"fused kernels; got {self.model.embedding_dim}): use parallel.sharding_types=data_parallel"
            )
        return self


_TREE = TypeAdapter(TrainConfig)


# ---------------------------------------------------------------------------------------------------
# errors: pydantic's, one line each, naming the field


def _field_info(root: type, loc: tuple[int | str, ...]) -> Any:
    """The FieldInfo at `loc` below the dataclass `root` (None past a list index or an unknown name)."""
    info, node = None, root
    for part in loc:
        fields = getattr(node, "__pydantic_fields__", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return None
        info = fields[part]
        node = info.annotation
    return info


def _bounds(info: Any) -> str:
    """A field's declared range as the errors write it: ">= 1", "> 0", "in [0, 1)"."""
    lo = hi = None
    for c in getattr(info, "metadata", ()):
        if isinstance(c, Ge):
            lo = f"[{c.ge}"
        elif isinstance(c, Gt):
            lo = f"({c.gt}"
        elif isinstance(c, Le):
            hi = f"{c.le}]"
        elif isinstance(c, Lt):
            hi = f"{c.lt})"
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    return ("<= " if hi and hi[-1] == "]" else "< ") + (hi or "?")[:-1]


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_parsing": "a number",
    "bool_parsing": "true or false",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list of values",
}


def _one_line(err: ErrorDetails, root: type = TrainConfig, prefix: str = "") -> str:
    """One pydantic error as "<field> must be ... (got X)"."""
    loc = tuple(err["loc"])
    names = [p for p in loc if isinstance(p, str)]
    key = prefix + ".".join(names)
    value, kind = err.get("input"), err["type"]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key} must be {_bounds(_field_info(root, loc))} (got {value!r})"
    if kind == "literal_error":
        choices = err.get("ctx", {}).get("expected", "").replace(" or ", ", ")
        if loc and isinstance(loc[-1], int):  # an element of a tuple of choices
            return f"{key}: {value!r} is not one of {choices.replace(chr(39), '')}"
        return f"{key} must be one of {choices} (got {value!r})"
    if kind in _TYPE_WORDS:
        return f"{key} must be {_TYPE_WORDS[kind]} (got {value!r})"
    if kind == "too_short":
        return f"{key} must hold at least {err.get('ctx', {}).get('min_length')} value(s) (got {value!r})"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown config field {key!r}"
    if kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        if dataclasses.is_dataclass(value) or isinstance(value, dict):  # a rule across fields: it names them
            return f"{key + '.' if key else ''}{msg}"
        return f"{key} {msg} (got {value!r})"
    return f"{key}: {err['msg']} (got {value!r})"


def _config_error(e: ValidationError, root: type = TrainConfig, prefix: str = "") -> ConfigError:
    return ConfigError(_one_line(e.errors()[0], root, prefix))


# ---------------------------------------------------------------------------------------------------
# validation, overrides, (de)serialisation


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field's type, choices and range, and the rules that tie fields together; raises
    ConfigError naming the field and what it may be. `run` calls it; so does the CLI after overrides."""
    try:
        _TREE.validate_python(cfg, strict=True)
    except ValidationError as e:
        raise _config_error(e) from None
    return cfg


def _coerce(key: str, text: str, info: Any) -> Any:
    """The text of `--set key=text` as a value of the field's declared type (its range: `validate`)."""
    hint = info.annotation
    args = typing.get_args(hint)
    if type(None) in args and text.strip().lower() in ("none", "null"):
        return None
    inner = next((a for a in args if a is not type(None)), hint) if type(None) in args else hint
    value: Any = text.strip()
    if typing.get_origin(inner) is tuple:  # "a,b" or "(a, b)"
        value = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()]
    try:
        return TypeAdapter(hint).validate_python(value)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] in ("literal_error", "value_error", "too_short"):  # a value of the type, not allowed
            index = tuple(p for p in err["loc"] if isinstance(p, int))  # the element of a tuple
            raise ConfigError(_one_line({**err, "loc": index}, dict, key)) from None
        raise ConfigError(f"{key}: cannot use {text!r} ({err['msg']})") from None


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `a.b.c=value` strings in place, each value coerced by its field's declared type; unknown
    fields and values that do not parse are an error naming the field (ranges and rules: `validate`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        key = key.strip()
        *sections, leaf = key.split(".")
        target: Any = cfg
        for part in sections:
            if part not in getattr(target, "__pydantic_fields__", {}):
                raise ConfigError(f"unknown config section {part!r} in override {item!r}")
            target = getattr(target, part)
        info = getattr(target, "__pydantic_fields__", {}).get(leaf)
        if info is None or dataclasses.is_dataclass(info.annotation):
            raise ConfigError(f"unknown config field {key!r} in override {item!r}")
        setattr(target, leaf, _coerce(key, text, info))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The tree as JSON values (tuples as lists, dates as "YYYY-MM-DD"): what train.json stores."""
    return TypeAdapter(type(cfg)).dump_python(cfg, mode="json")


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config from `to_dict` output (a checkpoint's train.json, older ones included: fields
    added since take their defaults). A field that was removed or whose value is no longer allowed fails
    in one line naming it."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise _config_error(e, cls) from None


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config tree to {'model.num_layers': 2, ...} (MLflow params, reports)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, key + "."))
        elif isinstance(value, dict):
            if value:
                out[key] = repr(value)
        else:
            out[key] = value
    return out
