"""Sampled softmax with N uniformly drawn negatives over the whole catalogue.

Two layouts of the negatives:
  per_position  R fresh ids for every supervised position (the official `local` sampler):
                logits [T, 1 + R].
  shared        one set of R ids for the whole batch, scored by every position with one matmul:
                logits [T, 1 + R], lookups O(R).
  full          every item of the candidate range once, as in shared (no sampling): the exact
                softmax over the catalogue, the positive's own column masked (it is the first logit);
                logits [T, 1 + C], for small catalogues.
A negative equal to the position's positive gets logit -5e4 (as the official code; not resampled).
Logits are cosine similarities / temperature (0.05); the loss is the mean over supervised positions.

Per-position negatives are de-duplicated before the table lookup (`dedup=True`, the default): T * R
draws from a catalogue of C items hold at most min(T * R, C) distinct ids, so the table (and, when it
is sharded, the all-to-all) sees each distinct id once and the loss indexes the result. When the
distinct ids are few compared with R (small catalogues: ML-100K has 1,682 items against 25k * 128
draws a step), the loss scores every position against every distinct id with one matmul and gathers
the R sampled logits per row, which is far cheaper than gathering T * R vectors. The sampled ids, the
logits and the loss are exactly those of the as-sampled layout (`dedup=False`, the official code's),
which `tests/unit/test_metrics_loss.py` checks forward and backward.

The de-duplicated per-position loss runs as one fused operator (`_PerPositionSoftmax`): it walks the
positions in chunks small enough for the CPU's L2 cache, scores each chunk, and, since the gradient of a
softmax cross-entropy is known as soon as its probabilities are, computes the gradients of the chunk in
the same pass. Nothing [T, distinct] or [T, R, d]-sized is ever held in memory (the unfused version
wrote, zeroed and re-read 75 MB per step on ML-100K); backward only scales the stored gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchrec import JaggedTensor

from model.recommender import SequenceOutput

NegativeMode = Literal["per_position", "shared", "full"]
MASKED_LOGIT = -5e4
# score all distinct ids with a matmul when there are <= 32 * R of them (measured on CPU at T = 11k,
# R = 128, d = 50: the matmul path is 2.8x faster at 13 * R distinct ids, even at ~59 * R)
DENSE_SCORE_RATIO = 32
# bytes of the per-chunk temporaries of the fused loss ([chunk, distinct] scores or [chunk, R, d]
# gathered rows, in the matmul dtype): 1 MiB, inside the L2 cache. Chosen by A/B runs of whole steps on
# this CPU (scratch scripts, not a project command): in fp32 4x fewer or more elements than 2^18 were
# slower; in bf16 2^19 elements (the same bytes) beat 2^18 and 2^20
CHUNK_BYTES = 1 << 20


@dataclass
class Negatives:
    """One step's negatives: `lookup` goes through the item table, `ids` are what was sampled
    ([T, R] per position, [R] shared) and `index` ([T, R], or None) says which looked-up row holds
    each sampled id (None: the lookup is `ids` in sampled order)."""

    mode: NegativeMode
    lookup: JaggedTensor
    ids: Tensor
    index: Tensor | None = None


def _dedup(offsets: Tensor, low: int, size: int) -> tuple[Tensor, Tensor]:
    """Distinct ids (ascending) among low + offsets (offsets in [0, size)), and each offset's row among
    them."""
    if size <= 4 * offsets.numel():  # dense marks: O(values + catalogue), no sort
        mark = torch.bincount(offsets, minlength=size) > 0
        if bool(mark.all()):  # every id drawn (small catalogues): its row is its offset, no gather
            return torch.arange(low, low + size, device=offsets.device), offsets
        row = torch.cumsum(mark, 0) - 1
        return torch.nonzero(mark)[:, 0] + low, row[offsets]
    distinct, index = torch.unique(offsets, return_inverse=True)
    return distinct + low, index


@dataclass
class NegativeSampler:
    """Draws ids uniformly with replacement from [low, high) (by default every real item id)."""

    num_negatives: int
    mode: NegativeMode
    low: int
    high: int
    dedup: bool = True  # per_position only: look each distinct id up once (same loss, less work)

    def __post_init__(self) -> None:
        if self.mode not in ("per_position", "shared", "full"):
            raise ValueError(f"negative mode must be 'per_position', 'shared' or 'full', got {self.mode!r}")
        if self.high <= self.low:
            raise ValueError(f"empty candidate range [{self.low}, {self.high})")

    def sample(self, history_lengths_B: Tensor, generator: torch.Generator | None = None) -> Negatives:
        lengths = history_lengths_B.long()
        if self.mode == "full":  # every candidate, once: the shared layout over the whole range, no draws
            values = torch.arange(self.low, self.high, device=lengths.device)
            first_row = torch.zeros_like(lengths)
            first_row[0] = values.numel()
            return Negatives("full", JaggedTensor(values=values, lengths=first_row.int()), values)
        R = self.num_negatives
        total = int(lengths.sum().item()) * R if self.mode == "per_position" else R
        size = self.high - self.low
        # randint(low, high) draws low + (bits % size): the same ids as low + randint(0, size)
        offsets = torch.randint(0, size, (total,), generator=generator, device=lengths.device)
        values = offsets + self.low
        first_row = torch.zeros_like(lengths)  # a lookup that is not laid out per user hangs off user 0
        if self.mode == "shared":
            first_row[0] = R
            return Negatives("shared", JaggedTensor(values=values, lengths=first_row.int()), values)
        ids_TR = values.view(-1, R)
        if not self.dedup:
            return Negatives("per_position", JaggedTensor(values=values, lengths=(lengths * R).int()), ids_TR)
        distinct, index = _dedup(offsets, self.low, size)
        first_row[0] = distinct.numel()
        return Negatives(
            "per_position", JaggedTensor(values=distinct, lengths=first_row.int()), ids_TR, index.view(-1, R)
        )


def sampled_softmax_loss(out: SequenceOutput, negatives: Negatives, temperature: float) -> Tensor:
    """`out.negatives_XD` must be the (normalised) embeddings of `negatives.lookup`, in its order."""
    user_TD, target_TD, neg_XD = out.user_TD, out.target_TD, out.negatives_XD
    if neg_XD is None:
        raise ValueError("the model was run without negatives")
    T = user_TD.shape[0]
    pos_T1 = (user_TD * target_TD).sum(-1, keepdim=True)
    if negatives.mode in ("shared", "full"):  # full: the exact softmax over the catalogue
        neg_TR = user_TD @ neg_XD.T
        same = negatives.ids[None, :] == out.target_ids_T[:, None]
    elif negatives.mode == "per_position":
        same = negatives.ids == out.target_ids_T[:, None]
        index = negatives.index
        if index is not None:  # de-duplicated lookup: the fused operator
            dense = neg_XD.shape[0] <= DENSE_SCORE_RATIO * index.shape[1]
            return _PerPositionSoftmax.apply(user_TD, target_TD, neg_XD, index, same, temperature, dense)
        # as sampled: row t * R + r holds ids[t, r]
        neg_TR = torch.einsum("td,trd->tr", user_TD, neg_XD.view(T, -1, user_TD.shape[1]))
    else:
        raise ValueError(f"unknown negative mode {negatives.mode!r}")
    logits = torch.cat([pos_T1, neg_TR], dim=1) / temperature
    logits[:, 1:] = logits[:, 1:].masked_fill(same, MASKED_LOGIT)
    labels = torch.zeros(T, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


class _PerPositionSoftmax(torch.autograd.Function):
    """The de-duplicated per-position loss, fused: mean over t of
    -log softmax([u_t . target_t, u_t . neg[index[t, r]] for r < R] / temperature)[0], with the
    negatives equal to the positive (`same`) masked. Same function and gradients as the unfused
    formula above (tests/unit/test_metrics_loss.py).

    Per chunk of positions, `dense` scores the chunk against every distinct id with one matmul and
    gathers R columns (small catalogues); otherwise it gathers the chunk's R vectors per position.
    The score matmuls run in the autocast dtype when autocast is on (the official code scores under
    bf16 autocast), softmax and gradient accumulation in fp32; the loss is returned in fp32. The
    gradients are computed in forward and stored ([T, d], [distinct, d]); backward scales them.
    """

    @staticmethod
    def forward(ctx, user, target, neg, index, same, temperature: float, dense: bool):
        device = user.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        with torch.autocast(device, enabled=False):
            u_all, t_all, n_all = user.float(), target.float(), neg.float()
            u_mm, n_mm = u_all.to(mm_dtype), n_all.to(mm_dtype)
            T, d = u_all.shape
            R = index.shape[1]
            want_grad = any(ctx.needs_input_grad[:3])
            d_user, d_target = torch.empty_like(u_all), torch.empty_like(t_all)
            low_precision = mm_dtype != torch.float32
            n_mmT = n_mm.T  # the dense product's item operand
            if dense and low_precision:  # oneDNN copies transposed operands: keep them [d, distinct]
                n_mmT, d_negT = n_mmT.contiguous(), n_all.new_zeros(d, n_all.shape[0])
                d_neg = d_negT.T  # a view: the item gradient, accumulated transposed
            else:
                d_neg = torch.zeros_like(n_all)
                d_negT = d_neg.T
            total = u_all.new_zeros(())
            inv_t = 1.0 / temperature
            chunk_elements = CHUNK_BYTES // torch.finfo(mm_dtype).bits * 8
            rows = max(1, chunk_elements // (n_all.shape[0] if dense else R * d))
            if dense and low_precision:  # every chunk [rows, distinct]: one oneDNN primitive
                u_mm = F.pad(u_mm, (0, 0, 0, -T % rows))  # (see model.jagged.gemm_rows)
            for s in range(0, T, rows):
                e = min(T, s + rows)
                u, tg, idx, msk = u_all[s:e], t_all[s:e], index[s:e], same[s:e]
                if dense:
                    u_chunk = u_mm[s : s + rows] if low_precision else u_mm[s:e]
                    full = torch.mm(u_chunk, n_mmT)  # padded rows: zero, dropped
                    scores = full[: e - s]
                    neg_logits = scores.gather(1, idx)
                else:
                    vecs = F.embedding(idx, n_mm)  # [c, R, d]
                    neg_logits = torch.bmm(vecs, u_mm[s:e, :, None])[..., 0]
                logits = torch.cat([(u * tg).sum(-1, keepdim=True), neg_logits.float()], 1).mul_(inv_t)
                logits[:, 1:].masked_fill_(msk, MASKED_LOGIT)
                lse = torch.logsumexp(logits, 1, keepdim=True)
                total += (lse[:, 0] - logits[:, 0]).sum()
                if not want_grad:
                    continue
                # d loss / d logits = (softmax - onehot(0)) / T; then through the 1/temperature scale
                g = logits.sub_(lse).exp_()
                g[:, 0] -= 1.0
                g.mul_(inv_t / T)
                g_pos, g_neg = g[:, :1], g[:, 1:].masked_fill_(msk, 0.0)
                d_target[s:e] = g_pos * u
                if dense:
                    d_full = torch.zeros(full.shape, dtype=torch.float32, device=full.device)  # pyrefly: ignore[unbound-name]
                    d_full[: e - s].scatter_add_(1, idx, g_neg)  # fp32 + one cast: 1.3x faster than in bf16
                    d_full = d_full.to(mm_dtype)
                    d_user[s:e] = torch.mm(d_full, n_mm)[: e - s].float().add_(g_pos * tg)
                    if low_precision:
                        d_negT += torch.mm(u_chunk.T, d_full).float()  # pyrefly: ignore[unbound-name]
                    else:
                        d_neg.addmm_(d_full.T, u)
                else:
                    d_vecs = torch.bmm(g_neg[:, None, :].to(mm_dtype), vecs)[:, 0]  # pyrefly: ignore[unbound-name]
                    d_user[s:e] = d_vecs.float().add_(g_pos * tg)
                    d_neg.index_add_(0, idx.reshape(-1), (g_neg[:, :, None] * u[:, None, :]).reshape(-1, d))
        ctx.save_for_backward(d_user, d_target, d_neg)
        ctx.dtypes = (user.dtype, target.dtype, neg.dtype)
        return total / T

    @staticmethod
    def backward(ctx, grad):  # pyrefly: ignore[bad-override]
        grads = [(g * grad).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)
