"""Small building blocks shared by FuXi-alpha and HSTU.

Shapes: B batch, L longest history in the batch, D model width, N = padded_length (the size of the
official code's fixed position tables, 211 on MovieLens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _RMSNorm(torch.autograd.Function):
    """Gain-free RMSNorm with a fused backward for CPU: dx = r * (g - y * mean(g * y)), y = x * r,
    r = 1 / rms(x). PyTorch's CPU autograd for F.rms_norm runs ~10 elementwise passes (there is no CPU
    `_fused_rms_norm_backward`); this runs 3 (plus the dtype casts under bf16): forward + backward of a
    [11200, 150] norm 1.44x faster in fp32 and 1.45x in bf16 (benchmarks/bench_kernels.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)
        ctx.save_for_backward(x, rstd)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # pyrefly: ignore[bad-override]
        x, rstd = ctx.saved_tensors
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 in, fp32 math
        xf, gf = x.to(acc), g.to(acc)
        # dx = r g - (r^3 / D) x sum(g x): one row dot, then two passes
        coef = torch.linalg.vecdot(gf, xf).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
        return (gf * rstd).addcmul_(xf, coef, value=-1).to(x.dtype), None


_HAS_FUSED_RMS = hasattr(torch.ops.aten, "_fused_rms_norm")


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim with no learnable gain (the official code calls F.rms_norm bare)."""
    if x.device.type == "cpu" and x.requires_grad and _HAS_FUSED_RMS and torch.is_grad_enabled():
        return _RMSNorm.apply(x, eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim with no affine parameters (HSTU)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def time_buckets(dt: Tensor, num_buckets: int = 128, divisor: float = 0.301) -> Tensor:
    """b(dt) = clamp(floor(ln(max(|dt|, 1)) / divisor), 0, num_buckets); no gradient.

    The official code divides the *natural* log by 0.301 (~log10 2), so the effective base is
    e^0.301 ~ 1.351: 10 s -> 7, 1 min -> 13, 1 h -> 27, 1 day -> 37, 30 days -> 49, 1 year -> 57.
    Computed in float32 as there (torch.log of an int64 tensor), so bucket edges match exactly.
    """
    dt = dt.detach().abs().clamp(min=1).to(torch.float32)
    return (torch.log(dt) / divisor).long().clamp(0, num_buckets)


def time_deltas(ts_BL1: Tensor, length: int, mode: str) -> Tensor:
    """Pairwise time differences [B, L, L] for queries i and keys j.

    ts_BL1 holds each history's timestamps followed by the target's (the official code writes the target
    timestamp at index `history_length`), zero-padded to L + 1 columns.
    mode "next":  dt(i, j) = t[i+1] - t[j]  (official code: the time of the item being predicted)
    mode "query": dt(i, j) = t[i]   - t[j]  (the paper's Eq. 3)
    """
    ts = ts_BL1.long()
    keys = ts[:, None, :length]
    if mode == "next":
        queries = ts[:, 1 : length + 1, None]
    elif mode == "query":
        queries = ts[:, :length, None]
    else:
        raise ValueError(f"unknown time_delta mode {mode!r}; expected 'next' or 'query'")
    return queries - keys


class RelativePositionWeights(nn.Module):
    """Learned scalar per relative distance, shared by all heads: w(i, j) = w[(N-1) + (j - i)].

    The table has 2N - 1 entries as in the official code; under the causal mask only the N entries
    for distances i - j in [0, N-1] are reachable.
    """

    def __init__(self, padded_length: int) -> None:
        super().__init__()
        self.padded_length = padded_length
        self.weight = nn.Parameter(torch.empty(2 * padded_length - 1).normal_(0, 0.02))

    def forward(self, length: int) -> Tensor:
        n = self.padded_length
        idx = torch.arange(length, device=self.weight.device)
        rel = idx[None, :] - idx[:, None]  # j - i, [L, L]
        return self.weight[(n - 1) + rel]


class RelativeTimeWeights(nn.Module):
    """Learned scalar per log-bucketed time gap, shared by all heads: w(i, j) = w[b(dt(i, j))]."""

    def __init__(self, num_buckets: int, divisor: float, mode: str, init_scale: float = 1.0) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.divisor = divisor
        self.mode = mode
        # the official N(0, 0.02) draw, times init_scale (drawn either way: the RNG stream stays the same)
        self.weight = nn.Parameter(torch.empty(num_buckets + 1).normal_(0, 0.02).mul_(init_scale))

    def forward(self, ts_BL1: Tensor, length: int) -> Tensor:
        """[B, L, L] weights of a padded batch (the indexing the attention cores reproduce)."""
        dt = time_deltas(ts_BL1, length, self.mode)
        return self.weight[time_buckets(dt, self.num_buckets, self.divisor)]


def xavier_uniform_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    return layer


class SwiGLU(nn.Module):
    """W2(SiLU(W1 z) * W3 z), no biases, xavier-uniform weights (the official MFFN stage 2).

    out_scale multiplies W2's init (after the same random draw, so 1.0 is bit-identical to the official
    init and other values change nothing else); 0 makes the module output zero at init."""

    def __init__(self, dim: int, hidden: int, out_scale: float = 1.0) -> None:
        super().__init__()
        self.w1 = xavier_uniform_linear(dim, hidden, bias=False)
        self.w3 = xavier_uniform_linear(dim, hidden, bias=False)
        self.w2 = xavier_uniform_linear(hidden, dim, bias=False)
        if out_scale != 1.0:
            with torch.no_grad():
                self.w2.weight.mul_(out_scale)

    def forward(self, z: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(z)) * self.w3(z))


def rotary(x_BLHd: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (LLaMa) on the last dim of [B, L, H, d]; d must be even."""
    _, length, _, d = x_BLHd.shape
    half = d // 2
    freqs = base ** (-torch.arange(half, device=x_BLHd.device, dtype=torch.float32) / half)
    angles = torch.arange(length, device=x_BLHd.device, dtype=torch.float32)[:, None] * freqs[None]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x_BLHd[..., :half], x_BLHd[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    if d % 2:
        rotated = torch.cat([rotated, x_BLHd[..., -1:]], dim=-1)
    return rotated


# --------------------------------------------------------------------------------------------------
# dropout with a cheaper mask


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Bool mask, True w.p. 1 - p (to 1/65536): each element compares 16 random bits with a threshold.
    The bits come four to a 64-bit draw, ~2.3x cheaper on CPU than rand_like(x) >= p and ~5x cheaper
    than bernoulli_."""
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    threshold = round(p * 65536) - 32768  # int16 draws are uniform on [-32768, 32767]
    return (bits.view(torch.int16)[:n] >= threshold).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep = dropout_keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # pyrefly: ignore[bad-override]
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, F.dropout's distribution (keep w.p. 1 - p, p to 1/65536; scale 1 / (1 - p)) with
    a cheaper mask (`dropout_keep_mask`), so the random stream differs from F.dropout's."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout (impl="torch") or `fast_dropout` (impl="fast": the same distribution, a cheaper mask, a
    different random stream): `ModelConfig.dropout_impl` picks; the one place the model chooses between
    the two."""

    def __init__(self, p: float, impl: str) -> None:
        if impl not in ("torch", "fast"):
            raise ValueError(f"dropout impl must be 'torch' or 'fast', got {impl!r}")
        super().__init__(p)
        self.fast = impl == "fast"

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (nn.Dropout's parameter name)
        return fast_dropout(input, self.p, self.training) if self.fast else super().forward(input)
