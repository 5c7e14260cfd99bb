"""Typed model configuration shared by FuXi-alpha, its ablations and the baselines.

Every value the forward pass reads lives here, so a run is fully described by one dataclass. Each field
declares its type, choices and range once (a pydantic dataclass: checked when the config is built, and
again by pipeline/train/config.py's `validate` for the whole training tree); the rules that tie fields
together sit in `_check_shapes`, beside them.
Defaults are the official ML-1M FuXi-alpha configuration (fuxi-sampled-softmax-n128-final.gin), except
`ffn_out_init_scale` (0.0 here, 1.0 in the official code; docs/QUALITY.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

Architecture = Literal["fuxi", "hstu", "sasrec", "llama", "esasrec"]
Channel = Literal["pos", "ts", "sem"]

# range annotations shared by the config trees (pipeline/train/config.py renders them in its errors)
AtLeast1 = Annotated[int, Field(ge=1)]
AtLeast0 = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]
# unknown fields are refused; an instance passed where a config is expected is checked again
TREE = ConfigDict(extra="forbid", revalidate_instances="always")


@dataclass(config=TREE)
class ModelConfig:
    architecture: Architecture = "fuxi"
    num_items: Annotated[int, Field(ge=2)] = 3953  # rows in the item table = max item id + 1; id 0 is padding
    embedding_dim: AtLeast1 = 50  # D
    num_layers: AtLeast1 = 2
    num_heads: AtLeast1 = 1  # H
    dqk: AtLeast1 = 50  # per-head query/key width
    dv: AtLeast1 = 50  # per-head value width
    ffn_multiply: Positive = 1.0  # d_FFN = int(D * ffn_multiply); 1 on ML-1M, 4 on ML-20M
    max_sequence_length: AtLeast1 = 200  # history kept per user
    # The official code pads to max_sequence_length + gr_output_length (10) + 1 = 211 slots. That
    # constant is N: the size of the position tables and, by default, the 1/n of the semantic channel.
    padded_length: AtLeast1 = 211
    num_time_buckets: AtLeast1 = 128
    time_bucket_divisor: Positive = 0.301  # b = floor(ln(max(|dt|,1)) / 0.301), as in the official code
    input_dropout: Probability = 0.2
    linear_dropout: Probability = 0.2
    # --- FuXi-alpha switches (official code by default, the paper's reading as the alternative) ---
    channels: Annotated[tuple[Channel, ...], Field(min_length=1)] = (
        "pos",
        "ts",
        "sem",
    )  # drop "ts" for the no-temporal-channel ablation
    # "next": dt(i, j) = t[i+1] - t[j] (official: the timestamp of the item being predicted);
    # "query": dt(i, j) = t[i] - t[j] (the paper's Eq. 3).
    time_delta: Literal["next", "query"] = "next"
    # "padded": SiLU(qk)/N with N = padded_length (official); "length": divide by the true sequence length.
    attn_norm: Literal["padded", "length"] = "padded"
    ffn_single_stage: bool = False  # paper's "w/o MFFN": stage 1 only
    # scale of the MFFN stage-2 down projection W2 at init (its xavier-uniform draw times this).
    # 1.0: the official init, where at d=50 the SwiGLU branch starts 3.4x the residual it is added to and
    # grows to 7.9x in 50 steps, so FuXi-alpha learns slowly on small data (docs/QUALITY.md); 0.0 (the
    # default, chosen on that evidence): stage 2 starts as the identity and grows in as it learns.
    # Reproducing the official code: model.ffn_out_init_scale=1.0 (benchmarks/reproduce_ml100k.py does).
    ffn_out_init_scale: Annotated[float, Field(ge=0, le=10)] = 0.0
    # scale of FuXi-alpha's temporal-channel weights at init (their official N(0, 0.02) draw times this, so
    # every other weight's draw is unchanged). The temporal channel multiplies the values by these weights
    # directly: a time-gap bucket no training pair reached keeps its init, and under a time split such
    # buckets dominate the channel (docs/QUALITY.md, long gaps); 0.0 makes them contribute nothing.
    time_weight_init_scale: Annotated[float, Field(ge=0, le=10)] = 1.0
    # "ams": multi-channel AMS; "vanilla": one HSTU-style channel with the position/time biases added to
    # the logits (paper's "w/o AMS"; with ffn_single_stage it is the paper's "Base").
    attention: Literal["ams", "vanilla"] = "ams"
    # --- baselines ---
    sasrec_ffn_hidden: AtLeast1 = 50
    llama_positions: Literal["rope", "learned"] = "rope"
    # --- execution (same function, different speed; see model/jagged.py and model/attention.py) ---
    # Every encoder runs on jagged tokens in length groups; `kernel` picks only the attention core:
    # "fast": causal row chunks, bucketed weights gathered once, hand-written backward (the default);
    # "reference": the padded einsums, its slow twin. Outputs equal within fp32 rounding.
    kernel: Literal["reference", "fast"] = "fast"
    fast_chunk: AtLeast1 = 64  # query rows per chunk of the fast core
    # dropout masks: "fast" a cheaper draw of F.dropout's distribution (model/layers.py), "torch" F.dropout
    dropout_impl: Literal["torch", "fast"] = "fast"
    # rows are split into at most this many groups of similar length, each padded to its own longest row
    # (0 or 1: one group, i.e. the whole batch padded to its longest row)
    length_buckets: AtLeast0 = 4
    # "batch": groups padded to their longest history; "fixed": to padded_length (the official code)
    padding: Literal["batch", "fixed"] = "batch"
    # --- output ---
    l2_norm_eps: Positive = 1e-6
    extra: dict = Field(default_factory=dict)

    @property
    def d_ffn(self) -> int:
        return int(self.embedding_dim * self.ffn_multiply)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.padded_length < self.max_sequence_length + 1:
            raise ValueError(
                f"padded_length must be >= max_sequence_length + 1 = {self.max_sequence_length + 1} "
                f"(got {self.padded_length})"
            )
        if self.d_ffn < 1:
            raise ValueError(
                f"ffn_multiply gives a {self.d_ffn}-wide MFFN (embedding_dim {self.embedding_dim})"
            )
        return self
