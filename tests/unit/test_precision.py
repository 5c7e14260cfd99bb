"""amp=auto: the choice rule under forced CPU flags and probe timings, explicit values taken as given, the
probe's timing order (the record in a run's params and train.json: tests/integration/test_run_record.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pipeline.train.precision import MIN_SPEEDUP, choose_amp, cpu_flags, native_bf16, probe_step_times


def no_probe() -> tuple[float, float]:
    raise AssertionError("the probe must not run here")


def probe_of(fp32: float, bf16: float):
    return lambda: (fp32, bf16)


def test_cpu_without_native_bf16_stays_fp32_without_probing() -> None:
    choice = choose_amp("auto", "cpu", native=lambda: False, probe=no_probe)
    assert (choice.resolved, choice.native_bf16, choice.probe_fp32_ms) == ("none", False, None)


@pytest.mark.parametrize(
    "fp32, bf16, resolved",
    [
        (0.200, 0.100, "bf16"),
        (0.200, 0.200 / MIN_SPEEDUP, "bf16"),
        (0.200, 0.195, "none"),
        (0.1, 0.3, "none"),
    ],
)
def test_cpu_with_native_bf16_follows_the_probe(fp32: float, bf16: float, resolved: str) -> None:
    choice = choose_amp("auto", "cpu", native=lambda: True, probe=probe_of(fp32, bf16))
    assert choice.resolved == resolved and choice.native_bf16 is True
    assert (choice.probe_fp32_ms, choice.probe_bf16_ms) == (round(fp32 * 1e3, 3), round(bf16 * 1e3, 3))
    params = choice.to_params()
    assert params["amp.resolved"] == resolved and params["amp.probe_fp32_ms"] == str(round(fp32 * 1e3, 3))


@pytest.mark.parametrize("supported, resolved", [(True, "bf16"), (False, "none")])
def test_cuda_takes_bf16_where_supported(supported: bool, resolved: str) -> None:
    choice = choose_amp("auto", "cuda", native=no_probe, probe=no_probe, cuda_bf16=lambda: supported)
    assert choice.resolved == resolved and choice.probe_bf16_ms is None


@pytest.mark.parametrize("requested", ["none", "bf16"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_values_are_taken_as_given(requested: str, device: str) -> None:
    # a probe that would pick the other precision is never asked
    choice = choose_amp(requested, device, native=lambda: True, probe=no_probe, cuda_bf16=lambda: False)
    assert (choice.requested, choice.resolved, choice.reason) == (requested, requested, "set in the config")
    with pytest.raises(ValueError, match="amp: unknown value 'fp8'"):
        choose_amp("fp8", device)


def test_native_bf16_reads_the_flags_and_the_capability(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in cpu_flags(info) and cpu_flags(tmp_path / "missing") == frozenset()
    assert native_bf16(cpu_flags(info), "AVX512")
    assert native_bf16(frozenset({"amx_bf16", "amx_tile"}), "AVX512")
    assert not native_bf16(frozenset({"avx2", "avx512f"}), "AVX512")
    assert native_bf16(frozenset(), "AMX") and not native_bf16(frozenset(), "DEFAULT")


def test_probe_keeps_each_precisions_fastest_step() -> None:
    calls = []

    def step(dtype) -> None:
        calls.append(dtype)
        time.sleep(0.02 if dtype is None else 0.005)

    fp32, bf16 = probe_step_times(step, steps=2)
    assert calls == [None, torch.bfloat16] * 3  # a warm-up of each, then interleaved
    assert 0.02 <= fp32 < 0.2 and 0.005 <= bf16 < 0.02


def test_no_probe_of_a_table_too_large_to_copy() -> None:
    from types import SimpleNamespace

    from pipeline.train.precision import PROBE_MAX_TABLE_BYTES, model_probe

    rows = PROBE_MAX_TABLE_BYTES // (4 * 64) + 1
    cfg = SimpleNamespace(model=SimpleNamespace(num_items=rows, embedding_dim=64))
    assert model_probe(cfg, data=None, num_rows=rows, device=torch.device("cpu")) is None
    choice = choose_amp("auto", "cpu", native=lambda: True, probe=None)
    assert choice.resolved == "none" and "amp=bf16" in choice.reason
