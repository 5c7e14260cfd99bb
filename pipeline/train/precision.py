"""Mixed precision: what the run's `amp` resolves to, chosen once at start-up.

`amp=auto` (the default):
  CUDA  bf16 when the device supports it (`torch.cuda.is_bf16_supported()`), else fp32.
  CPU   bf16 only when the CPU computes bf16 natively (AVX512-BF16 or AMX: the `flags` of /proc/cpuinfo,
        or the capability torch reports) *and* a probe shows it faster for this model: `PROBE_STEPS`
        forward/backward steps of a throwaway copy of the model (the run's model config, its first
        training batch, its negatives and loss) in fp32 and in bf16, interleaved after one warm-up step of
        each, the fastest of each kept; bf16 is chosen when fp32 takes at least `MIN_SPEEDUP` times as
        long. Without native bf16 the CPU emulates it (slower than fp32), so there is no probe; nor for an
        item table over `PROBE_MAX_TABLE_BYTES` (a copy of it would not fit beside the run's): fp32.
`amp=none` / `amp=bf16` are taken as given. The choice, why, and the probe's timings go into the run's
MLflow params (`amp.*`) and train.json (`amp`). The probe leaves the run untouched: its own model, its
own generators (the global RNG state is restored) and the data position put back.

Quality: bf16 trains as well as fp32 within what 3-4 seeds resolve on ML-100K with the official recipe
(docs/ML100K.md: paired differences +0.0012, +0.0008, -0.0009 NDCG@10); the tuned recipes were not
measured in both precisions over 3 seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PROBE_STEPS = 3  # timed forward/backward steps per precision
MIN_SPEEDUP = 1.05  # bf16 must be at least this much faster than fp32 (the probe's noise is a few %)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of native bf16 units
# the probe builds a whole copy of the model in one process: above this table size it is not run (the
# run then stays fp32 unless `amp=bf16` is set)
PROBE_MAX_TABLE_BYTES = 1 << 30


Probe = Callable[[], tuple[float, float]]  # -> (fp32, bf16) seconds per step


@dataclass(frozen=True)
class AmpChoice:
    requested: str  # the config's value: auto | none | bf16
    resolved: str  # none | bf16: what the run trains in
    reason: str
    native_bf16: bool | None = None  # CPU only: AVX512-BF16 / AMX present (None: not asked)
    probe_fp32_ms: float | None = None  # the probe's fastest step in each precision (None: no probe)
    probe_bf16_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_params(self) -> dict[str, str]:
        """MLflow params: `amp.resolved`, `amp.reason`, ... (absent values left out)."""
        return {f"amp.{k}": str(v) for k, v in asdict(self).items() if k != "requested" and v is not None}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None, capability: str | None = None) -> bool:
    """Whether the CPU has bf16 arithmetic units: a native flag, or a capability torch names AMX/BF16."""
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return bool(flags & NATIVE_BF16_FLAGS) or any(k in capability.upper() for k in ("AMX", "BF16"))


def choose_amp(
    requested: str,
    device_type: str,
    native: Callable[[], bool] = native_bf16,
    probe: Probe | None = None,
    cuda_bf16: Callable[[], bool] = lambda: torch.cuda.is_bf16_supported(),
) -> AmpChoice:
    """The rule above. `probe()` returns (fp32, bf16) seconds per step; it runs only when needed."""
    if requested in ("none", "bf16"):
        return AmpChoice(requested, requested, "set in the config")
    if requested != "auto":
        raise ValueError(f"amp: unknown value {requested!r}; choose auto, none or bf16")
    if device_type == "cuda":
        ok = cuda_bf16()
        return AmpChoice(requested, "bf16" if ok else "none", f"CUDA, bf16 {'' if ok else 'un'}supported")
    if not native():
        return AmpChoice(requested, "none", "CPU without native bf16 (AVX512-BF16 / AMX)", native_bf16=False)
    if probe is None:
        reason = "CPU with native bf16, no probe (item table too large to copy): set amp=bf16 to use it"
        return AmpChoice(requested, "none", reason, native_bf16=True)
    fp32, bf16 = probe()
    faster = fp32 >= MIN_SPEEDUP * bf16
    reason = f"CPU with native bf16; probe: bf16 {fp32 / bf16:.2f}x fp32's speed (needs >= {MIN_SPEEDUP})"
    return AmpChoice(
        requested,
        "bf16" if faster else "none",
        reason,
        native_bf16=True,
        probe_fp32_ms=round(fp32 * 1e3, 3),
        probe_bf16_ms=round(bf16 * 1e3, 3),
    )


Step = Callable[[torch.dtype | None], None]  # one forward/backward step in fp32 (None) or a dtype


def probe_step_times(step: Step, steps: int = PROBE_STEPS) -> tuple[float, float]:
    """(fp32, bf16) seconds of `step(dtype)`: one warm-up of each, then `steps` of each interleaved, the
    fastest of each (the least disturbed by other work on a shared machine)."""
    for dtype in (None, torch.bfloat16):
        step(dtype)
    best: dict[torch.dtype | None, float] = {None: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(steps):
        for dtype in (None, torch.bfloat16):
            t0 = time.perf_counter()
            step(dtype)
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[None], best[torch.bfloat16]


def model_probe(cfg: Any, data: Any, num_rows: int, device: torch.device) -> Probe | None:
    """A probe of the run's model: `cfg` the TrainConfig, `data` its training batches (position restored
    afterwards), `num_rows` the item rows negatives come from. None: the table is too large to copy."""
    if cfg.model.num_items * cfg.model.embedding_dim * 4 > PROBE_MAX_TABLE_BYTES:
        return None
    from model.loss import NegativeSampler, sampled_softmax_loss
    from model.recommender import build_model

    def probe() -> tuple[float, float]:
        position = data.state_dict()
        try:
            batch = next(iter(data.epoch(0))).to(device)
        finally:
            data.load_state_dict(position)
        sampler = NegativeSampler(
            cfg.loss.num_negatives, cfg.loss.negatives, low=1, high=num_rows, dedup=cfg.loss.dedup_negatives
        )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = build_model(cfg.model, device=device)
            model.train()
            generator = torch.Generator(device=device)

            def step(dtype: torch.dtype | None) -> None:
                generator.manual_seed(0)
                negatives = sampler.sample(batch.history_lengths(), generator)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    out = model(batch.seq, negatives.lookup)
                    loss = sampled_softmax_loss(out, negatives, cfg.loss.temperature).float()
                loss.backward()
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            return probe_step_times(step)

    return probe
