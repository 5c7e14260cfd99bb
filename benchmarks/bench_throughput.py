"""Training and evaluation throughput of FuXi-alpha, HSTU, SASRec, eSASRec and the LLaMa-style block, as
ratios.

    .venv/bin/python benchmarks/bench_throughput.py --quick          # L 200 and 800: ~2-10 min on 2 cores
    .venv/bin/python benchmarks/bench_throughput.py --full           # L 200/400/600/800, more rounds
    .venv/bin/python benchmarks/bench_throughput.py --sections anchor --ml100k PATH/ratings.parquet
    python3 benchmarks/bench_throughput.py --device cuda --amp bf16 --chunk 256     # GPU, lite harness
    python3 benchmarks/bench_throughput.py --device cuda --amp bf16 --compile --kernel reference

Everything is measured in ONE process with the same settings, variants interleaved round by round
(A, B, C, A, B, C, ...) on the same batches; a ratio is the median over rounds of the per-round ratio, so
a machine shared with other jobs slows both sides of a ratio alike. Absolute samples/s are printed for
orientation only: compare them within one run, never across runs. One intra-op thread by default: on
a shared, oversubscribed CPU, OpenMP barriers stall every recipe's small ops (--threads 0: torch's).

Sections (paper Table 4 setting: B=32, d=50, 2 layers, 1 head, 128 shared negatives):
  1. full-length batches at L = 200, 400, 600, 800: samples/s per architecture, the FuXi/HSTU ratio at
     each length, and fast-kernel/reference ratios (the "before" rows, up to --reference-max-len);
  2. industrial length mix (log-normal, mean ~50, long tail clipped at L_max): real tokens/s relative to
     full-length batches of L_max, with and without length buckets, at the same B and at the same token
     budget per batch (what training does with `--set data.batch_tokens=<B * L_max>`);
  3. evaluation users/s for full ranking over the whole catalogue (seen items filtered);
  4. the anchor recipe (official: reference kernels, every batch padded to 211, 128 per-position
     negatives looked up as sampled, B=128) vs our best recipe (fast kernels, jagged length-bucketed
     execution, 128 shared negatives) and best-per-position (the same with the anchor's per-position
     negatives, de-duplicated) on MovieLens-100k histories (synthetic ML-like lengths when absent).
Best recipe = kernel "fast" (FuXi-alpha, HSTU) + length_buckets 8 + shared negatives, for every model.

Harness: "model" = the real `SequentialRecommender` (TorchRec item table) + `sampled_softmax_loss` +
AdamW, i.e. what `Trainer.train_step` runs; "lite" = the same encoder stacks behind a plain
nn.Embedding and an inline shared-negative loss, for machines without torchrec/fbgemm (the GPU box).
`--compile` wraps the encoder in torch.compile(dynamic=True); on CPU the first compile of the fast
path took ~8 minutes here (reference path ~1.5), so it is off by default.
Results: printed, and written to --out (benchmarks/results/ is gitignored).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.esasrec import ESASRecStack
from model.fuxi import FuXiStack
from model.hstu import HSTUStack
from model.jagged import jagged_to_padded, length_groups
from model.llama import LlamaStack
from model.metrics import full_ranks
from model.sasrec import SASRecStack

ARCHS = ("fuxi", "hstu", "sasrec", "esasrec", "llama")
STACKS = {
    "fuxi": FuXiStack,
    "hstu": HSTUStack,
    "sasrec": SASRecStack,
    "esasrec": ESASRecStack,
    "llama": LlamaStack,
}
KUAIRAND_ITEMS = 7_550  # paper Table 1 (Table 4 is measured on KuaiRand)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# data: a batch is (lengths [B] of history + target, item ids [T], timestamps [T]) on the device


@dataclass
class Rows:
    lengths: Tensor  # int64 [B], history + target
    items: Tensor  # int64 [T]
    times: Tensor  # int64 [T]

    @property
    def history_tokens(self) -> int:
        return int(self.lengths.sum()) - self.lengths.numel()

    def to(self, device: torch.device) -> Rows:
        return Rows(self.lengths.to(device), self.items.to(device), self.times.to(device))


def make_rows(hist_lengths: np.ndarray, num_items: int, rng: np.random.Generator) -> Rows:
    lengths = hist_lengths.astype(np.int64) + 1
    total = int(lengths.sum())
    items = rng.integers(1, num_items, total)
    gaps = rng.exponential(6 * 3600.0, total).astype(np.int64) + 1  # seconds: minutes to days apart
    times = 1_600_000_000 + np.cumsum(gaps)
    return Rows(torch.from_numpy(lengths), torch.from_numpy(items), torch.from_numpy(times))


def mix_lengths(
    batch: int, max_len: int, rng: np.random.Generator, mean: float = 50.0, sigma: float = 1.3
) -> np.ndarray:
    """Log-normal history lengths with the given mean (before clipping), clipped to [1, max_len]."""
    mu = math.log(mean) - sigma**2 / 2
    return np.clip(np.ceil(rng.lognormal(mu, sigma, batch)), 1, max_len).astype(np.int64)


def ml100k_histories(path: str | None, max_len: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Training histories of ML-100K ratings Parquet (user_id, item_id, timestamp), or None without one."""
    if not path:
        return None
    if not Path(path).exists():
        raise FileNotFoundError(f"--ml100k: {path} does not exist")
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["user_id", "item_id", "timestamp"]).to_pandas()
    t = t.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    rows = []
    for _, g in t.groupby("user_id", sort=True):
        items, times = g["item_id"].to_numpy()[:-2], g["timestamp"].to_numpy()[:-2]  # leave valid/test out
        rows.append((items[-(max_len + 1) :], times[-(max_len + 1) :]))
    return rows


def rows_from_histories(hist: list[tuple[np.ndarray, np.ndarray]], idx: np.ndarray) -> Rows:
    lengths = np.array([len(hist[i][0]) for i in idx], dtype=np.int64)
    items = np.concatenate([hist[i][0] for i in idx]).astype(np.int64)
    times = np.concatenate([hist[i][1] for i in idx]).astype(np.int64)
    return Rows(torch.from_numpy(lengths), torch.from_numpy(items), torch.from_numpy(times))


# --------------------------------------------------------------------------------------------------
# recipes and one training step


@dataclass(frozen=True)
class Recipe:
    kernel: str = "fast"  # fuxi/hstu/esasrec; sasrec/llama have one implementation
    length_buckets: int = 8
    negatives: str = "shared"
    num_negatives: int = 128
    padding: str = "batch"
    dedup: bool = True  # per_position negatives: look each distinct id up once
    amp: str | None = None  # "bf16" / "none": this recipe under autocast / in fp32 whatever --amp says


BEST = Recipe()
REFERENCE = Recipe(kernel="reference", length_buckets=0)
# the official recipe in fp32 whatever --amp says (on CPU the official code autocasts nothing)
ANCHOR = Recipe(
    kernel="reference", length_buckets=0, negatives="per_position", padding="fixed", dedup=False, amp="none"
)


CHUNK: dict[
    str, int
] = {}  # --chunk: query rows per chunk of the fast kernels (ModelConfig default when absent)


def model_config(
    arch: str, max_len: int, num_items: int, recipe: Recipe, padded_length: int | None = None
) -> ModelConfig:
    return ModelConfig(
        **CHUNK,
        architecture=arch,
        num_items=num_items + 1,
        max_sequence_length=max_len,
        padded_length=padded_length or max_len + 11,  # the official N = max_len + 10 + 1
        kernel=recipe.kernel if arch in ("fuxi", "hstu", "esasrec") else "reference",
        # the fast recipe's FuXi-alpha/HSTU draw cheap dropout masks; reference recipes and baselines torch's
        dropout_impl="fast" if recipe.kernel == "fast" and arch in ("fuxi", "hstu") else "torch",
        length_buckets=recipe.length_buckets,
        padding=recipe.padding,
        llama_positions="rope",
    )


class ModelStep:
    """The real model: TorchRec item table, sampled softmax, AdamW (as Trainer.train_step)."""

    def __init__(
        self, cfg: ModelConfig, recipe: Recipe, device: torch.device, amp: str | None, compile_: bool
    ):
        from model.loss import NegativeSampler, sampled_softmax_loss
        from model.recommender import build_model

        torch.manual_seed(0)
        self.model = build_model(cfg, device=device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
        self.sampler = NegativeSampler(
            recipe.num_negatives, recipe.negatives, 1, cfg.num_items, dedup=recipe.dedup
        )
        self.loss_fn = sampled_softmax_loss
        self.recipe, self.device, self.amp = recipe, device, recipe.amp or amp
        self.gen = torch.Generator(device=device).manual_seed(0)
        if compile_:
            self.model.encoder = torch.compile(self.model.encoder, dynamic=True)

    def _seq(self, rows: Rows):
        from torchrec import KeyedJaggedTensor

        return KeyedJaggedTensor.from_lengths_sync(
            ["item_id", "timestamp"],
            torch.cat([rows.items, rows.times]),
            torch.cat([rows.lengths, rows.lengths]).int(),
        )

    def __call__(self, rows: Rows) -> float:
        self.model.train()
        seq = self._seq(rows)
        neg = self.sampler.sample(rows.lengths - 1, self.gen)
        with _autocast(self.device, self.amp):
            loss = self.loss_fn(self.model(seq, neg.lookup), neg, 0.05)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def evaluate(self, rows: Rows) -> Tensor:
        self.model.eval()
        seq = self._seq(rows)
        with _autocast(self.device, self.amp):
            user = self.model.encode_last(seq).float()
        items = self.model.normalized_item_embeddings()
        return _ranks(user, items, rows)


class LiteStep(nn.Module):
    """The same encoders behind nn.Embedding and an inline shared-negative loss (no torchrec)."""

    def __init__(
        self, cfg: ModelConfig, recipe: Recipe, device: torch.device, amp: str | None, compile_: bool
    ):
        super().__init__()
        if recipe.negatives != "shared":
            raise ValueError("the lite harness implements shared negatives only")
        torch.manual_seed(0)
        self.cfg, self.recipe, self.device, self.amp = cfg, recipe, device, recipe.amp or amp
        d = cfg.embedding_dim
        self.items = nn.Embedding(cfg.num_items, d)
        nn.init.trunc_normal_(self.items.weight, std=0.02, a=-0.04, b=0.04)
        self.pos = nn.Embedding(cfg.padded_length, d)
        nn.init.xavier_normal_(self.pos.weight)
        self.encoder = STACKS[cfg.architecture](cfg)
        self.to(device)
        self.run_encoder = torch.compile(self.encoder, dynamic=True) if compile_ else self.encoder
        self.opt = torch.optim.AdamW(self.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
        self.gen = torch.Generator(device=device).manual_seed(0)

    def encode(self, rows: Rows) -> tuple[Tensor, Tensor]:
        """(normalised user vectors of every history token [T, D], index of each in the jagged values)."""
        cfg = self.cfg
        lengths = rows.lengths
        rws = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        cols = torch.arange(rws.numel(), device=lengths.device) - (torch.cumsum(lengths, 0) - lengths)[rws]
        hist_tok = torch.nonzero(cols < (lengths - 1)[rws])[:, 0]
        emb = self.items(rows.items[hist_tok]) * cfg.embedding_dim**0.5
        if cfg.architecture != "llama":
            emb = emb + self.pos.weight[cols[hist_tok]]
        x = F.dropout(emb, cfg.input_dropout, self.training)
        min_width = cfg.padded_length if self.recipe.padding == "fixed" else 0
        batch = length_groups(lengths - 1, rows.times, max(cfg.length_buckets, 1), min_width)
        y = self.run_encoder(x, batch)
        return F.normalize(y.float(), dim=-1, eps=cfg.l2_norm_eps), hist_tok

    def __call__(self, rows: Rows) -> float:  # type: ignore[override]
        self.train()
        with _autocast(self.device, self.amp):
            user_td, hist_tok = self.encode(rows)
            target_ids = rows.items[hist_tok + 1]
            neg_ids = torch.randint(
                1, self.cfg.num_items, (self.recipe.num_negatives,), generator=self.gen, device=self.device
            )
            table = F.normalize(self.items(torch.cat([target_ids, neg_ids])).float(), dim=-1)
            pos = (user_td * table[: len(target_ids)]).sum(-1, keepdim=True)
            neg = (user_td @ table[len(target_ids) :].T).masked_fill(
                neg_ids[None] == target_ids[:, None], -5e4
            )
            logits = torch.cat([pos, neg], 1) / 0.05
            loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def evaluate(self, rows: Rows) -> Tensor:
        self.eval()
        with _autocast(self.device, self.amp):
            user, _ = self.encode(rows)
        last = user[torch.cumsum(rows.lengths - 1, 0) - 1]
        return _ranks(last, F.normalize(self.items.weight, dim=-1), rows)


def _ranks(user_BD: Tensor, items_VD: Tensor, rows: Rows) -> Tensor:
    padded = jagged_to_padded(rows.items[:, None], rows.lengths, int(rows.lengths.max()))[..., 0]
    target = padded[torch.arange(padded.shape[0], device=padded.device), rows.lengths - 1]
    history = padded.scatter(1, (rows.lengths - 1)[:, None], 0)
    exclude = torch.zeros(1, dtype=torch.long, device=user_BD.device)
    return full_ranks(user_BD @ items_VD.T, target, history, exclude)


def _autocast(device: torch.device, amp: str | None):
    if amp in (None, "none"):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


# --------------------------------------------------------------------------------------------------
# interleaved timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[int], object]], rounds: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant; round r calls every variant once on input r, in turn. Warm-up
    calls get inputs -1, -2, ...: a caller indexing `rounds + warmup` inputs by r % len times each input
    once per variant, never one the warm-up saw (jagged shapes are new every real step; under bf16 each
    new shape costs a oneDNN primitive, see model.jagged.gemm_rows)."""
    for w in range(warmup):
        for fn in fns.values():
            fn(-1 - w)
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(r)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(
    times: dict[str, list[float]], num: str, den: str, per_call_num: float = 1.0, per_call_den: float = 1.0
) -> float:
    """Median over rounds of (work/s of num) / (work/s of den), work per call given per variant."""
    return statistics.median((per_call_num / a) / (per_call_den / b) for a, b in zip(times[num], times[den]))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------------------------------
# sections


def forward_macs_per_sample(cfg: ModelConfig, length: int, num_negatives: int) -> float:
    """Multiply-accumulates of one full-length sample's forward pass (matmuls only; causal attention reads
    (L + 1) / 2 keys per query on average). The arithmetic floor of a throughput ratio: with every
    implementation at the same efficiency, samples/s ratios equal the inverse MAC ratios."""
    d, h, dqk, dv = cfg.embedding_dim, cfg.num_heads, cfg.dqk, cfg.dv
    keys = (length + 1) / 2
    if cfg.architecture == "fuxi":
        c = len(cfg.channels)
        token = (
            d * (c * h * dv + h * dv + 2 * h * dqk)
            + c * h * dv * d
            + (0 if cfg.ffn_single_stage else 3 * d * cfg.d_ffn)
        )
        attn = h * (dqk + dv) * keys + (c - 1) * h * dv * keys  # semantic q.k and a.v; pos/ts a.v each
    elif cfg.architecture == "hstu":
        token, attn = d * (2 * h * dv + 2 * h * dqk) + h * dv * d, h * (dqk + dv) * keys
    elif cfg.architecture == "sasrec":
        token, attn = 4 * d * d + 2 * d * cfg.sasrec_ffn_hidden, 2 * d * keys
    elif cfg.architecture == "esasrec":  # q, k, v, o, two gates + SwiGLU
        token = d * (2 * h * dqk + h * dv) + h * dv * d + 2 * d * d + 3 * d * cfg.d_ffn
        attn = h * (dqk + dv) * keys
    else:  # llama: q, k, v, o + SwiGLU
        token, attn = 4 * d * d + 3 * d * cfg.d_ffn, 2 * d * keys
    return length * (cfg.num_layers * (token + attn) + num_negatives * d)


def build_step(args, arch, max_len, num_items, recipe, padded_length=None):
    cfg = model_config(arch, max_len, num_items, recipe, padded_length)
    cls = ModelStep if args.harness == "model" else LiteStep
    return cls(cfg, recipe, args.device, args.amp, args.compile)


def section_lengths(args, report: dict) -> None:
    print(
        f"\n== 1. full-length batches (B={args.batch}, d=50, 2 layers, "
        f"{BEST.num_negatives} shared negatives) =="
    )
    rng = np.random.default_rng(0)
    for length in args.lengths:
        batches = [
            make_rows(np.full(args.batch, length), KUAIRAND_ITEMS, rng).to(args.device) for _ in range(2)
        ]
        fns = {}
        for arch in args.archs:
            step = build_step(args, arch, length, KUAIRAND_ITEMS, BEST)
            fns[arch] = lambda r, s=step, bs=batches: s(bs[r % len(bs)])
        if args.reference and length <= args.reference_max_len:
            for arch in ("fuxi", "hstu"):
                step = build_step(args, arch, length, KUAIRAND_ITEMS, REFERENCE)
                fns[f"{arch}-ref"] = lambda r, s=step, bs=batches: s(bs[r % len(bs)])
        times = interleaved(fns, args.rounds, args.device)
        tokens = args.batch * length
        row = {
            k: {"samples_per_s": args.batch / med(v), "tokens_per_s": tokens / med(v)}
            for k, v in times.items()
        }
        row["fuxi/hstu"] = ratio(times, "fuxi", "hstu") if {"fuxi", "hstu"} <= set(times) else None
        macs = {
            a: forward_macs_per_sample(
                model_config(a, length, KUAIRAND_ITEMS, BEST), length, BEST.num_negatives
            )
            for a in ("fuxi", "hstu")
        }
        row["fuxi/hstu MAC floor"] = macs["hstu"] / macs["fuxi"]  # the ratio at equal efficiency per MAC
        for arch in ("fuxi", "hstu"):
            if f"{arch}-ref" in times:
                row[f"{arch} fast/ref"] = ratio(times, arch, f"{arch}-ref")
        if {"fuxi-ref", "hstu-ref"} <= set(times):
            row["fuxi/hstu (both reference)"] = ratio(times, "fuxi-ref", "hstu-ref")
        if {"fuxi", "sasrec"} <= set(times):
            row["fuxi/sasrec"] = ratio(times, "fuxi", "sasrec")
        if {"fuxi", "esasrec"} <= set(times):
            row["fuxi/esasrec"] = ratio(times, "fuxi", "esasrec")
        if {"fuxi", "llama"} <= set(times):
            row["fuxi/llama"] = ratio(times, "fuxi", "llama")
        report.setdefault("lengths", {})[length] = row
        sps = "  ".join(f"{k} {v['samples_per_s']:.1f}" for k, v in row.items() if isinstance(v, dict))
        rats = "  ".join(f"{k} {v:.2f}" for k, v in row.items() if not isinstance(v, dict) and v is not None)
        print(f"L={length:4d}  samples/s: {sps}\n        ratios: {rats}")


def section_mix(args, report: dict) -> None:
    print(f"\n== 2. industrial length mix (log-normal mean {args.mix_mean:g}, tail clipped at L_max) ==")
    rng = np.random.default_rng(1)
    for max_len in args.mix_max:
        mix = [
            make_rows(mix_lengths(args.batch, max_len, rng, args.mix_mean), KUAIRAND_ITEMS, rng)
            for _ in range(args.rounds + 1)  # + the warm-up's
        ]
        full = make_rows(np.full(args.batch, max_len), KUAIRAND_ITEMS, rng).to(args.device)
        # token-budget batches (`data.batch_tokens = B * L_max`): the training loader's own cut rule over
        # a stream of mix users, i.e. as many users as it takes to fill a full-length batch's token count
        from pipeline.data.sequences import token_budget_cuts  # (pyarrow; not needed by the other sections)

        users = 2 * (args.rounds + 1) * args.batch * max_len // max(int(args.mix_mean), 1)
        stream = mix_lengths(users, max_len, rng, args.mix_mean)
        budget = [
            make_rows(lens, KUAIRAND_ITEMS, rng).to(args.device)
            for lens in np.split(stream, token_budget_cuts(stream, args.batch * max_len))[: args.rounds + 1]
        ]
        assert len(budget) == args.rounds + 1
        mix = [m.to(args.device) for m in mix]
        mean_len = float(np.mean([m.history_tokens / args.batch for m in mix[: args.rounds]]))
        max_in = float(np.mean([int(m.lengths.max()) - 1 for m in mix[: args.rounds]]))
        users_budget = float(np.mean([b.lengths.numel() for b in budget[: args.rounds]]))
        for arch in args.mix_archs:
            best = build_step(args, arch, max_len, KUAIRAND_ITEMS, BEST)
            nob = build_step(args, arch, max_len, KUAIRAND_ITEMS, replace(BEST, length_buckets=0))
            fns = {
                "full": lambda r, s=best, f=full: s(f),
                "mix": lambda r, s=best, m=mix: s(m[r % len(m)]),
                "mix-nobucket": lambda r, s=nob, m=mix: s(m[r % len(m)]),
                "mix-tokenbudget": lambda r, s=best, bb=budget: s(bb[r % len(bb)]),
            }
            times = interleaved(fns, args.rounds, args.device)
            tok = {
                "full": [full.history_tokens] * args.rounds,
                "mix": [m.history_tokens for m in mix[: args.rounds]],
                "mix-tokenbudget": [b.history_tokens for b in budget[: args.rounds]],
            }
            tok["mix-nobucket"] = tok["mix"]
            # real tokens/s of each variant over all its rounds (every mix round is a new batch of its own
            # size, so per-round ratios mix batch-to-batch variation into the comparison)
            tps = {k: sum(tok[k]) / sum(times[k]) for k in times}
            rel = {f"{k}/full": tps[k] / tps["full"] for k in tps if k != "full"}
            per_round = {
                f"{k}/full per-round median": statistics.median(
                    (n / t) / (nf / tf) for n, t, nf, tf in zip(tok[k], times[k], tok["full"], times["full"])
                )
                for k in times
                if k != "full"
            }
            row = {
                "tokens_per_s": tps,
                "per_round": per_round,
                **rel,
                "mean_len": mean_len,
                "mean_batch_max": max_in,
                "users_per_token_budget_batch": users_budget,
            }
            report.setdefault("mix", {}).setdefault(max_len, {})[arch] = row
            print(
                f"L_max={max_len:4d} {arch:6s} mean len {mean_len:5.1f}, batch max ~{max_in:.0f}, "
                f"token-budget batch "
                f"~{users_budget:.0f} users; real tokens/s: "
                + "  ".join(f"{k} {v:,.0f}" for k, v in row["tokens_per_s"].items())
                + "\n        ratios: "
                + "  ".join(f"{k} {v:.2f}" for k, v in rel.items())
                + "   (per-round medians: "
                + "  ".join(f"{v:.2f}" for v in per_round.values())
                + ")"
            )


def section_eval(args, report: dict) -> None:
    print(
        f"\n== 3. evaluation: full ranking over {KUAIRAND_ITEMS:,} items, seen items filtered, "
        f"B={args.eval_batch} =="
    )
    rng = np.random.default_rng(2)
    for label, lens in (
        ("L=200", np.full(args.eval_batch, 200)),
        ("mix", mix_lengths(args.eval_batch, 200, rng, args.mix_mean)),
    ):
        rows = make_rows(lens, KUAIRAND_ITEMS, rng).to(args.device)
        fns = {}
        for arch in args.archs:
            step = build_step(args, arch, 200, KUAIRAND_ITEMS, BEST)
            fns[arch] = lambda r, s=step, rs=rows: s.evaluate(rs)
        for arch in ("fuxi", "hstu"):
            step = build_step(args, arch, 200, KUAIRAND_ITEMS, REFERENCE)
            fns[f"{arch}-ref"] = lambda r, s=step, rs=rows: s.evaluate(rs)
        times = interleaved(fns, args.rounds, args.device)
        ups = {k: args.eval_batch / med(v) for k, v in times.items()}
        report.setdefault("eval", {})[label] = {"users_per_s": ups, "fuxi/hstu": ratio(times, "fuxi", "hstu")}
        print(
            f"{label:6s} users/s: "
            + "  ".join(f"{k} {v:.0f}" for k, v in ups.items())
            + f"\n        ratios: fuxi/hstu {ratio(times, 'fuxi', 'hstu'):.2f}"
            + f"  fuxi fast/ref {ratio(times, 'fuxi', 'fuxi-ref'):.2f}"
        )


def section_anchor(args, report: dict) -> None:
    hist = ml100k_histories(args.ml100k, 200)
    source = "MovieLens-100k histories" if hist is not None else "synthetic ML-like lengths"
    print(f"\n== 4. anchor recipe vs best recipe (FuXi-alpha, B={args.anchor_batch}, {source}) ==")
    rng = np.random.default_rng(3)
    if hist is not None:
        num_items = 1682
        batches = [  # every timed call sees a batch it has not seen (see `interleaved`)
            rows_from_histories(hist, rng.choice(len(hist), args.anchor_batch, replace=False))
            for _ in range(args.rounds + 1)
        ]
    else:
        num_items = 3952
        batches = [
            make_rows(
                np.clip(rng.lognormal(4.3, 0.9, args.anchor_batch), 20, 200).astype(int), num_items, rng
            )
            for _ in range(args.rounds + 1)
        ]
    batches = [b.to(args.device) for b in batches]
    big_batch = 4 * args.anchor_batch  # the best recipe at a larger batch (needs its own NDCG check)
    big = None
    if hist is not None and big_batch <= len(hist):
        big = [
            rows_from_histories(hist, rng.choice(len(hist), big_batch, replace=False)).to(args.device)
            for _ in range(args.rounds + 1)
        ]
    recipes = {
        "anchor": ANCHOR,
        "best": BEST,
        # the anchor's own loss (128 per-position negatives, de-duplicated lookups, fused loss): the same
        # training function as the anchor recipe; 4 length groups as in the docs/ML100K.md runs
        "best-per-position": replace(BEST, negatives="per_position", length_buckets=4),
        # ... and with `amp=bf16` (matmuls in bf16: AVX512-BF16 on this CPU; the quality check is in
        # docs/ML100K.md)
        "best-per-position-bf16": replace(BEST, negatives="per_position", length_buckets=4, amp="bf16"),
        # shared negatives need far more than 128 to train as well as per-position 128 (ML-100K table)
        "best-shared-1024": replace(BEST, num_negatives=1024),
        "best-no-buckets": replace(BEST, length_buckets=0),
        "reference+shared": replace(REFERENCE, padding="batch"),
    }
    fns, per_call = {}, {}
    for name, recipe in recipes.items():
        if args.harness == "lite" and recipe.negatives != "shared":
            continue
        step = build_step(args, "fuxi", 200, num_items, recipe, padded_length=211)
        fns[name] = lambda r, s=step, bs=batches: s(bs[r % len(bs)])
        per_call[name] = args.anchor_batch
        if name == "best" and big is not None:
            fns[f"best-B{big_batch}"] = lambda r, s=step, bs=big: s(bs[r % len(bs)])
            per_call[f"best-B{big_batch}"] = big_batch
    times = interleaved(fns, args.rounds, args.device)
    sps = {k: per_call[k] / med(v) for k, v in times.items()}
    rats = {
        f"{k}/anchor": ratio(times, k, "anchor", per_call[k], per_call["anchor"])
        for k in times
        if k != "anchor" and "anchor" in times
    }
    report["anchor"] = {
        "samples_per_s": sps,
        "ratios": rats,
        "source": source,
        "mean_len": float(np.mean([b.history_tokens / args.anchor_batch for b in batches[: args.rounds]])),
    }
    print("samples/s: " + "  ".join(f"{k} {v:.1f}" for k, v in sps.items()))
    print("ratios:    " + "  ".join(f"{k} {v:.2f}" for k, v in rats.items()))


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="default: L 200 and 800, few rounds (~3-5 min on CPU)"
    )
    mode.add_argument(
        "--full", action="store_true", help="L 200/400/600/800, more rounds, reference rows to L=400"
    )
    p.add_argument("--sections", default="lengths,mix,eval,anchor")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--archs", type=lambda s: s.split(","), default=list(ARCHS))
    p.add_argument("--mix-archs", type=lambda s: s.split(","), default=["fuxi", "hstu"])
    p.add_argument("--mix-max", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--mix-mean", type=float, default=50.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--anchor-batch", type=int, default=128)
    p.add_argument(
        "--ml100k", help="MovieLens-100K ratings Parquet for section 4 (else synthetic ML-like lengths)"
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--reference-max-len", type=int)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared, oversubscribed CPU, OpenMP barriers stall the "
        "many small ops of every recipe; 0 = torch's default)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder stacks (slow to compile on CPU)"
    )
    p.add_argument("--harness", choices=["model", "lite"], default=None)
    p.add_argument("--chunk", type=int, default=None, help="fast-kernel query rows per chunk (GPU: larger)")
    p.add_argument(
        "--kernel",
        choices=["fast", "reference"],
        default=None,
        help="kernel of the 'best' recipe (default fast; reference + --compile on GPU)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_throughput.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.chunk:
        CHUNK["fast_chunk"] = args.chunk
    if args.kernel:
        global BEST
        BEST = replace(BEST, kernel=args.kernel)
    if args.harness is None:
        try:
            import torchrec  # noqa: F401

            args.harness = "model"
        except ImportError:
            args.harness = "lite"
    full = args.full
    args.lengths = args.lengths or ([200, 400, 600, 800] if full else [200, 800])
    args.mix_max = args.mix_max or ([200, 800] if full else [800])
    args.rounds = args.rounds or (7 if full else 3)
    args.reference_max_len = args.reference_max_len or (400 if full else 200)
    report: dict = {
        "device": str(args.device),
        "harness": args.harness,
        "kernel": BEST.kernel,
        "threads": torch.get_num_threads(),
        "amp": args.amp,
        "compile": args.compile,
        "batch": args.batch,
        "rounds": args.rounds,
        "chunk": CHUNK.get("fast_chunk", ModelConfig().fast_chunk),
        "torch": torch.__version__,
    }
    if args.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    print(
        f"device {report.get('gpu', args.device)}  harness {args.harness}  threads {report['threads']}  "
        f"amp {args.amp}  compile {args.compile}  rounds {args.rounds}"
    )
    t0 = time.perf_counter()
    sections = {
        "lengths": section_lengths,
        "mix": section_mix,
        "eval": section_eval,
        "anchor": section_anchor,
    }
    for name in args.sections.split(","):
        sections[name](args, report)
    report["seconds"] = time.perf_counter() - t0
    print(f"\n({report['seconds']:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
