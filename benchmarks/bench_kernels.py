"""The single operators behind docs/PERFORMANCE.md "what changed", each against what it replaced.

    .venv/bin/python benchmarks/bench_kernels.py            # one thread, CPU; ~30 s

Each row times forward + backward (or the op alone) of the new path and its predecessor, interleaved
in one process, and prints the median times and their ratio:
  * per-position loss: the fused operator (model/loss.py `_PerPositionSoftmax`) vs the unfused
    formula it replaced (score all distinct ids, gather R logits; or gather R vectors and bmm),
    T=11,200 positions, R=128, d=50, on 1,682 items (dense path) and 100k items (gather path);
  * dropout mask: `dropout_keep_mask` vs rand_like(x) >= p vs bernoulli_, [11200, 150];
  * a d=50 GEMM [11200, 50] x [50, 300] in fp32 vs bf16 (what `amp=bf16` buys on the linears);
  * chunked attention product q k^T against a key prefix: transposed view vs pre-transposed K;
  * RMSNorm forward + backward: model.layers.rms_norm vs F.rms_norm's autograd, [11200, 150], fp32/bf16;
  * new shapes: a bf16 GEMM / bmm on a shape it has run before vs on a new one (oneDNN builds a primitive
    per shape), and FuXi-alpha's attention core (one layer, fwd+bwd, 8 or 32 rows) on new widths in
    bf16 vs fp32 (why jagged batches pad T with `gemm_rows` and run small groups' cores in fp32);
  * one dtype per elementwise product (u * RMSNorm(attention)) and the loss's gradient scatter in fp32.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from model.attention_fast import ams_channels, build_plan
from model.layers import dropout_keep_mask, rms_norm
from model.loss import DENSE_SCORE_RATIO, MASKED_LOGIT, _PerPositionSoftmax


def timed(fns: dict, rounds: int = 7) -> dict[str, float]:
    """Median ms per call of each function, calls interleaved round by round (one warm-up round)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def report(title: str, ms: dict[str, float]) -> None:
    new, old = list(ms)[0], list(ms)[1:]
    print(
        f"{title:52s} "
        + "  ".join(f"{k} {v:7.2f} ms" for k, v in ms.items())
        + "   "
        + "  ".join(f"{o}/{new} {ms[o] / ms[new]:.2f}x" for o in old)
    )


def unfused_loss(user, target, neg, index, same, temperature, dense):
    """The per-position loss as it was before the fused operator (same function)."""
    pos = (user * target).sum(-1, keepdim=True)
    if dense:
        neg_tr = (user @ neg.T).gather(1, index)
    else:
        neg_tr = torch.bmm(F.embedding(index, neg), user[:, :, None])[..., 0]
    logits = torch.cat([pos, neg_tr], dim=1) / temperature
    logits[:, 1:] = logits[:, 1:].masked_fill(same, MASKED_LOGIT)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))


def bench_loss(catalogue: int, t: int = 11_200, r: int = 128, d: int = 50) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, catalogue, (t, r), generator=g)
    distinct, index = torch.unique(ids, return_inverse=True)
    same = ids == torch.randint(1, catalogue, (t,), generator=g)[:, None]
    base = [F.normalize(torch.randn(n, d, generator=g), dim=-1) for n in (t, t, len(distinct))]
    dense = len(distinct) <= DENSE_SCORE_RATIO * r

    def step(loss_fn):
        def run():
            leaves = [x.clone().requires_grad_(True) for x in base]
            loss_fn(*leaves, index, same, 0.05, dense).backward()

        return run

    ms = timed({"fused": step(_PerPositionSoftmax.apply), "unfused": step(unfused_loss)}, rounds=5)
    report(f"per-position loss fwd+bwd, {catalogue:,} items ({'dense' if dense else 'gather'})", ms)


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    bench_loss(1_683)
    bench_loss(100_000)

    x = torch.randn(11_200, 150)
    report(
        "dropout mask p=0.2, [11200, 150]",
        timed(
            {
                "keep_mask": lambda: dropout_keep_mask(x.shape, 0.2, x.device),
                "rand>=p": lambda: torch.rand_like(x) >= 0.2,
                "bernoulli": lambda: torch.empty_like(x).bernoulli_(0.8),
            }
        ),
    )

    a32, w32 = torch.randn(11_200, 50), torch.randn(300, 50)
    a16, w16 = a32.bfloat16(), w32.bfloat16()
    report("GEMM [11200, 50] x [50, 300]", timed({"bf16": lambda: a16 @ w16.T, "fp32": lambda: a32 @ w32.T}))

    q, k = torch.randn(32, 800, 50), torch.randn(32, 800, 50)
    k_t = k.transpose(1, 2).contiguous()
    report(
        "bmm q[:, 320:384] k[:, :384]^T, fp32",
        timed(
            {
                "pretransposed": lambda: torch.bmm(q[:, 320:384], k_t[:, :, :384]),
                "view": lambda: torch.bmm(q[:, 320:384], k[:, :384].transpose(1, 2)),
            }
        ),
    )

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        xr = torch.randn(11_200, 150).to(dtype).requires_grad_(True)
        gr = torch.randn(11_200, 150).to(dtype)
        report(
            f"RMSNorm fwd+bwd [11200, 150], {name}",
            timed(
                {
                    "layers.rms_norm": lambda xr=xr, gr=gr: torch.autograd.grad(rms_norm(xr), xr, gr),
                    "F.rms_norm": lambda xr=xr, gr=gr: torch.autograd.grad(
                        F.rms_norm(xr, (150,), eps=1e-6), xr, gr
                    ),
                }
            ),
        )
    bench_new_shapes()


def fresh_shapes(new: callable, seen: callable, rounds: int = 9) -> dict[str, float]:
    """Median ms of `seen()` (a shape run before) and `new(i)` (shape i, never run before), interleaved."""
    seen()
    times: dict[str, list[float]] = {"seen shape": [], "new shape": []}
    for i in range(rounds):
        t0 = time.perf_counter()
        seen()
        t1 = time.perf_counter()
        new(i)
        times["seen shape"].append(t1 - t0)
        times["new shape"].append(time.perf_counter() - t1)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_new_shapes() -> None:
    w = torch.randn(50, 300).bfloat16()
    xs = [torch.randn(11_200 + i, 50).bfloat16() for i in range(10)]
    report("bf16 GEMM [~11200, 50] x [50, 300]", fresh_shapes(lambda i: xs[i + 1] @ w, lambda: xs[0] @ w))
    qs = [torch.randn(30 + i, 64, 50).bfloat16() for i in range(10)]
    ks = [torch.randn(30 + i, 50, 192).bfloat16() for i in range(10)]
    report(
        "bf16 bmm [~30, 64, 50] x [~30, 50, 192]",
        fresh_shapes(lambda i: torch.bmm(qs[i + 1], ks[i + 1]), lambda: torch.bmm(qs[0], ks[0])),
    )

    def core(b: int, length: int, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(b)
        ts = torch.cumsum(torch.randint(1, 100_000, (b, length + 1), generator=g), 1)
        plan = build_plan(ts, length, "fuxi", "next", 128, 0.301, 211, 64)
        q, k, v = (torch.randn(b, length, 50, generator=g).to(dtype).requires_grad_(True) for _ in range(3))
        w_pos, w_ts = torch.randn(421, requires_grad=True), torch.randn(129, requires_grad=True)
        out = ams_channels(q, k, v, w_pos, w_ts, torch.full((b,), 1 / 211), plan, ("pos", "ts", "sem"), 1)
        out.float().sum().backward()

    u = torch.randn(12_000, 300).bfloat16()[:, :150]  # u: a column slice of the u/v/q/k projection
    y32 = torch.randn(12_000, 150)
    y16 = y32.bfloat16()
    report(
        "u * RMSNorm(attention), [12000, 150] u a bf16 view",
        timed(
            {
                "bf16 x bf16": lambda: u * y16,
                "bf16 x fp32": lambda: u * y32,
            }
        ),
    )
    idx, src = torch.randint(0, 1682, (311, 128)), torch.rand(311, 128)
    report(
        "loss gradient scatter [311, 1682] <- [311, 128]",
        timed(
            {
                "fp32, then to bf16": lambda: torch.zeros(311, 1682).scatter_add_(1, idx, src).bfloat16(),
                "in bf16": lambda: torch.zeros(311, 1682, dtype=torch.bfloat16).scatter_add_(
                    1, idx, src.bfloat16()
                ),
            }
        ),
    )

    for rows in (8, 32):  # a new width L each call (120, 121, ...): every call a new shape
        widths = iter(range(120, 200))
        report(
            f"AMS core fwd+bwd, {rows} rows, new L~128 each call",
            timed(
                {
                    "fp32": lambda rows=rows, widths=widths: core(rows, next(widths), torch.float32),
                    "bf16": lambda rows=rows, widths=widths: core(rows, next(widths), torch.bfloat16),
                },
                rounds=9,
            ),
        )


if __name__ == "__main__":
    main()
