"""Full-ranking evaluation: every catalogue item is scored for every user; seen items are filtered.

`evaluate` scores an unsharded model in one process; `evaluate_sharded` gives the same metrics when the
item table is sharded over ranks (each rank scores its shard; the per-shard ranks are summed).

Metrics are means over the evaluation rows (`num_users` counts them). Rows with tags (temporal windows,
pipeline/data/temporal.py: one row per target event) also get `num_targets`, `users/<metric>` (the mean
over users of each user's mean over its targets), and `new_items/<metric>`, `new_users/<metric>` over the
targets whose item / user has no event before the window, with counts `new_items/num_targets`,
`new_users/num_targets` (a group without targets has count 0 and no metrics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import KeyedJaggedTensor

from model.jagged import jagged_to_padded
from model.metrics import count_at_or_above, full_ranks, per_target_metrics, ranking_metrics
from model.recommender import NEG_FEATURE, SequentialRecommender, l2_normalize
from pipeline.data.batches import SequenceBatches
from pipeline.data.collate import Batch
from pipeline.data.schema import ITEM_FEATURE
from pipeline.data.temporal import TAG_NEW_ITEM, TAG_NEW_USER
from pipeline.train.builder import ParallelModel
from pipeline.train.parallelize import TABLE_KEY


def split_history_target(batch: Batch) -> tuple[Tensor, Tensor]:
    """(history ids [B, L] zero-padded, target ids [B]) of a batch whose rows end with the target."""
    ids = batch.seq[ITEM_FEATURE]
    lengths = ids.lengths().long()
    padded = jagged_to_padded(ids.values()[:, None], lengths, int(lengths.max()))[..., 0]
    target = padded[torch.arange(padded.shape[0]), lengths - 1]
    history = padded.scatter(1, (lengths - 1)[:, None], 0)
    return history, target


@torch.no_grad()
def batch_ranks(model: SequentialRecommender, batch: Batch, filter_seen: bool = True) -> Tensor:
    user_BD = model.encode_last(batch.seq)
    items_VD = model.normalized_item_embeddings()
    history, target = split_history_target(batch)
    scores = user_BD @ items_VD.T
    exclude = torch.zeros(1, dtype=torch.long, device=scores.device)  # id 0 is padding
    return full_ranks(scores, target, history if filter_seen else None, exclude)


def aggregate_metrics(ranks_B: Tensor, user_ids_B: Tensor, tags_B: Tensor | None = None) -> dict[str, float]:
    """The metrics of an evaluation split from the ranks of all its rows (module docstring)."""
    metrics = ranking_metrics(ranks_B)
    metrics["num_users"] = float(ranks_B.numel())
    if tags_B is None:
        return metrics
    metrics["num_targets"] = float(ranks_B.numel())
    values = per_target_metrics(ranks_B)
    _, user = torch.unique(user_ids_B.cpu(), return_inverse=True)
    per_user = torch.bincount(user).double()
    for name, v in values.items():
        sums = torch.zeros(len(per_user), dtype=torch.float64).index_add_(0, user, v.cpu())
        metrics[f"users/{name}"] = (sums / per_user).mean().item()
    tags = tags_B.cpu()
    for group, bit in (("new_items", TAG_NEW_ITEM), ("new_users", TAG_NEW_USER)):
        mask = (tags & bit) != 0
        metrics[f"{group}/num_targets"] = float(mask.sum())
        if mask.any():
            metrics.update({f"{group}/{k}": v for k, v in ranking_metrics(ranks_B[mask]).items()})
    return metrics


@torch.no_grad()
def evaluate(
    model: SequentialRecommender, batches: Iterable[Batch], device: torch.device | str = "cpu"
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    ranks, users, tags = [], [], []
    for b in batches:
        ranks.append(batch_ranks(model, b.to(torch.device(device))).cpu())
        users.append(b.user_ids.cpu())
        tags.append(b.tags)
    model.train(was_training)
    if not ranks:
        raise ValueError("evaluation split is empty")
    all_tags = None if any(t is None for t in tags) else torch.cat([t.cpu() for t in tags])
    return aggregate_metrics(torch.cat(ranks), torch.cat(users), all_tags)


# ---------------------------------------------------------------------------------------------------
# sharded: the item table is split over ranks (row-, table- or column-wise)


def _eval_rows(batches: SequenceBatches, rank: int, world_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Every user of the split exactly once: global batches of batch_size * world_size rows, cut into
    world_size slices. A rank whose slice is empty (the last global batch) gets one row as padding,
    marked invalid, so that every rank still takes part in every collective."""
    rows = batches.rows
    step = batches.batch_size * world_size
    for start in range(0, len(rows), step):
        mine = np.array_split(rows[start : start + step], world_size)[rank]
        yield (mine, len(mine)) if len(mine) else (rows[start : start + 1], 0)


def _all_gather_padded(x: Tensor, world_size: int) -> list[Tensor]:
    """all_gather of tensors whose first two dims may differ across ranks; returns each rank's tensor."""
    if world_size == 1:
        return [x]
    shape = torch.tensor(list(x.shape[:2]) + [0] * (2 - x.dim()), device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    top = [int(max(s[i] for s in shapes)) for i in range(min(x.dim(), 2))]
    padded = x.new_zeros(top + list(x.shape[2:]))
    padded[tuple(slice(0, n) for n in x.shape[:2])] = x
    out = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return [o[tuple(slice(0, int(n)) for n in s[: min(x.dim(), 2)])] for o, s in zip(out, shapes)]


def _count_above(
    scores_BR: Tensor, lo: int, target_B: Tensor, target_score_B: Tensor, history_BL: Tensor
) -> Tensor:
    """Per user: candidates among rows [lo, lo + R) that score at or above the target (ties pessimistic,
    NaN counts as above). Padding id 0, the user's history and the target itself are not candidates (as in
    model.metrics.full_ranks)."""
    b, r = scores_BR.shape
    scores = torch.cat([scores_BR, scores_BR.new_full((b, 1), -math.inf)], dim=1)  # column r: a sink
    for ids in (history_BL, target_B[:, None], torch.zeros_like(target_B)[:, None]):
        inside = (ids >= lo) & (ids < lo + r)
        scores.scatter_(1, torch.where(inside, ids - lo, r), -math.inf)
    return count_at_or_above(scores[:, :r], target_score_B)


def _placement_rank(shard: Any) -> int:
    """The rank that holds a ShardedTensor shard (every shard of a sharded table is placed)."""
    assert shard.placement is not None, "a table shard without a placement"
    return shard.placement.rank()


def table_layout(table: Any, rank: int, world_size: int) -> tuple[list[tuple[int, int, int, int, int]], dict]:
    """Who scores what: [(row0, rows, col0, cols, rank)] for the whole table, and this rank's tensors
    keyed by (row0, col0). A sharded table is scored shard by shard where it lives; a replicated
    (data_parallel) table is cut into world_size row ranges, one per rank."""
    if isinstance(table, ShardedTensor):
        layout = [
            (
                md.shard_offsets[0],
                md.shard_sizes[0],
                md.shard_offsets[1],
                md.shard_sizes[1],
                _placement_rank(md),
            )
            for md in table.metadata().shards_metadata
        ]
        local = {
            (s.metadata.shard_offsets[0], s.metadata.shard_offsets[1]): s.tensor for s in table.local_shards()
        }
        return layout, local
    bounds = np.linspace(0, table.shape[0], world_size + 1).astype(int)
    layout = [
        (int(bounds[r]), int(bounds[r + 1] - bounds[r]), 0, table.shape[1], r) for r in range(world_size)
    ]
    r0, nr = layout[rank][:2]
    return layout, {(r0, 0): table[r0 : r0 + nr]}


@torch.no_grad()
def _sharded_counts(
    table: Any,
    user_BD: Tensor,
    target_B: Tensor,
    target_score_B: Tensor,
    history_BL: Tensor,
    eps: float,
    chunk_elems: int = 1 << 24,
) -> Tensor:
    """Each rank scores the rows it holds; returns this rank's counts (sum them over ranks).

    Full-width parts (row_wise, table_wise, data_parallel) are scored where they live, without
    communication. Column-wise shards of the same rows hold partial dot products and partial squared
    norms: these are summed over ranks (an all_reduce per row chunk) and the lowest rank holding them counts.
    """
    dim = user_BD.shape[1]
    b = user_BD.shape[0]
    counts = torch.zeros(b, dtype=torch.long, device=user_BD.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout, local = table_layout(table, rank, world)
    groups: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {}
    for part in layout:
        groups.setdefault((part[0], part[1]), []).append(part)
    rows_per_chunk = max(1, chunk_elems // max(b, 1))
    for (r0, nr), parts in sorted(groups.items()):
        full_width = len(parts) == 1 and parts[0][3] == dim
        owner = min(part[4] for part in parts)
        if full_width and owner != rank:
            continue
        for lo in range(r0, r0 + nr, rows_per_chunk):
            hi = min(lo + rows_per_chunk, r0 + nr)
            dots = user_BD.new_zeros(b, hi - lo)
            norms2 = user_BD.new_zeros(hi - lo)
            for _, _, c0, nc, _ in parts:
                weight = local.get((r0, c0))
                if weight is None:
                    continue
                rows = weight[lo - r0 : hi - r0].float()
                dots += user_BD[:, c0 : c0 + nc] @ rows.T
                norms2 += (rows * rows).sum(1)
            if not full_width and dist.is_initialized() and dist.get_world_size() > 1:
                packed = torch.cat([dots.reshape(-1), norms2])
                dist.all_reduce(packed)
                dots, norms2 = packed[: dots.numel()].view_as(dots), packed[dots.numel() :]
            if rank == owner:
                scores = dots / norms2.sqrt().clamp(min=eps)[None, :]
                counts += _count_above(scores, lo, target_B, target_score_B, history_BL)
    return counts


@torch.no_grad()
def evaluate_sharded(
    pm: ParallelModel, batches: SequenceBatches, device: torch.device | str = "cpu", filter_seen: bool = True
) -> dict[str, float]:
    """Full ranking with the item table sharded: the same metrics as `evaluate` in one process.

    Per global batch: every rank encodes its users; the user vectors, targets, target scores and
    histories are all-gathered; each rank counts, for every user, the candidates in its shard of the
    table that score above the target; the counts are summed (rank = 1 + total). Every rank ends with
    the ranks of all users and returns the same metrics. Must be called by every rank.
    """
    device = torch.device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    model = pm.model
    eps = model.cfg.l2_norm_eps
    table = pm.dmp.state_dict()[
        TABLE_KEY
    ]  # ShardedTensor (local shards are views of the weights) or a tensor
    was_training = model.training
    model.eval()
    ranks, users, tags = [], [], []
    for rows, valid in _eval_rows(batches, rank, world):
        batch = batches.collate(rows)
        users_and_tags = torch.stack(
            [batch.user_ids, batch.tags if batch.tags is not None else torch.zeros_like(batch.user_ids)], 1
        )
        batch = batch.to(device)
        user_BD = model.encode_last(batch.seq)
        history, target = split_history_target(batch)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[ITEM_FEATURE, NEG_FEATURE],
            values=target,
            lengths=torch.cat([torch.ones_like(target), torch.zeros_like(target)]).int(),
        )
        target_BD = l2_normalize(model.item_embedding(kjt)[ITEM_FEATURE].values(), eps)
        target_score = (user_BD * target_BD).sum(-1)
        if not filter_seen:
            history = torch.zeros_like(history[:, :1])
        in_history = (history == target[:, None]).any(1)
        parts = [
            _all_gather_padded(t, world)
            for t in (
                user_BD.float(),
                target,
                target_score.float(),
                history,
                in_history.long(),
                torch.tensor([valid], device=device),
                users_and_tags.to(device),
            )
        ]
        user_vecs, targets, t_scores, histories, seen, valids, row_ids = parts
        width = max(h.shape[1] for h in histories)
        all_history = torch.cat([F.pad(h, (0, width - h.shape[1])) for h in histories])
        counts = _sharded_counts(
            table, torch.cat(user_vecs), torch.cat(targets), torch.cat(t_scores), all_history, eps
        )
        if world > 1:
            dist.all_reduce(counts)
        miss = torch.cat(seen).bool() | ~torch.isfinite(torch.cat(t_scores))  # as in full_ranks
        batch_ranks = torch.where(miss, math.inf, counts.double() + 1)
        offset = 0
        for u, v, ids in zip(user_vecs, valids, row_ids):
            ranks.append(batch_ranks[offset : offset + int(v[0])].cpu())
            users.append(ids[: int(v[0]), 0].cpu())
            tags.append(ids[: int(v[0]), 1].cpu())
            offset += u.shape[0]
    model.train(was_training)
    if not ranks:
        raise ValueError("evaluation split is empty")
    all_tags = torch.cat(tags) if batches.tags is not None else None
    return aggregate_metrics(torch.cat(ranks), torch.cat(users), all_tags)
