"""Typed model configuration shared by FuXi-alpha, its ablations and the baselines.

Every value the forward pass reads lives here, so a run is fully described by one dataclass.
Defaults are the official ML-1M FuXi-alpha configuration (fuxi-sampled-softmax-n128-final.gin), except
`ffn_out_init_scale` (0.0 here, 1.0 in the official code; docs/QUALITY.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Architecture = Literal["fuxi", "hstu", "sasrec", "llama", "esasrec"]
Channel = Literal["pos", "ts", "sem"]


@dataclass
class ModelConfig:
    architecture: Architecture = "fuxi"
    num_items: int = 3953  # rows in the item table = max item id + 1; id 0 is padding
    embedding_dim: int = 50  # D
    num_layers: int = 2
    num_heads: int = 1  # H
    dqk: int = 50  # per-head query/key width
    dv: int = 50  # per-head value width
    ffn_multiply: float = 1.0  # d_FFN = int(D * ffn_multiply); 1 on ML-1M, 4 on ML-20M
    max_sequence_length: int = 200  # history kept per user
    # The official code pads to max_sequence_length + gr_output_length (10) + 1 = 211 slots. That
    # constant is N: the size of the position tables and, by default, the 1/n of the semantic channel.
    padded_length: int = 211
    num_time_buckets: int = 128
    time_bucket_divisor: float = 0.301  # b = floor(ln(max(|dt|,1)) / 0.301), as in the official code
    input_dropout: float = 0.2
    linear_dropout: float = 0.2
    # --- FuXi-alpha switches (official code by default, the paper's reading as the alternative) ---
    channels: tuple[Channel, ...] = ("pos", "ts", "sem")  # drop "ts" for the no-temporal-channel ablation
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
    ffn_out_init_scale: float = 0.0
    # "ams": multi-channel AMS; "vanilla": one HSTU-style channel with the position/time biases added to
    # the logits (paper's "w/o AMS"; with ffn_single_stage it is the paper's "Base").
    attention: Literal["ams", "vanilla"] = "ams"
    # --- baselines ---
    sasrec_ffn_hidden: int = 50
    llama_positions: Literal["rope", "learned"] = "rope"
    # --- execution (same function, different speed; see model/jagged.py and model/attention.py) ---
    # Every encoder runs on jagged tokens in length groups; `kernel` picks only the attention core:
    # "fast": causal row chunks, bucketed weights gathered once, hand-written backward (the default);
    # "reference": the padded einsums, its slow twin. Outputs equal within fp32 rounding.
    kernel: Literal["reference", "fast"] = "fast"
    fast_chunk: int = 64  # query rows per chunk of the fast core
    # dropout masks: "fast" a cheaper draw of F.dropout's distribution (model/layers.py), "torch" F.dropout
    dropout_impl: Literal["torch", "fast"] = "fast"
    # rows are split into at most this many groups of similar length, each padded to its own longest row
    # (0 or 1: one group, i.e. the whole batch padded to its longest row)
    length_buckets: int = 4
    # "batch": groups padded to their longest history; "fixed": to padded_length (the official code)
    padding: Literal["batch", "fixed"] = "batch"
    # --- output ---
    l2_norm_eps: float = 1e-6
    extra: dict = field(default_factory=dict)

    @property
    def d_ffn(self) -> int:
        return int(self.embedding_dim * self.ffn_multiply)

    def __post_init__(self) -> None:
        if self.num_items < 2:
            raise ValueError(f"num_items must be >= 2 (id 0 is padding), got {self.num_items}")
        if self.padded_length < self.max_sequence_length + 1:
            raise ValueError(
                f"padded_length ({self.padded_length}) must hold max_sequence_length + 1 "
                f"({self.max_sequence_length + 1}) positions"
            )
        unknown = set(self.channels) - {"pos", "ts", "sem"}
        if unknown or not self.channels:
            raise ValueError(f"channels must be a non-empty subset of pos, ts, sem; got {self.channels}")
        self.channels = tuple(self.channels)
        if self.kernel not in ("reference", "fast"):
            raise ValueError(f"kernel must be 'reference' or 'fast', got {self.kernel!r}")
        if self.padding not in ("batch", "fixed"):
            raise ValueError(f"padding must be 'batch' or 'fixed', got {self.padding!r}")
        if not 0.0 <= self.ffn_out_init_scale <= 10.0:
            raise ValueError(f"ffn_out_init_scale must be in [0, 10], got {self.ffn_out_init_scale}")
        if self.fast_chunk < 1 or self.length_buckets < 0:
            raise ValueError("fast_chunk must be >= 1 and length_buckets >= 0")
