"""The embedded default data: a deterministic synthetic interaction generator with planted time structure.

Items are split into themes; item popularity is a power law inside each theme and themes are
themselves power-law popular. Every user has a long-term taste theme. Each next interaction follows a
time gap that is either short (minutes: inside a session) or long (days: a new visit):
  - after a short gap the user continues the current theme (a session can drift into an excursion
    theme with probability `excursion_prob`),
  - after a long gap the user returns to the long-term taste (with probability `return_prob`).
The gap before the next item therefore tells which theme it comes from, so a model that sees the time
of the request (FuXi-alpha's temporal channel) can tell a session continuation from a return to taste,
and a model that ignores time measurably loses. A user never repeats an item.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from pipeline.data.sequences import SequenceData, events_to_sequences

SECONDS_PER_DAY = 86_400
START_TIME = 1_700_000_000  # 2023-11-14, unix seconds


AtLeast1 = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]


@dataclass(config=ConfigDict(extra="forbid", revalidate_instances="always"))
class SyntheticConfig:
    """The generator's knobs, each with its range (checked when built, and by the training config)."""

    num_users: AtLeast1 = 2000
    num_items: AtLeast1 = 1000  # real items are 1..num_items; the item table has num_items + 1 rows
    num_themes: AtLeast1 = 25
    mean_length: Annotated[float, Field(gt=0)] = 40.0
    min_length: Annotated[int, Field(ge=3)] = 5  # a train, a valid and a test event
    max_length: AtLeast1 = 400
    long_gap_prob: Fraction = 0.4
    # median of a long gap (log-normal); 2 days by default, months for a long-gap set where the time
    # since the last visit spans the whole year
    long_gap_days: Annotated[float, Field(gt=0)] = 2.0
    return_prob: Fraction = 0.9
    excursion_prob: Fraction = 0.3
    zipf_exponent: float = 1.0
    seed: int = 0


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(w / w.sum())


def generate_events(cfg: SyntheticConfig) -> pa.Table:
    """(user_id, item_id, timestamp) events, deterministic by cfg.seed."""
    if cfg.num_items < cfg.num_themes:
        raise ValueError(f"need at least one item per theme: {cfg.num_items} items < {cfg.num_themes} themes")
    rng = np.random.default_rng(cfg.seed)
    item_theme = rng.permutation(np.arange(cfg.num_items) % cfg.num_themes)
    theme_items = [np.flatnonzero(item_theme == t) + 1 for t in range(cfg.num_themes)]
    theme_item_p = [_zipf(len(ids), cfg.zipf_exponent, rng) for ids in theme_items]
    theme_p = _zipf(cfg.num_themes, cfg.zipf_exponent, rng)

    # lengths: log-normal with the requested mean and a long tail
    sigma = 0.8
    mu = np.log(max(cfg.mean_length - cfg.min_length, 1.0)) - sigma**2 / 2
    lengths = np.clip(
        cfg.min_length + rng.lognormal(mu, sigma, cfg.num_users).astype(np.int64),
        cfg.min_length,
        min(cfg.max_length, cfg.num_items),
    )
    users, items, times = [], [], []
    for user in range(cfg.num_users):
        n = int(lengths[user])
        taste = rng.choice(cfg.num_themes, p=theme_p)
        long_gap = rng.random(n) < cfg.long_gap_prob
        long_gaps = rng.lognormal(np.log(cfg.long_gap_days * SECONDS_PER_DAY), 0.7, n)
        gaps = np.where(long_gap, long_gaps, rng.lognormal(np.log(180), 0.8, n))
        gaps[0] = 0
        stamps = START_TIME + int(rng.integers(0, 365 * SECONDS_PER_DAY)) + np.cumsum(gaps.astype(np.int64))
        u_rand = rng.random((n, 2))
        random_themes = rng.choice(cfg.num_themes, size=n, p=theme_p)
        seen: set[int] = set()
        theme = taste
        for i in range(n):
            if i == 0 or long_gap[i]:
                theme = taste if u_rand[i, 0] < cfg.return_prob else random_themes[i]
            elif u_rand[i, 1] < cfg.excursion_prob:
                theme = random_themes[i]
            item = _draw_unseen(theme_items[theme], theme_item_p[theme], seen, rng, cfg.num_items)
            seen.add(item)
            items.append(item)
        users.append(np.full(n, user + 1, dtype=np.int64))
        times.append(stamps)
    return pa.table(
        {
            "user_id": np.concatenate(users),
            "item_id": np.asarray(items, dtype=np.int64),
            "timestamp": np.concatenate(times),
        }
    )


def _draw_unseen(
    ids: np.ndarray, p: np.ndarray, seen: set[int], rng: np.random.Generator, num_items: int
) -> int:
    for _ in range(8):
        item = int(ids[rng.choice(len(ids), p=p)])
        if item not in seen:
            return item
    fresh = [i for i in ids.tolist() if i not in seen]
    if fresh:
        return int(rng.choice(fresh))
    while True:  # theme exhausted: any unseen item (lengths are capped at num_items)
        item = int(rng.integers(1, num_items + 1))
        if item not in seen:
            return item


def synthetic_sequences(cfg: SyntheticConfig) -> SequenceData:
    table = events_to_sequences(generate_events(cfg))
    meta = {"source": "synthetic", "config": cfg.__dict__}
    return SequenceData(table=table, num_items=cfg.num_items + 1, meta=meta)
