"""kernel="fast": FuXi-alpha's AMS core and HSTU's attention core, chunked, with a hand-written backward.

The same functions as the padded einsums of model/attention_reference.py (their slow twins), with
  - **causal row chunks**: query rows in chunks of `chunk` rows; chunk [r0, r1) only reads keys [0, r1),
    so the strictly-upper triangle is never computed and every [n, C, r1] temporary stays in cache. Only
    the chunk's diagonal [C, C] block needs a mask.
  - **no key-padding mask**: padded rows of v are zero, so weights on padded keys contribute nothing.
  - **bucketed weights gathered once**: time-gap buckets (and, for HSTU, a combined position x bucket
    index) are computed once per group for all layers (`build_plan`); each layer then does one
    `index_select` from a tiny table per chunk. Masked (future) entries of FuXi's temporal channel point
    to a zero sentinel slot, so the gather itself applies the causal mask.
  - **positional channel as one GEMM**: FuXi's positional weights depend on (i - j) only and are shared
    by heads and rows, so A_pos V is a single [C, r1] x [r1, n*H*dv] matmul per chunk. (An FFT causal
    convolution, O(L log L), was measured slower than this matmul up to L = 800 on CPU.)
  - **hand-written backward** (custom autograd Functions): nothing [L, L]-sized is saved; the backward
    recomputes q k^T per chunk (flash-attention style), uses the fused `silu_backward`, and accumulates
    the bucket/position gradients with `scatter_add_`.
  - **keys and values pre-transposed** once per layer ([n*H, d, L], `_transposed`): the chunk products
    against a key prefix avoid the transposed-view path of CPU batched matmuls (a copy per chunk in bf16).
  - **bf16 with shapes that change every step**: the cores compute in the dtype they are given
    (`model.attention.core_dtype`: fp32 for small groups on CPU) and return their input dtype, so no
    elementwise op mixes bf16 and fp32 (a slow CPU path).

tests/unit/test_fast_paths.py checks every fast core against the reference core, outputs and gradients, over
random jagged lengths, and the hand-written backward with gradcheck.

Shapes: n (or B) rows of a group, L its width, H heads, C active channels, d per-head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.jagged import Group

DEFAULT_CHUNK = 64


# --------------------------------------------------------------------------------------------------
# per-batch plan: chunk bounds and the bucket indices every layer reuses


@dataclass
class FastPlan:
    """Computed once per batch (per length group) and shared by every layer of the stack."""

    length: int  # L
    bounds: list[tuple[int, int]]  # query rows [r0, r1) of each chunk; keys [0, r1)
    index: list[Tensor]  # per chunk, int64 [B, r1 - r0, r1] (see build_plan)
    kind: str  # "fuxi": time bucket with a sentinel on masked pairs; "hstu": distance * (nb+1) + bucket
    num_buckets: int
    padded_length: int  # N, size of the position tables
    triu: Tensor  # bool [C, C], True strictly above the diagonal (the masked part of a diagonal block)


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(r0, min(r0 + chunk, length)) for r0 in range(0, length, chunk)]


def _buckets(ts_BW: Tensor, r0: int, r1: int, mode: str, num_buckets: int, divisor: float) -> Tensor:
    """Time bucket of every (query in [r0, r1), key in [0, r1)) pair, exactly as model.layers.time_buckets."""
    if mode not in ("next", "query"):
        raise ValueError(f"unknown time_delta mode {mode!r}; expected 'next' or 'query'")
    ts = ts_BW.long()
    keys = ts[:, None, :r1]
    queries = ts[:, r0 + 1 : r1 + 1, None] if mode == "next" else ts[:, r0:r1, None]
    dt = (queries - keys).abs_().clamp_(min=1).to(torch.float32)
    return torch.log_(dt).div_(divisor).long().clamp_(0, num_buckets)


@torch.no_grad()
def build_plan(
    ts_BW: Tensor,
    length: int,
    kind: str,
    time_delta: str,
    num_buckets: int,
    divisor: float,
    padded_length: int,
    chunk: int = DEFAULT_CHUNK,
    with_time: bool = True,
) -> FastPlan:
    """Chunk bounds and per-chunk gather indices for a batch whose histories are at most `length` long.

    kind "fuxi": index = time bucket b(dt(i, j)) in [0, nb], or the sentinel nb + 1 where j > i.
    kind "hstu": index = (i - j) * (nb + 1) + b(dt(i, j)) into a combined position x time table
                 (j > i gets distance 0: those entries are masked after the SiLU).
    """
    if length > padded_length:
        raise ValueError(f"sequence length {length} exceeds padded_length {padded_length}")
    if kind not in ("fuxi", "hstu"):
        raise ValueError(f"unknown plan kind {kind!r}")
    bounds = chunk_bounds(length, chunk)
    c = min(chunk, max(length, 1))
    triu = torch.ones(c, c, dtype=torch.bool, device=ts_BW.device).triu(1)
    index = []
    for r0, r1 in bounds if (with_time or kind == "hstu") else []:
        b = _buckets(ts_BW, r0, r1, time_delta, num_buckets, divisor)
        diag = b[:, :, r0:r1]
        if kind == "fuxi":
            diag.masked_fill_(triu[: r1 - r0, : r1 - r0], num_buckets + 1)
        else:
            rows = torch.arange(r0, r1, device=b.device)[:, None]
            dist = (rows - torch.arange(r1, device=b.device)[None, :]).clamp_(min=0)
            b += dist[None] * (num_buckets + 1)
        index.append(b)
    return FastPlan(length, bounds, index, kind, num_buckets, padded_length, triu)


def _pos_index(plan: FastPlan, device: torch.device) -> Tensor:
    """[L, L] index into the 2N-entry extended position table: (N-1) + (j - i) below the diagonal,
    the zero sentinel 2N-1 above it."""
    n, length = plan.padded_length, plan.length
    idx = torch.arange(length, device=device)
    rel = idx[None, :] - idx[:, None]
    return torch.where(rel <= 0, (n - 1) + rel, 2 * n - 1)


def _cat_rows(chunks: list[Tensor]) -> Tensor:
    """Chunks of query rows back into one tensor (no copy when there is a single chunk)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


def _heads(t_BLX: Tensor, h: int) -> Tensor:
    """[B, L, H*d] -> [B*H, L, d] contiguous."""
    b, length, x = t_BLX.shape
    return t_BLX.reshape(b, length, h, x // h).transpose(1, 2).reshape(b * h, length, x // h)


def _unheads(t: Tensor, b: int, h: int) -> Tensor:
    """[B*H, L, d] -> [B, L, H, d] (a view)."""
    _, length, d = t.shape
    return t.view(b, h, length, d).transpose(1, 2)


def _scale_rows(x_BL: Tensor, inv_n: Tensor) -> Tensor:
    """x * inv_n with inv_n [B] (or [1]) broadcast over every trailing dim."""
    return x_BL * inv_n.view((-1,) + (1,) * (x_BL.dim() - 1))


def _apply_core(
    core: type[torch.autograd.Function], q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype | None, *args
) -> Tensor:
    """Run an attention core on q, k, v cast to `dtype` (default v's) with autocast off (the cores cast
    explicitly; autocast must not re-cast their matmuls), and return the result in v's dtype."""
    dtype = dtype or v.dtype
    with torch.autocast(v.device.type, enabled=False):
        return core.apply(q.to(dtype), k.to(dtype), v.to(dtype), *args).to(v.dtype)


# --------------------------------------------------------------------------------------------------
# FuXi-alpha AMS core: [pos, ts, sem] channel outputs per head


def _transposed(t: Tensor) -> Tensor:
    """[X, L, d] -> contiguous [X, d, L]. Batched matmuls against a key-prefix slice of this layout avoid
    the per-chunk copy bf16 (oneDNN) makes of the transposed view t[:, :r1].transpose(1, 2); in fp32 the
    two run alike (benchmarks/bench_kernels.py times one chunk product both ways)."""
    return t.transpose(1, 2).contiguous()


def _silu_chunk_backward(
    s, qh, kh, vT, gh, dkh, dvh, r0: int, r1: int, triu: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of one causal chunk of  out = (SiLU(s) * causal) @ v  (s: the chunk's pre-activation scores
    [B*H, r1 - r0, r1], recomputed by the caller and overwritten here; vT = _transposed(v)). Accumulates
    into dkh and dvh; returns the score gradient (masked) and the chunk's d_q rows."""
    m = triu[: r1 - r0, : r1 - r0]
    d_s = torch.ops.aten.silu_backward(torch.bmm(gh[:, r0:r1], vT[:, :, :r1]), s)
    d_s[:, :, r0:r1].masked_fill_(m, 0.0)
    a = F.silu(s, inplace=True)
    a[:, :, r0:r1].masked_fill_(m, 0.0)
    dvh[:, :r1] += torch.bmm(a.transpose(1, 2), gh[:, r0:r1])
    dkh[:, :r1] += torch.bmm(d_s.transpose(1, 2), qh[:, r0:r1])
    return d_s, torch.bmm(d_s, kh[:, :r1])


class _AMSCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w_pos, w_ts, inv_n, plan: FastPlan, channels: tuple[str, ...], heads: int):
        """q, k: [B, L, H*dqk]; v: [B, L, H*dv] with zero padded rows. Returns [B, L, H, C, dv]."""
        b, length, hdv = v.shape
        h = heads
        dv = hdv // h
        dtype = v.dtype  # bf16 under autocast: the weight tables are cast, gradients accumulate in fp32
        inv_n = inv_n.to(dtype)
        outs = []
        saved = {}
        if "pos" in channels:
            w_ext = torch.cat([w_pos.detach(), w_pos.new_zeros(1)]).to(dtype)
            tp = w_ext[_pos_index(plan, v.device)]  # [L, L], lower-triangular Toeplitz
            vt = v.transpose(0, 1).reshape(length, b * hdv)
            out_t = v.new_empty(length, b * hdv)
            for r0, r1 in plan.bounds:
                torch.mm(tp[r0:r1, :r1], vt[:r1], out=out_t[r0:r1])
            outs.append(out_t.view(length, b, h, dv).transpose(0, 1))
            saved["vt"], saved["tp"] = vt, tp
        if "ts" in channels:
            w_ext = torch.cat([w_ts.detach(), w_ts.new_zeros(1)]).to(dtype)  # sentinel nb+1 -> 0 (masked)
            vc = v.contiguous()
            chunks = []
            for (r0, r1), idx in zip(plan.bounds, plan.index):
                a = w_ext.index_select(0, idx.view(-1)).view(b, r1 - r0, r1)
                chunks.append(torch.bmm(a, vc[:, :r1]))
            outs.append(_cat_rows(chunks).view(b, length, h, dv))
            saved["v"], saved["w_ts_ext"] = vc, w_ext
        if "sem" in channels:
            qh, kh, vh = _heads(q, h), _heads(k, h), _heads(v, h)
            kT = _transposed(kh)
            chunks = []
            triu = plan.triu
            for r0, r1 in plan.bounds:
                a = F.silu(torch.bmm(qh[:, r0:r1], kT[:, :, :r1]), inplace=True)
                a[:, :, r0:r1].masked_fill_(triu[: r1 - r0, : r1 - r0], 0.0)
                chunks.append(torch.bmm(a, vh[:, :r1]))
            sem = _unheads(_cat_rows(chunks), b, h)
            outs.append(_scale_rows(sem, inv_n))
            saved["qh"], saved["kh"], saved["vh"] = qh, kh, vh
        ctx.plan, ctx.channels, ctx.heads, ctx.shape = plan, channels, h, (b, length, hdv, q.shape[-1])
        ctx.keys = list(saved)
        ctx.save_for_backward(inv_n, *saved.values())
        return torch.stack(outs, dim=3)  # [B, L, H, C, dv]

    @staticmethod
    def backward(ctx, grad):  # pyrefly: ignore[bad-override]
        plan, channels, h = ctx.plan, ctx.channels, ctx.heads
        b, length, hdv, hdqk = ctx.shape
        inv_n, *tensors = ctx.saved_tensors
        saved = dict(zip(ctx.keys, tensors))
        f32 = {"device": grad.device, "dtype": torch.float32}
        d_v = torch.zeros(b, length, hdv, **f32)
        d_q = d_k = d_wpos = d_wts = None
        for ci, channel in enumerate(channels):
            g = grad[:, :, :, ci]  # [B, L, H, dv]
            if channel == "pos":
                vt, tp = saved["vt"], saved["tp"]
                gt = g.transpose(0, 1).reshape(length, b * hdv)
                d_tp = grad.new_zeros(length, length)
                d_vt = grad.new_zeros(length, b * hdv)
                for r0, r1 in plan.bounds:
                    d_tp[r0:r1, :r1] = torch.mm(gt[r0:r1], vt[:r1].T)
                    d_vt[:r1].addmm_(tp[r0:r1, :r1].T, gt[r0:r1])
                n = plan.padded_length
                d_ext = torch.zeros(2 * n, **f32).scatter_add_(
                    0, _pos_index(plan, grad.device).view(-1), d_tp.view(-1).float()
                )
                d_wpos = d_ext[:-1]
                d_v += d_vt.view(length, b, hdv).transpose(0, 1)
            elif channel == "ts":
                vc, w_ext = saved["v"], saved["w_ts_ext"]
                gc = g.reshape(b, length, hdv)
                d_ext = torch.zeros(w_ext.numel(), **f32)
                vT = _transposed(vc)
                for (r0, r1), idx in zip(plan.bounds, plan.index):
                    a = w_ext.index_select(0, idx.view(-1)).view(b, r1 - r0, r1)
                    d_a = torch.bmm(gc[:, r0:r1], vT[:, :, :r1])
                    d_ext.scatter_add_(0, idx.view(-1), d_a.view(-1).float())
                    d_v[:, :r1] += torch.bmm(a.transpose(1, 2), gc[:, r0:r1])
                d_wts = d_ext[:-1]
            else:
                qh, kh, vh = saved["qh"], saved["kh"], saved["vh"]
                gh = _heads(_scale_rows(g, inv_n).reshape(b, length, hdv), h)
                dq_chunks = []
                dkh = torch.zeros(kh.shape, **f32)
                dvh = torch.zeros(vh.shape, **f32)
                triu = plan.triu
                kT, vT = _transposed(kh), _transposed(vh)
                for r0, r1 in plan.bounds:
                    s = torch.bmm(qh[:, r0:r1], kT[:, :, :r1])
                    dq_chunks.append(_silu_chunk_backward(s, qh, kh, vT, gh, dkh, dvh, r0, r1, triu)[1])
                d_q = _unheads(_cat_rows(dq_chunks), b, h).reshape(b, length, hdqk)
                d_k = _unheads(dkh.to(grad.dtype), b, h).reshape(b, length, hdqk)
                d_v += _unheads(dvh, b, h).reshape(b, length, hdv)
        return d_q, d_k, d_v.to(grad.dtype), d_wpos, d_wts, None, None, None, None


def ams_channels(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_pos: Tensor | None,
    w_ts: Tensor | None,
    inv_n: Tensor,
    plan: FastPlan,
    channels: tuple[str, ...],
    heads: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """FuXi-alpha's channel outputs [B, L, H, C, dv] in `channels` order (a subset of pos, ts, sem).

    q, k: [B, L, H*dqk]; v: [B, L, H*dv] with padded rows zero; inv_n: [B] or [1], 1/n of the semantic
    channel. dtype: compute dtype (default v's; see `model.attention.core_dtype`); the output has v's dtype
    (so that u * RMSNorm(out) multiplies one dtype: bf16 x fp32 took 1.5-1.8x as long,
    benchmarks/bench_kernels.py). Same function as `model.attention_reference.ams_reference` (its slow twin).
    """
    if plan.kind != "fuxi":
        raise ValueError("ams_channels needs a plan built with kind='fuxi'")
    return _apply_core(_AMSCore, q, k, v, dtype, w_pos, w_ts, inv_n, plan, tuple(channels), heads)


# --------------------------------------------------------------------------------------------------
# HSTU attention core (also FuXi's "vanilla" ablation): SiLU(q k^T + w_pos + w_ts) / n * causal, times v


def _hstu_table(w_pos: Tensor, w_ts: Tensor, plan: FastPlan) -> Tensor:
    """Combined table: entry d * (nb+1) + b = w_pos[(N-1) - d] + w_ts[b], for distances d in [0, L)."""
    n = plan.padded_length
    dist = torch.arange(plan.length, device=w_pos.device)
    return (w_pos[(n - 1) - dist][:, None] + w_ts[None, :]).reshape(-1)


class _HSTUCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w_pos, w_ts, inv_n, plan: FastPlan, heads: int):
        b, length, hdv = v.shape
        h = heads
        table = _hstu_table(w_pos.detach(), w_ts.detach(), plan).to(v.dtype)
        inv_n = inv_n.to(v.dtype)
        qh, kh, vh = _heads(q, h), _heads(k, h), _heads(v, h)
        kT = _transposed(kh)
        chunks = []
        triu = plan.triu
        for (r0, r1), idx in zip(plan.bounds, plan.index):
            s = _hstu_scores(table, idx, qh, kT, r0, r1, b, h)
            a = F.silu(s, inplace=True)
            a[:, :, r0:r1].masked_fill_(triu[: r1 - r0, : r1 - r0], 0.0)
            chunks.append(torch.bmm(a, vh[:, :r1]))
        out = _cat_rows(chunks)
        ctx.plan, ctx.heads = plan, h
        ctx.save_for_backward(inv_n, qh, kh, vh, table)
        return _scale_rows(_unheads(out, b, h), inv_n).reshape(b, length, hdv)

    @staticmethod
    def backward(ctx, grad):  # pyrefly: ignore[bad-override]
        plan, h = ctx.plan, ctx.heads
        inv_n, qh, kh, vh, table = ctx.saved_tensors
        b, length, _ = grad.shape
        gh = _heads(_scale_rows(grad, inv_n), h)
        f32 = {"device": grad.device, "dtype": torch.float32}
        dq_chunks, dkh, dvh = [], torch.zeros(kh.shape, **f32), torch.zeros(vh.shape, **f32)
        d_table = torch.zeros(table.shape, **f32)
        triu = plan.triu
        kT, vT = _transposed(kh), _transposed(vh)
        for (r0, r1), idx in zip(plan.bounds, plan.index):
            s = _hstu_scores(table, idx, qh, kT, r0, r1, b, h)
            d_s, d_q_chunk = _silu_chunk_backward(s, qh, kh, vT, gh, dkh, dvh, r0, r1, triu)
            dq_chunks.append(d_q_chunk)
            d_bias = d_s if h == 1 else d_s.view(b, h, r1 - r0, r1).sum(1)
            d_table.scatter_add_(0, idx.view(-1), d_bias.reshape(-1).float())
        d_table = d_table.view(length, -1)
        n = plan.padded_length
        d_wts = d_table.sum(0)
        d_wpos = torch.zeros(2 * n - 1, **f32)
        d_wpos[(n - 1) - torch.arange(length, device=grad.device)] = d_table.sum(1)

        def unh(t: Tensor) -> Tensor:
            return _unheads(t.to(grad.dtype), b, h).reshape(b, length, -1)

        return unh(_cat_rows(dq_chunks)), unh(dkh), unh(dvh), d_wpos, d_wts, None, None, None


def _hstu_scores(
    table: Tensor, idx: Tensor, qh: Tensor, kT: Tensor, r0: int, r1: int, b: int, h: int
) -> Tensor:
    bias = table.index_select(0, idx.view(-1)).view(b, 1, r1 - r0, r1)
    bias = bias.expand(b, h, r1 - r0, r1).reshape(b * h, r1 - r0, r1)
    return torch.baddbmm(bias, qh[:, r0:r1], kT[:, :, :r1])


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_pos: Tensor,
    w_ts: Tensor,
    inv_n: Tensor,
    plan: FastPlan,
    heads: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """SiLU(q_h k_h^T + w_pos[(N-1)+j-i] + w_ts[b(dt)]) / n, causal, times v_h; [B, L, H*dv], head-major.

    dtype: compute dtype (default v's; see `model.attention.core_dtype`); the output has v's dtype. Same
    function as `model.attention_reference.hstu_reference` (its slow twin).
    """
    if plan.kind != "hstu":
        raise ValueError("hstu_attention needs a plan built with kind='hstu'")
    return _apply_core(_HSTUCore, q, k, v, dtype, w_pos, w_ts, inv_n, plan, heads)


# --------------------------------------------------------------------------------------------------
# the kernel: ModelConfig.kernel="fast"


def fast_plan(group: Group, cfg: ModelConfig, kind: str, with_time: bool) -> FastPlan:
    """`build_plan` for one length group under `cfg`."""
    return build_plan(
        group.ts,
        group.valid.shape[1],
        kind,
        cfg.time_delta,
        cfg.num_time_buckets,
        cfg.time_bucket_divisor,
        cfg.padded_length,
        cfg.fast_chunk,
        with_time=with_time,
    )


class FastKernel:
    """kernel="fast" as a `model.attention.AttentionKernel`."""

    plan = staticmethod(fast_plan)
    ams = staticmethod(ams_channels)
    hstu = staticmethod(hstu_attention)
