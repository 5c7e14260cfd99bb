"""Jagged batches and their length groups: the one way every encoder runs.

A jagged tensor is `values_TX` (T = sum of lengths, rows one after another) plus `lengths_B`. The
recommender hands every encoder the history tokens of a batch as jagged `x_TD` plus a `LengthGroups`:
the rows split into groups of similar length (`plan_groups`), each padded only to its own longest row
(or to N under `padding="fixed"`, the official code's padded batches). Per-token layers (projections,
FFN, norms) run on the T real tokens; attention runs group by group on the padded [n, L_g, ...] views.
With one group padded to the batch's longest row this is exactly a padded batch.

Shapes: T jagged tokens, B rows, n rows of one group, L_g that group's width, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lengths_to_offsets(lengths_B: Tensor) -> Tensor:
    offsets = torch.zeros(lengths_B.numel() + 1, dtype=torch.long, device=lengths_B.device)
    offsets[1:] = torch.cumsum(lengths_B.long(), 0)
    return offsets


def row_col(lengths_B: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every jagged value."""
    lengths_B = lengths_B.long()
    rows = torch.repeat_interleave(torch.arange(lengths_B.numel(), device=lengths_B.device), lengths_B)
    starts = lengths_to_offsets(lengths_B)[:-1]
    cols = torch.arange(rows.numel(), device=lengths_B.device) - starts[rows]
    return rows, cols


def jagged_to_padded(values_TX: Tensor, lengths_B: Tensor, width: int) -> Tensor:
    """[T, X] -> [B, width, X]; rows longer than width are an error."""
    rows, cols = row_col(lengths_B)
    out = values_TX.new_zeros((lengths_B.numel(), width) + tuple(values_TX.shape[1:]))
    out[rows, cols] = values_TX
    return out


# --------------------------------------------------------------------------------------------------
# length groups


def plan_groups(
    lengths: np.ndarray, max_groups: int, token_weight: float = 500.0, group_cost: float = 1e5
) -> list[np.ndarray]:
    """Split rows into at most `max_groups` groups of similar length (rows sorted by length, longest first).

    Minimises  sum over groups of  rows_g * (L_g^2 + token_weight * L_g) + group_cost,  L_g the group's
    longest row, i.e. the padded work of the group: attention pairs ~L^2 per row, per-token layers
    (projections, FFN, norms, dropout) ~L per row, and a fixed cost per encoder call (op dispatch, small
    matmuls). The weights are in units of one attention (query, key) pair; the defaults were measured
    for FuXi-alpha/HSTU at d=50 on 2 CPU cores (per-token work ~500 pairs, one call ~1e5 pairs).
    Exact dynamic programme over contiguous runs of the sorted lengths.
    """
    order = np.argsort(-lengths, kind="stable")
    srt = lengths[order].astype(np.float64)
    b = len(srt)
    if b == 0 or max_groups <= 1:
        return [order]
    per_row = srt**2 + token_weight * srt  # cost of a row padded to the length of row s (the group's first)
    # cost[s, e] of rows s..e-1 in one group = (e - s) * per_row[s] + group_cost
    s_idx = np.arange(b)[:, None]
    e_idx = np.arange(1, b + 1)[None, :]
    cost = np.where(e_idx > s_idx, (e_idx - s_idx) * per_row[:, None] + group_cost, np.inf)
    best = cost[0].copy()  # best[e-1]: rows 0..e-1 in one group
    back = [np.zeros(b, dtype=np.int64)]
    for _ in range(1, max_groups):
        # new_best[e] = min over s of best[s-1] + cost[s, e] (s >= 1), or the previous best
        prev = np.concatenate([[np.inf], best[:-1]])  # prev[s] = best for rows 0..s-1
        total = prev[:, None] + cost
        arg = total.argmin(0)
        cand = total[arg, np.arange(b)]
        improved = cand < best
        best = np.where(improved, cand, best)
        back.append(np.where(improved, arg, -1))
    groups, e, g = [], b, len(back) - 1
    while e > 0:
        while g > 0 and back[g][e - 1] == -1:
            g -= 1
        s = int(back[g][e - 1]) if g > 0 else 0
        groups.append(order[s:e])
        e, g = s, g - 1
    return groups[::-1]


@dataclass
class Group:
    """One length group of a jagged batch, padded to its width L_g."""

    tok: Tensor  # int64 [n, L_g]: index of each slot's token in the jagged history (0 on padding)
    valid: Tensor  # bool [n, L_g]
    ts: Tensor  # int64 [n, L_g + 1]: history + target timestamps, zero-padded
    flat: Tensor  # tok[valid]: the group's tokens in row-major order
    _slots: Tensor | None = None  # flat indices of the real slots (`real`), built on first use

    def gather(self, x_TX: Tensor) -> Tensor:
        """Jagged [T, X] -> this group's padded [n, L_g, X], zero on padding."""
        n, lg = self.tok.shape
        return x_TX.index_select(0, self.tok.view(-1)).view(n, lg, -1) * self.valid[..., None]

    def real(self, x_nLX: Tensor) -> Tensor:
        """Padded [n, L_g, ...] -> its real slots [n_real, X] in row-major order (= x[valid], whose backward,
        an accumulating index_put_, is slower on CPU than index_select's index_add_)."""
        if self._slots is None:
            self._slots = self.valid.view(-1).nonzero()[:, 0]
        return x_nLX.reshape(self.valid.numel(), -1).index_select(0, self._slots)


@dataclass
class LengthGroups:
    """A jagged batch's rows in length groups, plus what every block needs to map groups back."""

    groups: list[Group]
    num_tokens: int  # T: real history tokens of the batch
    _last: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def scatter(self, values: list[Tensor], num_rows: int | None = None) -> Tensor:
        """Per-group outputs at the real slots ([n_g, L_g, X][valid]) -> jagged [num_rows, X] (one gather).
        Rows past the T real tokens (`pad_rows` padding) are zero."""
        num_rows = self.num_tokens if num_rows is None else num_rows
        flat = torch.cat([g.flat for g in self.groups])
        real = flat.numel()
        inverse = torch.full((num_rows,), real, dtype=torch.long, device=flat.device)  # -> the zero row
        inverse[flat] = torch.arange(real, device=flat.device)  # every real token is in exactly one group
        if num_rows > real:
            values = [*values, values[0].new_zeros(1, values[0].shape[-1])]
        return torch.cat(values).index_select(0, inverse)

    def last(self) -> tuple[Tensor, Tensor]:
        """(jagged index of every row's last history token, in batch order; the permutation that takes the
        groups' concatenated rows to batch order). Rows are row-major in the jagged tokens, so sorting the
        last tokens sorts the rows."""
        if self._last is None:
            last_tok = torch.cat([g.tok.gather(1, (g.valid.sum(1) - 1)[:, None])[:, 0] for g in self.groups])
            order = torch.argsort(last_tok)
            self._last = (last_tok[order], order)
        return self._last


def length_groups(hist_lengths_B: Tensor, ts_T: Tensor, max_groups: int, min_width: int = 0) -> LengthGroups:
    """Rows grouped by history length (`plan_groups`), each padded to its own longest row, or to
    `min_width` when that is larger (padding="fixed": every group as wide as the official N).

    ts_T: timestamps of history + target, jagged with lengths hist + 1 (the target's timestamp is read by
    the official dt = t[i+1] - t[j]).
    """
    device = ts_T.device
    hist = hist_lengths_B.long()
    hist_off = lengths_to_offsets(hist)
    full_off = hist_off + torch.arange(hist.numel() + 1, device=device)  # rows hold hist + 1 timestamps
    groups = []
    for g in plan_groups(hist.cpu().numpy(), max_groups):
        rows = torch.as_tensor(g, device=device)
        h = hist[rows]
        lg = max(int(h.max()), 1, min_width)
        cols = torch.arange(lg + 1, device=device)
        valid = cols[None, :lg] < h[:, None]
        tok = torch.where(valid, hist_off[rows][:, None] + cols[None, :lg], 0)
        with_target = cols[None, :] <= h[:, None]
        ts_idx = torch.where(with_target, full_off[rows][:, None] + cols[None, :], 0)
        groups.append(Group(tok, valid, torch.where(with_target, ts_T[ts_idx], 0), tok[valid]))
    return LengthGroups(groups, int(hist.sum()))


def fixed_length_groups(num_rows: int, length: int, ts_T: Tensor, min_width: int = 0) -> LengthGroups:
    """`length_groups` of `num_rows` rows that all hold `length` history tokens, in one group, from Python
    ints only (no data-dependent shapes or host syncs): what `torch.export` can trace. Equal to
    `length_groups(full(num_rows, length), ts_T, 1, min_width)`."""
    device = ts_T.device
    lg = max(length, 1, min_width)
    cols = torch.arange(lg + 1, device=device)
    starts = torch.arange(num_rows, device=device)[:, None]
    valid = (cols[None, :lg] < length).repeat(num_rows, 1)
    tok = torch.where(valid, starts * length + cols[None, :lg], 0)
    with_target = (cols[None, :] <= length).repeat(num_rows, 1)
    ts_idx = torch.where(with_target, starts * (length + 1) + cols[None, :], 0)
    flat = tok[:, :length].reshape(-1)  # = tok[valid]: the valid slots are each row's first `length`
    slots = (starts * lg + cols[None, :length]).reshape(-1)  # = valid.view(-1).nonzero(), known shape
    group = Group(tok, valid, torch.where(with_target, ts_T[ts_idx], 0), flat, _slots=slots)
    return LengthGroups([group], num_rows * length)


def gemm_rows(num_tokens: int, device: torch.device) -> int:
    """Rows to pad a jagged batch's T tokens to before the per-token layers: T itself, or on CPU under
    autocast T rounded up to a multiple of 2^(floor(log2 T) - 5) (at most 1/32 more rows). Every step's T
    is new, and oneDNN builds a primitive for each new bf16 matmul shape (+0.7 ms on a 1.8 ms [11200, 50]
    x [50, 300] product, benchmarks/bench_kernels.py; ~30 per-token matmuls a step in a 2-layer
    FuXi-alpha); rounding lets 32 row counts per doubling of T cover every step."""
    if device.type != "cpu" or not torch.is_autocast_enabled(device.type) or num_tokens < 64:
        return num_tokens
    quantum = 1 << (num_tokens.bit_length() - 6)
    return -(-num_tokens // quantum) * quantum


def pad_rows(x_TD: Tensor) -> Tensor:
    """x_TD with zero rows appended up to `gemm_rows` (the per-token layers keep padded rows to themselves:
    attention gathers only real tokens; slice the result back to T)."""
    rows = gemm_rows(x_TD.shape[0], x_TD.device)
    return F.pad(x_TD, (0, 0, 0, rows - x_TD.shape[0])) if rows > x_TD.shape[0] else x_TD


# --------------------------------------------------------------------------------------------------
# the two ways a stack consumes a jagged batch


def run_jagged_blocks(
    blocks: nn.ModuleList, x_TD: Tensor, batch: LengthGroups, plans: list[Any], last_only: bool
) -> Tensor:
    """FuXi-alpha/HSTU: every block takes jagged tokens and the attention plan of each length group
    (`block(x_TD, batch, plans, last_only)`; plans[i] belongs to batch.groups[i], built once per batch by
    the stack and shared by every layer). Token rows are padded to `gemm_rows` while training; with
    last_only (evaluation) the final block computes only each row's last token and the result is [B, D],
    else [T, D]."""
    if not last_only:  # training: per-token matmul shapes from a small set (see gemm_rows)
        x_TD = pad_rows(x_TD)
    for i, block in enumerate(blocks):  # called as modules: FSDP2 unshards in the forward pre-hook
        x_TD = block(x_TD, batch, plans, last_only=last_only and i == len(blocks) - 1)
    return x_TD if last_only else x_TD[: batch.num_tokens]


def run_padded_groups(
    encoder: Callable[[Tensor, Tensor, Tensor], Tensor], x_TD: Tensor, batch: LengthGroups, last_only: bool
) -> Tensor:
    """SASRec/LLaMa: `encoder(x [n, L_g, D], valid [n, L_g], ts [n, L_g + 1])` on each group's padded
    view, real rows written back in jagged order. Exact: a row's outputs depend on its own items and
    relative positions, never on the padded width. Returns [T, D], or each row's last token [B, D]."""
    values = [g.real(encoder(g.gather(x_TD), g.valid, g.ts)) for g in batch]
    y = batch.scatter(values, x_TD.shape[0])
    return y[batch.last()[0]] if last_only else y
