"""Synthetic industrial event logs: up to a billion interactions, written day by day with bounded memory.

The raw-log twin of `pipeline.data.synthetic` (same planted time structure, vectorised): items are split into
themes with power-law popularity inside each theme and across themes; every user has a long-term taste
theme. A user's events inside one time slice form a session (gaps of minutes); between sessions lie hours
to days. The first event of a session returns to the taste theme with probability `return_prob`; later
events continue the session's theme, or drift into an excursion theme with probability `excursion_prob`
(which the session then continues). So the time gap before an event tells which theme it comes from.

Output: OUT/date=YYYY-MM-DD/part-NNNNN.parquet (columns user_id int64, item_id int64, timestamp int64 unix
seconds, event_type int8: 0 view, 1 click, 2 purchase) plus OUT/_logs.json (the config, the catalogue size
`num_items`, rows per day). Each day is cut into time slices of at most `rows_per_part` events; slice k of a
day becomes part k, sorted by time, so the whole day is in time order and users are interleaved.

Scale: user activity is log-normal (mean `num_events / num_users` events per user, a long tail:
sigma 1.2 gives a few users with thousands of events); each event picks its user by activity, so a user's
length is Poisson around its activity. Memory: O(num_users + num_items) for the static tables (about
25 bytes per user) plus O(rows_per_part) per slice; nothing grows with the number of events.
Deterministic: slice (day, k) draws from SeedSequence([seed, 1, day, k]); the static tables from [seed, 0].
Optional planted noise: `duplicate_prob` exact re-logged duplicates, `bad_fraction` invalid rows (null or
negative user, zero or out-of-catalogue item, null or millisecond timestamps) for the quarantine.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.data.schema import DATE_RE, LOGS_META

SECONDS_PER_DAY = 86_400
LOG_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()), ("event_type", pa.int8())]
)
EVENT_TYPE_P = (0.80, 0.17, 0.03)  # view, click, purchase


@dataclass
class LogConfig:
    num_users: int = 100_000
    num_items: int = 50_000  # catalogue: item ids 1..num_items (0 is padding)
    num_days: int = 7
    num_events: int = 5_000_000
    seed: int = 0
    start_date: str = "2024-01-01"
    num_themes: int = 100
    activity_sigma: float = 1.2  # log-normal spread of per-user activity (the length tail)
    session_gap_seconds: float = 180.0  # median gap inside a session
    return_prob: float = 0.9
    excursion_prob: float = 0.3
    duplicate_prob: float = 0.001
    bad_fraction: float = 0.0
    rows_per_part: int = 2_000_000


@dataclass
class _Static:
    user_cdf: np.ndarray  # [U] float64, activity CDF
    taste: np.ndarray  # [U] int16
    theme_cdf: np.ndarray  # [T]
    theme_start: np.ndarray  # [T] offsets into item_perm
    theme_size: np.ndarray  # [T]
    item_perm: np.ndarray  # [I] item ids 1..I, grouped by theme


def _zipf_cdf(n: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.permutation(1.0 / np.arange(1, n + 1))
    cdf = np.cumsum(w / w.sum())
    cdf[-1] = 1.0
    return cdf


def _static(cfg: LogConfig) -> _Static:
    if cfg.num_items < cfg.num_themes:
        raise ValueError(f"need at least one item per theme: {cfg.num_items} items < {cfg.num_themes} themes")
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    activity = rng.lognormal(0.0, cfg.activity_sigma, cfg.num_users)
    user_cdf = np.cumsum(activity)
    user_cdf /= user_cdf[-1]
    theme_cdf = _zipf_cdf(cfg.num_themes, rng)
    taste = np.searchsorted(theme_cdf, rng.random(cfg.num_users), side="right").astype(np.int16)
    size = np.full(cfg.num_themes, cfg.num_items // cfg.num_themes, dtype=np.int64)
    size[: cfg.num_items % cfg.num_themes] += 1
    start = np.r_[0, np.cumsum(size)[:-1]]
    item_perm = (rng.permutation(cfg.num_items) + 1).astype(np.int64)
    return _Static(user_cdf, taste, theme_cdf, start, size, item_perm)


def _split(total: int, parts: int) -> np.ndarray:
    out = np.full(parts, total // parts, dtype=np.int64)
    out[: total % parts] += 1
    return out


def plan_days(cfg: LogConfig) -> list[tuple[str, int, np.ndarray]]:
    """(date, day start unix seconds, events per part) for every day."""
    start = dt.datetime.strptime(cfg.start_date, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    days = []
    for d, events in enumerate(_split(cfg.num_events, cfg.num_days)):
        date = start + dt.timedelta(days=d)
        parts = max(1, math.ceil(int(events) / cfg.rows_per_part))
        days.append((date.strftime("%Y-%m-%d"), int(date.timestamp()), _split(int(events), parts)))
    return days


def generate_slice(cfg: LogConfig, st: _Static, day: int, part: int, t0: int, t1: int, n: int) -> pa.Table:
    """The `n` events of time slice [t0, t1) of day `day`, sorted by time (LOG_SCHEMA)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1, day, part]))
    n_dup = int(rng.binomial(n, cfg.duplicate_prob)) if cfg.duplicate_prob > 0 else 0
    base = n - n_dup
    draws = rng.random(base)
    # sorted draws give sorted users (one session per user and slice) and a cache-friendly search
    draws.sort()
    users = np.minimum(np.searchsorted(st.user_cdf, draws, side="right"), cfg.num_users - 1)
    first = np.r_[True, users[1:] != users[:-1]] if base else np.zeros(0, bool)
    starts = np.flatnonzero(first)
    gid = np.cumsum(first) - 1
    gaps = rng.lognormal(np.log(cfg.session_gap_seconds), 0.8, base)
    gaps[first] = 0.0
    offset = np.cumsum(gaps)
    offset -= offset[starts][gid]
    ends = np.r_[starts[1:], base] - 1
    span = offset[ends]
    room = 0.95 * (t1 - t0)
    scale = np.where(span > room, room / np.maximum(span, 1e-9), 1.0)
    begin = rng.random(len(starts)) * (t1 - t0 - span * scale)
    times = t0 + (begin[gid] + offset * scale[gid]).astype(np.int64)
    # themes: a session starts at the taste (or a random theme), may drift into an excursion and stays there
    u = rng.random((2, base))
    random_theme = np.searchsorted(st.theme_cdf, rng.random(base), side="right")
    reset = first | (u[1] < cfg.excursion_prob)
    reset_theme = np.where(first & (u[0] < cfg.return_prob), st.taste[users], random_theme)
    theme = reset_theme[np.maximum.accumulate(np.where(reset, np.arange(base), 0))]
    # Zipf(1) rank inside the theme by inversion of the log-uniform law
    size = st.theme_size[theme]
    rank = np.minimum(np.exp(rng.random(base) * np.log1p(size)).astype(np.int64) - 1, size - 1)
    items = st.item_perm[st.theme_start[theme] + rank]
    etype = np.searchsorted(np.cumsum(EVENT_TYPE_P), rng.random(base), side="right").astype(np.int8)
    if n_dup:
        j = rng.integers(0, base, n_dup)
        users, items, times, etype = (np.r_[a, a[j]] for a in (users, items, times, etype))
    order = np.argsort(times, kind="stable")
    users, items, times, etype = users[order], items[order], times[order], etype[order]
    cols = [pa.array(users.astype(np.int64)), pa.array(items), pa.array(times), pa.array(etype)]
    if cfg.bad_fraction > 0:
        cols = _plant_bad_rows(cfg, rng, users, items, times)[:3] + [cols[3]]
    return pa.Table.from_arrays(cols, schema=LOG_SCHEMA)


def _plant_bad_rows(cfg: LogConfig, rng: np.random.Generator, users, items, times) -> list[pa.Array]:
    n = len(users)
    bad = rng.choice(n, int(rng.binomial(n, cfg.bad_fraction)), replace=False)
    kind = np.arange(len(bad)) % 6
    users, items, times = users.copy(), items.copy(), times.copy()
    null_user = np.zeros(n, bool)
    null_time = np.zeros(n, bool)
    null_user[bad[kind == 0]] = True
    users[bad[kind == 1]] = -users[bad[kind == 1]] - 1
    items[bad[kind == 2]] = 0
    items[bad[kind == 3]] = cfg.num_items + 1 + items[bad[kind == 3]]
    null_time[bad[kind == 4]] = True
    times[bad[kind == 5]] *= 1000  # milliseconds: an absurd timestamp
    return [pa.array(users, mask=null_user), pa.array(items), pa.array(times, mask=null_time)]


def write_logs(cfg: LogConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the logs under `out`; returns the `_logs.json` summary."""
    out = Path(out)
    existing = (
        [p for p in out.iterdir() if DATE_RE.match(p.name) or p.name == LOGS_META] if out.exists() else []
    )
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds logs ({existing[0].name}, ...); pass overwrite=True / --overwrite"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    st = _static(cfg)
    days = plan_days(cfg)
    summary = {
        "generator": "pipeline.data.synth_logs",
        "num_items": cfg.num_items,
        "config": asdict(cfg),
        "days": {},
    }
    bar = tqdm(total=cfg.num_events, unit="ev", unit_scale=True, desc="synth-logs", disable=not progress)
    for d, (date, t_day, parts) in enumerate(days):
        folder = out / f"date={date}"
        folder.mkdir()
        width = SECONDS_PER_DAY / len(parts)
        for k, n in enumerate(parts):
            t0, t1 = t_day + int(k * width), t_day + int((k + 1) * width)
            table = generate_slice(cfg, st, d, k, t0, t1, int(n))
            pq.write_table(
                table,
                folder / f"part-{k:05d}.parquet",
                compression="zstd",
                row_group_size=1 << 20,
                use_dictionary=["event_type"],
                column_encoding={"timestamp": "DELTA_BINARY_PACKED"},
            )
            bar.update(int(n))
        summary["days"][date] = {"rows": int(parts.sum()), "parts": len(parts)}
    bar.close()
    summary["num_events"] = cfg.num_events
    (out / LOGS_META).write_text(json.dumps(summary, indent=1))
    return summary
