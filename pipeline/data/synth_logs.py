"""Synthetic industrial event logs: up to a billion interactions, written day by day with bounded memory.

The raw-log twin of `pipeline.data.synthetic` (same planted time structure, vectorised): items are split into
themes with power-law popularity inside each theme and across themes; every user has a long-term taste
theme. A user's events inside one time slice form a session (gaps of minutes); between sessions lie hours
to days. The first event of a session returns to the taste theme with probability `return_prob`; later
events continue the session's theme, or drift into an excursion theme with probability `excursion_prob`
(which the session then continues). So the time gap before an event tells which theme it comes from.

Growing catalogue: day 0 holds the initial `num_items` items; every later day introduces
`new_items_per_day` new items (0 = a frozen catalogue), each assigned to a theme (by theme popularity) and
appended to that theme's item list, so the Zipf rank draw runs over the theme's items available that day.
New items are popular while new: a share `new_item_share` of each day's events picks among the items
introduced in the last `new_item_days` days, with weight 1 / (1 + age in days). No item appears before its
introduction day.

Ids: internally items are 1..total (initial items, then each day's new items in order) and users 0..U-1.
`item_ids` / `user_ids` choose what is written: "dense" (those ids), "hashed" (a fixed random, distinct,
nonzero 64-bit signed id per item or user, as real hashed ids: negatives and magnitudes above 2^62) or
"string" ("i" / "u" + 16 hex digits of that hashed value).

Output: OUT/date=YYYY-MM-DD/part-NNNNN.parquet (columns user_id, item_id: int64 or string by id style;
timestamp int64 unix seconds, event_type int8: 0 view, 1 click, 2 purchase) plus OUT/_logs.json (the config,
the total catalogue size `num_items` over all days, per-day `new_items`, the id styles, rows per day).
OUT is a path or a URI (`s3://bucket/logs`): every part file is written through the storage layer (one upload
per part on an object store), `_logs.json` last, so a log root with `_logs.json` is complete.
Each day is cut into time slices of at most `rows_per_part` events; slice k of a day becomes part k,
sorted by time, so the whole day is in time order and users are interleaved.

Scale: user activity is log-normal (mean `num_events / num_users` events per user, a long tail:
sigma 1.2 gives a few users with thousands of events); each event picks its user by activity, so a user's
length is Poisson around its activity. Memory: O(num_users + total items) for the static tables
(about 25 bytes per user, 8 more per user or item with hashed / string ids; the day's catalogue is rebuilt
once per day) plus O(rows_per_part) per slice; nothing grows with the number of events.
Deterministic: slice (day, k) draws from SeedSequence([seed, 1, day, k]) and its new-item picks from
[seed, 3, day, k]; the static tables from [seed, 0], the new items' themes from [seed, 2], the hashed ids
from [seed, 4, 0] (items) and [seed, 4, 1] (users). With `new_items_per_day=0` and dense ids the output is
exactly that of the frozen-catalogue generator (the extra streams are not drawn from).
Optional planted noise: `duplicate_prob` exact re-logged duplicates, `bad_fraction` invalid rows (null user,
null item, null or millisecond timestamps; with dense ids also negative user, zero or out-of-catalogue item,
which for hashed / string ids would be ordinary ids and are written as null ids instead) for the quarantine.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

import storage
from pipeline.data.schema import DATE_RE, LOGS_META

SECONDS_PER_DAY = 86_400
LOG_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()), ("event_type", pa.int8())]
)
EVENT_TYPE_P = (0.80, 0.17, 0.03)  # view, click, purchase
ID_STYLES = ("dense", "hashed", "string")


def log_schema(item_ids: str = "dense", user_ids: str = "dense") -> pa.Schema:
    """LOG_SCHEMA with the id columns typed by id style (int64, or string for "string")."""
    typ = {"dense": pa.int64(), "hashed": pa.int64(), "string": pa.string()}
    return pa.schema(
        [
            ("user_id", typ[user_ids]),
            ("item_id", typ[item_ids]),
            ("timestamp", pa.int64()),
            ("event_type", pa.int8()),
        ]
    )


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
    # growing catalogue (0 = frozen; the CLI defaults to num_items // 100)
    new_items_per_day: int = 0
    new_item_share: float = 0.1  # share of each day's events that pick a recently introduced item
    new_item_days: int = 3  # an item counts as new on its first `new_item_days` days
    item_ids: str = "dense"  # "dense" | "hashed" | "string"
    user_ids: str = "dense"

    @property
    def total_items(self) -> int:
        """Items over all days: the initial catalogue plus every later day's new items."""
        return self.num_items + max(self.num_days - 1, 0) * self.new_items_per_day


@dataclass
class _Static:
    user_cdf: np.ndarray  # [U] float64, activity CDF
    taste: np.ndarray  # [U] int16
    theme_cdf: np.ndarray  # [T]
    theme_start: np.ndarray  # [T] offsets into item_perm
    theme_size: np.ndarray  # [T]
    item_perm: np.ndarray  # [I] item ids 1..I, grouped by theme
    new_theme: np.ndarray | None = None  # [total - I] int64, theme of new item num_items + 1 + j
    item_hash: np.ndarray | None = None  # [total + 1] int64 written id of dense item i (hashed / string)
    user_hash: np.ndarray | None = None  # [U] int64 written id of user u (hashed / string)


@dataclass
class _Day:
    """The catalogue available on one day: per-theme item lists and the recent-item pool."""

    theme_start: np.ndarray
    theme_size: np.ndarray
    item_perm: np.ndarray
    recent: np.ndarray | None = None  # dense ids of the items introduced in the last new_item_days days
    recent_cdf: np.ndarray | None = None  # their pick CDF, weight 1 / (1 + age)


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
    st = _Static(user_cdf, taste, theme_cdf, start, size, item_perm)
    for name in ("item_ids", "user_ids"):
        if getattr(cfg, name) not in ID_STYLES:
            raise ValueError(f"{name} must be one of {ID_STYLES}, got {getattr(cfg, name)!r}")
    if cfg.new_items_per_day < 0 or cfg.new_item_days < 1 or not 0.0 <= cfg.new_item_share <= 1.0:
        raise ValueError("need new_items_per_day >= 0, new_item_days >= 1 and 0 <= new_item_share <= 1")
    if "string" in (cfg.item_ids, cfg.user_ids) and cfg.rows_per_part * 17 >= 2**31:
        raise ValueError("string ids: rows_per_part must stay below 2^31 / 17 (int32 string offsets)")
    n_new = cfg.total_items - cfg.num_items
    if n_new:
        rng_new = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2]))
        st.new_theme = np.searchsorted(theme_cdf, rng_new.random(n_new), side="right").astype(np.int64)
    if cfg.item_ids != "dense":
        st.item_hash = np.r_[0, _distinct_int64(cfg.total_items, [cfg.seed, 4, 0])]
    if cfg.user_ids != "dense":
        st.user_hash = _distinct_int64(cfg.num_users, [cfg.seed, 4, 1])
    return st


def _distinct_int64(n: int, seed: list[int]) -> np.ndarray:
    """`n` distinct nonzero uniform random int64 values (the full signed range), deterministic by seed."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    out = np.zeros(0, np.int64)
    while len(out) < n:
        draw = np.r_[
            out,
            rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n - len(out) + 16, np.int64, True),
        ]
        draw = draw[draw != 0]
        _, first = np.unique(draw, return_index=True)
        out = draw[np.sort(first)]
    return out[:n]


def _day_table(cfg: LogConfig, st: _Static, day: int) -> _Day:
    """The items available on `day`: each theme's initial items, then its new items in introduction order."""
    k = cfg.new_items_per_day
    if k == 0 or day == 0:
        return _Day(st.theme_start, st.theme_size, st.item_perm)
    n_new = day * k
    new_ids = cfg.num_items + 1 + np.arange(n_new, dtype=np.int64)
    base_theme = np.repeat(np.arange(cfg.num_themes, dtype=np.int64), st.theme_size)
    assert st.new_theme is not None  # _static draws it whenever the catalogue grows
    theme = np.r_[base_theme, st.new_theme[:n_new]]
    order = np.argsort(theme, kind="stable")  # stable: initial items first, new items by introduction
    size = np.bincount(theme, minlength=cfg.num_themes).astype(np.int64)
    start = np.r_[0, np.cumsum(size)[:-1]]
    lo = max(1, day - cfg.new_item_days + 1)
    recent = cfg.num_items + 1 + np.arange((lo - 1) * k, day * k, dtype=np.int64)
    age = day - (1 + (recent - cfg.num_items - 1) // k)
    cdf = np.cumsum(1.0 / (1.0 + age))
    cdf /= cdf[-1]
    return _Day(start, size, np.r_[st.item_perm, new_ids][order], recent, cdf)


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


def generate_slice(
    cfg: LogConfig, st: _Static, day: int, part: int, t0: int, t1: int, n: int, catalogue: _Day | None = None
) -> pa.Table:
    """The `n` events of time slice [t0, t1) of day `day`, sorted by time (`log_schema` of the id styles).
    `catalogue` is `_day_table(cfg, st, day)`, passed in to build it once per day."""
    cat = catalogue if catalogue is not None else _day_table(cfg, st, day)
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
    size = cat.theme_size[theme]
    rank = np.minimum(np.exp(rng.random(base) * np.log1p(size)).astype(np.int64) - 1, size - 1)
    items = cat.item_perm[cat.theme_start[theme] + rank]
    etype = np.searchsorted(np.cumsum(EVENT_TYPE_P), rng.random(base), side="right").astype(np.int8)
    if cat.recent is not None and cat.recent_cdf is not None and cfg.new_item_share > 0:
        # a separate stream, so the draws above are those of the frozen catalogue
        rng_new = np.random.default_rng(np.random.SeedSequence([cfg.seed, 3, day, part]))
        pick = np.flatnonzero(rng_new.random(base) < cfg.new_item_share)
        j = np.minimum(
            np.searchsorted(cat.recent_cdf, rng_new.random(len(pick)), side="right"), len(cat.recent) - 1
        )
        items[pick] = cat.recent[j]
    if n_dup:
        j = rng.integers(0, base, n_dup)
        users, items, times, etype = (np.r_[a, a[j]] for a in (users, items, times, etype))
    order = np.argsort(times, kind="stable")
    users, items, times, etype = users[order], items[order], times[order], etype[order]
    users = users.astype(np.int64)
    null_user = null_item = null_time = None
    if cfg.bad_fraction > 0:
        users, items, times, null_user, null_item, null_time = _plant_bad_rows(cfg, rng, users, items, times)
    cols = [
        _id_array(users, st.user_hash, cfg.user_ids, "u", null_user),
        _id_array(items, st.item_hash, cfg.item_ids, "i", null_item),
        pa.array(times, mask=null_time),
        pa.array(etype),
    ]
    return pa.Table.from_arrays(cols, schema=log_schema(cfg.item_ids, cfg.user_ids))


def _id_array(dense: np.ndarray, table: np.ndarray | None, style: str, prefix: str, null) -> pa.Array:
    """The written id column: the dense ids, their hashed int64 ids, or prefix + 16 hex digits of those."""
    if style == "dense":
        return pa.array(dense, mask=null)
    assert table is not None  # the hash table exists for every style but "dense"
    ids = table[np.where(null, 0, dense) if null is not None else dense]
    if style == "hashed":
        return pa.array(ids, mask=null)
    # prefix + 16 lowercase hex digits of the id as uint64, as fixed-width bytes, one digit column at a time
    # (17 bytes per row plus one uint64 temporary)
    hexdigits = np.frombuffer(b"0123456789abcdef", np.uint8)
    value = ids.view(np.uint64)
    data = np.empty((len(ids), 17), np.uint8)
    data[:, 0] = ord(prefix)
    for j in range(16):
        data[:, 16 - j] = hexdigits[((value >> np.uint64(4 * j)) & np.uint64(15)).astype(np.intp)]
    offsets = np.arange(len(ids) + 1, dtype=np.int32) * 17
    validity = None if null is None else pa.array(~null).buffers()[1]
    null_count = 0 if null is None else int(null.sum())
    return pa.StringArray.from_buffers(
        len(ids), pa.py_buffer(offsets), pa.py_buffer(data), validity, null_count
    )


def _plant_bad_rows(cfg: LogConfig, rng: np.random.Generator, users, items, times):
    """Invalid rows: (users, items, times, null_user, null_item, null_time). Kinds cycle over null user,
    negative user, zero item, out-of-catalogue item, null timestamp, millisecond timestamp; the negative /
    zero / out-of-catalogue kinds need dense ids and become null ids for hashed / string ids."""
    n = len(users)
    bad = rng.choice(n, int(rng.binomial(n, cfg.bad_fraction)), replace=False)
    kind = np.arange(len(bad)) % 6
    users, items, times = users.copy(), items.copy(), times.copy()
    null_user = np.zeros(n, bool)
    null_item = np.zeros(n, bool)
    null_time = np.zeros(n, bool)
    null_user[bad[kind == 0]] = True
    if cfg.user_ids == "dense":
        users[bad[kind == 1]] = -users[bad[kind == 1]] - 1
    else:
        null_user[bad[kind == 1]] = True
    if cfg.item_ids == "dense":
        items[bad[kind == 2]] = 0
        items[bad[kind == 3]] = cfg.total_items + 1 + items[bad[kind == 3]]
    else:
        null_item[bad[(kind == 2) | (kind == 3)]] = True
    null_time[bad[kind == 4]] = True
    times[bad[kind == 5]] *= 1000  # milliseconds: an absurd timestamp
    return users, items, times, null_user, (null_item if null_item.any() else None), null_time


def write_logs(cfg: LogConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the logs under `out` (a path or a URI); returns the `_logs.json` summary."""
    out = os.fspath(out)
    existing = [n for n in storage.listdir(out) if DATE_RE.match(n) or n == LOGS_META]
    if existing and not overwrite:
        raise ValueError(
            f"{storage.display(out)} already holds logs ({existing[0]}, ...); "
            "pass overwrite=True / --overwrite"
        )
    for name in existing:
        storage.delete(storage.join(out, name), recursive=True)
    if storage.is_local(out):
        os.makedirs(storage.parse(out).path, exist_ok=True)
    st = _static(cfg)
    days = plan_days(cfg)
    summary = {
        "generator": "pipeline.data.synth_logs",
        "num_items": cfg.total_items,
        "initial_items": cfg.num_items,
        "new_items": {date: (cfg.new_items_per_day if d else 0) for d, (date, _, _) in enumerate(days)},
        "item_ids": cfg.item_ids,
        "user_ids": cfg.user_ids,
        "config": asdict(cfg),
        "days": {},
    }
    bar = tqdm(total=cfg.num_events, unit="ev", unit_scale=True, desc="synth-logs", disable=not progress)
    for d, (date, t_day, parts) in enumerate(days):
        folder = storage.join(out, f"date={date}")
        width = SECONDS_PER_DAY / len(parts)
        catalogue = _day_table(cfg, st, d)
        for k, n in enumerate(parts):
            t0, t1 = t_day + int(k * width), t_day + int((k + 1) * width)
            table = generate_slice(cfg, st, d, k, t0, t1, int(n), catalogue)
            with storage.open_output(storage.join(folder, f"part-{k:05d}.parquet")) as sink:
                pq.write_table(
                    table,
                    sink,
                    compression="zstd",
                    row_group_size=1 << 20,
                    use_dictionary=["event_type"],
                    column_encoding={"timestamp": "DELTA_BINARY_PACKED"},
                )
            bar.update(int(n))
        summary["days"][date] = {
            "rows": int(parts.sum()),
            "parts": len(parts),
            "new_items": summary["new_items"][date],
        }
    bar.close()
    summary["num_events"] = cfg.num_events
    storage.write_bytes(storage.join(out, LOGS_META), json.dumps(summary, indent=1).encode())
    return summary
