"""Where one training step spends its time, by operator and by stage: before (reference) and after (fast).

    .venv/bin/python benchmarks/profile_step.py                       # FuXi-alpha, L=200 and 800, B=32
    .venv/bin/python benchmarks/profile_step.py --arch hstu --lengths 200 --top 15
    .venv/bin/python benchmarks/profile_step.py --anchor              # also the official recipe at B=128
                                                                      # and the best one with its loss

For each (recipe, length): `torch.profiler` over `--steps` training steps (after one warm-up step) of the
real model (TorchRec table, sampled softmax, AdamW; as Trainer.train_step), then
  * stages: forward (embedding lookup + encoder + padding), encoder alone, loss, backward, optimizer;
  * operator groups: matmul, gather/scatter, elementwise & reductions, copies/allocations;
  * the top operators by self CPU time.
Percentages are within one profile; absolute times on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
from bench_throughput import (
    ANCHOR,
    BEST,
    KUAIRAND_ITEMS,
    REFERENCE,
    ModelStep,
    _autocast,
    make_rows,
    model_config,
)
from torch.profiler import ProfilerActivity, profile, record_function

GROUPS = {
    "matmul": (
        "mm",
        "bmm",
        "baddbmm",
        "addmm",
        "addmm_",
        "matmul",
        "linear",
        "baddbmm_",
        "_scaled_dot_product",
    ),
    "gather/scatter": (
        "index_select",
        "index",
        "scatter_add_",
        "index_put_",
        "_index_put_impl_",
        "embedding",
        "gather",
        "scatter",
        "take",
        "masked_select",
        "nonzero",
        "repeat_interleave",
    ),
    "copies/alloc": (
        "copy_",
        "cat",
        "stack",
        "clone",
        "contiguous",
        "zeros",
        "empty",
        "fill_",
        "zero_",
        "new_zeros",
        "to",
        "_to_copy",
        "pad",
        "constant_pad_nd",
        "full",
    ),
}
STAGES = ("forward", "encoder", "loss", "backward", "optimizer")


def group_of(name: str) -> str:
    op = name.removeprefix("aten::")
    for group, ops in GROUPS.items():
        if op in ops or any(op.startswith(o) for o in ops if o.startswith("_")):
            return group
    if name.startswith("aten::"):
        return "elementwise/reduce/other"
    return "python/autograd/other"


def instrumented(step: ModelStep) -> ModelStep:
    """Wrap the encoder's forward in a profiler range (the model code carries no profiling hooks)."""
    enc = step.model.encoder
    inner = enc.forward

    def wrapped(*a, **kw):
        with record_function("encoder"):
            return inner(*a, **kw)

    enc.forward = wrapped
    return step


def one_step(step: ModelStep, rows) -> None:
    step.model.train()
    seq = step._seq(rows)
    neg = step.sampler.sample(rows.lengths - 1, step.gen)
    with _autocast(step.device, step.amp):  # recipe.amp="bf16": as Trainer with TrainConfig.amp
        with record_function("forward"):
            out = step.model(seq, neg.lookup)
        with record_function("loss"):
            loss = step.loss_fn(out, neg, 0.05)
    step.opt.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        step.opt.step()


def profile_recipe(
    label: str, arch: str, recipe, length: int, batch: int, steps: int, top: int, padded: int | None
):
    rng = np.random.default_rng(0)
    rows = make_rows(np.full(batch, length), KUAIRAND_ITEMS, rng)
    step = instrumented(
        ModelStep(
            model_config(arch, length, KUAIRAND_ITEMS, recipe, padded),
            recipe,
            torch.device("cpu"),
            None,
            False,
        )
    )
    one_step(step, rows)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            one_step(step, rows)
    events = prof.key_averages()
    stage_us = {e.key: e.cpu_time_total for e in events if e.key in STAGES}
    ops = [e for e in events if e.key not in STAGES and not e.key.startswith("ProfilerStep")]
    total_self = sum(e.self_cpu_time_total for e in ops)
    by_group: dict[str, float] = defaultdict(float)
    for e in ops:
        by_group[group_of(e.key)] += e.self_cpu_time_total
    step_ms = sum(stage_us.get(s, 0.0) for s in ("forward", "loss", "backward", "optimizer")) / steps / 1e3
    print(
        f"\n--- {label}: {arch}, L={length}, B={batch}, kernel={recipe.kernel}, negatives={recipe.negatives}"
        f", padding={recipe.padding}, length_buckets={recipe.length_buckets} ---"
    )
    print(
        f"step ~{step_ms:.0f} ms (profiled)   stages: "
        + "  ".join(f"{s} {100 * stage_us.get(s, 0.0) / steps / 1e3 / step_ms:.0f}%" for s in STAGES)
    )
    print(
        "operator groups (self time): "
        + "  ".join(
            f"{g} {100 * t / total_self:.0f}%" for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])
        )
    )
    print(f"{'top operators':40s} {'self %':>7s} {'self ms/step':>12s} {'calls/step':>10s}")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(
            f"{e.key[:40]:40s} {100 * e.self_cpu_time_total / total_self:7.1f} "
            f"{e.self_cpu_time_total / steps / 1e3:12.2f} {e.count / steps:10.0f}"
        )
    return {"step_ms": step_ms, "groups": dict(by_group), "stages": stage_us}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="fuxi", choices=["fuxi", "hstu", "sasrec", "esasrec", "llama"])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[200, 800])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="0 = torch's default (see bench_throughput.py)")
    p.add_argument("--anchor", action="store_true", help="also profile the official recipe (B=128, L=200)")
    p.add_argument(
        "--reference-max-len", type=int, default=400, help="skip the slow reference above this length"
    )
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    summary = {}
    for length in args.lengths:
        if length <= args.reference_max_len:
            summary[("before", length)] = profile_recipe(
                "BEFORE (reference kernels)",
                args.arch,
                REFERENCE,
                length,
                args.batch,
                args.steps,
                args.top,
                None,
            )
        summary[("after", length)] = profile_recipe(
            "AFTER (fast kernels + length buckets)",
            args.arch,
            BEST,
            length,
            args.batch,
            args.steps,
            args.top,
            None,
        )
    if args.anchor:
        summary[("anchor", 200)] = profile_recipe(
            "ANCHOR (official recipe: padded to 211, 128 per-position negatives)",
            args.arch,
            ANCHOR,
            200,
            128,
            1,
            args.top,
            211,
        )
        for key, label, amp in (("best-pp", "", None), ("best-pp-bf16", ", amp=bf16", "bf16")):
            summary[(key, 200)] = profile_recipe(
                "BEST with the anchor's loss (fast kernels, 4 length groups, 128 per-position negatives,"
                f" de-duplicated, fused loss{label})",
                args.arch,
                replace(BEST, negatives="per_position", length_buckets=4, amp=amp),
                200,
                128,
                1,
                args.top,
                211,
            )
    print("\nsummary (profiled ms per step; profiler overhead included):")
    for (label, length), s in summary.items():
        print(f"  {label:12s} L={length:4d}  {s['step_ms']:8.0f} ms")


if __name__ == "__main__":
    main()
