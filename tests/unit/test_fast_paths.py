"""Fast paths against their slow twins, forward and backward, over random jagged lengths.

The twins: model.fuxi.AMS / model.hstu.HSTUBlock on the reference core (kernel="reference", padded
einsums), itself tested against the official indexing and a per-(i, j) loop (tests/helpers/reference.py). Both
kernels run the same jagged path (model/jagged.py); only the attention core differs.
Tolerances: the fast path reorders fp32 sums (chunked matmuls, scatter-add of bucket gradients), so
values agree to rounding: rtol 1e-4 / atol 1e-5 on O(1) tensors; gradcheck runs in float64.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.attention import KERNELS, inverse_n
from model.attention_fast import ams_channels, build_plan, hstu_attention
from model.config import ModelConfig
from model.fuxi import AMS, FuXiStack
from model.hstu import HSTUBlock, HSTUStack
from model.jagged import plan_groups
from model.layers import time_buckets, time_deltas
from model.loss import NegativeSampler, sampled_softmax_loss
from model.recommender import SequenceOutput, build_model
from tests.conftest import make_seq, padded_as_jagged, random_rows
from tests.helpers.reference import naive_ams

TOL = {"rtol": 1e-4, "atol": 1e-5}


def cfg_(**kw) -> ModelConfig:
    base = {
        "num_items": 60,
        "embedding_dim": 8,
        "dqk": 4,
        "dv": 4,
        "num_heads": 2,
        "max_sequence_length": 29,
        "padded_length": 32,
        "input_dropout": 0.0,
        "linear_dropout": 0.0,
        "kernel": "reference",
        "length_buckets": 1,
    }
    base.update(kw)
    return ModelConfig(**base)


def jagged_batch(seed: int, b: int, length: int, d: int):
    """Random lengths in [1, length] (one row at full length), zero-padded x, increasing timestamps."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[int(torch.randint(0, b, (1,), generator=g))] = length
    valid = torch.arange(length)[None, :] < lengths[:, None]
    x = torch.randn(b, length, d, generator=g) * valid[..., None]
    gaps = torch.randint(0, 3 * 10**7, (b, length + 1), generator=g)
    gaps[:, ::3] = torch.randint(0, 5, (b, (length + 3) // 3), generator=g)  # ties and tiny gaps too
    ts = 1_600_000_000 + torch.cumsum(gaps, 1)
    return x, valid, ts


def randomize_scalars(module: torch.nn.Module) -> None:
    """The 0.02-std init hides indexing mistakes; make the position/time weights O(1)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_weights" in name or "time_weights" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def run_both(module, x, valid, ts, cfg, kind, out_dim, grad_seed=7):
    """Output and every gradient of one layer on the jagged path: the reference core on one group padded
    to the batch's longest row first, then the fast core on three length groups."""
    g = torch.Generator().manual_seed(grad_seed)
    w = torch.randn(int(valid.sum()), out_dim, generator=g)
    results = []
    for kernel, groups in (("reference", 1), ("fast", 3)):
        module.kernel = KERNELS[kernel]
        x_TD, batch, plans = padded_as_jagged(x, valid, ts, cfg, kind, kernel=kernel, max_groups=groups)
        module.zero_grad(set_to_none=True)
        xx = x_TD.clone().requires_grad_(True)
        y = module(xx, batch, plans)
        (y * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((y.detach(), xx.grad.clone(), grads))
    return results


def assert_same(results):
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    assert gp0.keys() == gp1.keys() and gp0
    for name in gp0:
        torch.testing.assert_close(gp1[name], gp0[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------
# AMS (FuXi-alpha) and HSTU attention: one layer


AMS_CASES = [
    {},
    {"num_heads": 1, "dqk": 8, "dv": 8},
    {"attn_norm": "length"},
    {"time_delta": "query"},
    {"channels": ("pos", "sem")},
    {"channels": ("ts",)},
    {"attention": "vanilla"},
]


@pytest.mark.parametrize(
    "kw", AMS_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "official"
)
@pytest.mark.parametrize("chunk,seed", [(5, 0), (64, 1), (1, 2)])
def test_fast_ams_matches_reference(kw, chunk, seed):
    cfg = cfg_(**kw, fast_chunk=chunk)
    torch.manual_seed(seed)
    ams = AMS(cfg)
    randomize_scalars(ams)
    x, valid, ts = jagged_batch(seed, 5, 23, cfg.embedding_dim)
    kind = "hstu" if cfg.attention == "vanilla" else "fuxi"
    assert_same(run_both(ams, x, valid, ts, cfg, kind, ams.u_width))


@pytest.mark.parametrize(
    "kw", [{}, {"num_heads": 1, "dqk": 8, "dv": 8}, {"attn_norm": "length"}, {"time_delta": "query"}]
)
@pytest.mark.parametrize("chunk,seed", [(7, 3), (64, 4)])
def test_fast_hstu_matches_reference(kw, chunk, seed):
    cfg = cfg_(architecture="hstu", **kw, fast_chunk=chunk)
    torch.manual_seed(seed)
    block = HSTUBlock(cfg)
    randomize_scalars(block)
    x, valid, ts = jagged_batch(seed, 5, 23, cfg.embedding_dim)
    assert_same(run_both(block, x, valid, ts, cfg, "hstu", cfg.embedding_dim))


def test_fast_ams_matches_naive_loop():
    """The fast path against the per-(i, j) loop of tests/helpers/reference.py directly (no shared code)."""
    torch.manual_seed(0)
    cfg = cfg_(max_sequence_length=12, padded_length=13)
    ams = AMS(cfg)
    randomize_scalars(ams)
    x = torch.randn(2, 5, cfg.embedding_dim)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    x = x * valid[..., None]
    ts = torch.tensor([[0, 5, 70, 4000, 90000, 100000], [10, 20, 5000, 6000, 0, 0]])
    ams.kernel = KERNELS["fast"]
    x_TD, batch, plans = padded_as_jagged(x, valid, ts, dataclasses.replace(cfg, fast_chunk=2), kernel="fast")
    torch.testing.assert_close(ams(x_TD, batch, plans), naive_ams(ams, x, valid, ts, cfg)[valid], **TOL)


def test_gradcheck_float64():
    """Hand-written backward of both cores against finite differences (float64, tiny sizes)."""
    g = torch.Generator().manual_seed(0)
    b, length, h, d, n = 2, 5, 2, 3, 8
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    ts = 1_600_000_000 + torch.cumsum(torch.randint(0, 10**6, (b, length + 1), generator=g), 1)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    q, k = leaf(b, length, h * d), leaf(b, length, h * d)
    v = (torch.randn(b, length, h * d, generator=g, dtype=torch.float64) * valid[..., None]).requires_grad_(
        True
    )
    w_pos, w_ts = leaf(2 * n - 1), leaf(129)
    for norm in ("padded", "length"):
        inv_n = inverse_n(valid, n, norm).double()
        plan_f = build_plan(ts, length, "fuxi", "next", 128, 0.301, n, chunk=2)

        def ams(q, k, v, wp, wt, n_=inv_n, p_=plan_f):
            return ams_channels(q, k, v, wp, wt, n_, p_, ("pos", "ts", "sem"), h)

        assert torch.autograd.gradcheck(ams, (q, k, v, w_pos, w_ts))
        plan_h = build_plan(ts, length, "hstu", "next", 128, 0.301, n, chunk=2)

        def hstu(q, k, v, wp, wt, n_=inv_n, p_=plan_h):
            return hstu_attention(q, k, v, wp, wt, n_, p_, h)

        assert torch.autograd.gradcheck(hstu, (q, k, v, w_pos, w_ts))


def test_plan_buckets_equal_reference_buckets():
    g = torch.Generator().manual_seed(5)
    b, length = 3, 40
    ts = torch.cumsum(torch.randint(0, 10**9, (b, length + 1), generator=g), 1)
    ts[:, 5:9] = ts[:, 5:6]  # equal timestamps
    for mode in ("next", "query"):
        ref = time_buckets(time_deltas(ts, length, mode))
        plan = build_plan(ts, length, "fuxi", mode, 128, 0.301, length + 1, chunk=16)
        for (r0, r1), idx in zip(plan.bounds, plan.index):
            below = torch.ones(r1 - r0, r1, dtype=torch.bool).tril(r0)
            assert torch.equal(idx[:, below], ref[:, r0:r1, :r1][:, below])
            assert (idx[:, ~below] == 129).all()  # the zero sentinel above the diagonal


# --------------------------------------------------------------------------------------------------
# whole model: fast kernels, length buckets, fixed padding


def _train_grads(model, items, times, negatives_seed=0):
    seq = make_seq(items, times)
    sampler = NegativeSampler(16, "shared", 1, model.cfg.num_items)
    neg = sampler.sample(seq["item_id"].lengths().long() - 1, torch.Generator().manual_seed(negatives_seed))
    model.zero_grad(set_to_none=True)
    out = model(seq, neg.lookup)
    loss = sampled_softmax_loss(out, neg, 0.05)
    loss.backward()
    return (
        out.user_TD.detach(),
        loss.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    )


@pytest.mark.parametrize(
    "arch,variant",
    [
        ("fuxi", {"kernel": "fast"}),
        ("hstu", {"kernel": "fast"}),
        ("fuxi", {"kernel": "fast", "length_buckets": 3}),
        ("hstu", {"length_buckets": 4}),
        ("sasrec", {"length_buckets": 4}),
        ("llama", {"length_buckets": 4}),
        ("fuxi", {"padding": "fixed"}),
        ("fuxi", {"kernel": "fast", "fast_chunk": 4, "length_buckets": 2}),
        ("hstu", {"kernel": "fast", "fast_chunk": 8, "length_buckets": 3}),
        ("fuxi", {"attention": "vanilla", "kernel": "fast", "length_buckets": 3}),
        ("fuxi", {"attn_norm": "length", "time_delta": "query", "kernel": "fast", "length_buckets": 3}),
        ("fuxi", {"channels": ("pos", "sem"), "kernel": "fast", "length_buckets": 3}),
    ],
)
def test_model_variants_match_reference(arch, variant):
    """Loss, user vectors, encode_last and every parameter gradient of the full recommender, against the
    reference core on one group padded to the batch's longest row (what a padded batch computes)."""
    items, times = random_rows(9, 60, 30, seed=11)
    shape_keys = {"attention", "channels"}  # these change the parameters: the reference shares them
    base_cfg = cfg_(
        architecture=arch,
        max_sequence_length=30,
        padded_length=31,
        **{k: v for k, v in variant.items() if k in shape_keys | {"attn_norm", "time_delta"}},
    )
    torch.manual_seed(0)
    ref = build_model(base_cfg)
    randomize_scalars(ref)
    torch.manual_seed(0)
    fast = build_model(ModelConfig(**{**base_cfg.__dict__, **variant}))
    fast.load_state_dict(ref.state_dict())
    u0, l0, g0 = _train_grads(ref, items, times)
    u1, l1, g1 = _train_grads(fast, items, times)
    ref.eval(), fast.eval()
    seq = make_seq(items, times)
    torch.testing.assert_close(fast.encode_last(seq), ref.encode_last(seq), **TOL)
    torch.testing.assert_close(u1, u0, **TOL)
    torch.testing.assert_close(l1, l0, **TOL)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("stack,arch", [(FuXiStack, "fuxi"), (HSTUStack, "hstu")])
def test_stack_kernel_switch_is_a_pure_speed_switch(stack, arch):
    """Same parameters under both kernels (state dicts interchangeable)."""
    a, b = stack(cfg_(architecture=arch, kernel="reference")), stack(cfg_(architecture=arch, kernel="fast"))
    assert a.state_dict().keys() == b.state_dict().keys()


# --------------------------------------------------------------------------------------------------
# length groups


def _brute_force_cost(srt, max_groups, group_cost):
    best = float("inf")
    b = len(srt)
    import itertools

    for g in range(1, max_groups + 1):
        for cuts in itertools.combinations(range(1, b), g - 1):
            edges = (0, *cuts, b)
            cost = sum(
                (e - s) * (srt[s] ** 2 + 500 * srt[s]) + group_cost for s, e in itertools.pairwise(edges)
            )
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_plan_groups_is_an_optimal_partition(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.5, 1.2, 9), 1, 300).astype(int)
    for max_groups in (1, 2, 3, 5):
        groups = plan_groups(lengths, max_groups, token_weight=500.0, group_cost=2e4)
        assert 1 <= len(groups) <= max_groups
        assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
        srt = np.sort(lengths)[::-1].astype(float)
        cost = sum(len(g) * (lengths[g].max() ** 2 + 500 * lengths[g].max()) + 2e4 for g in groups)
        assert cost == pytest.approx(_brute_force_cost(srt, max_groups, 2e4))


def test_fast_dropout_distribution_and_gradient():
    from model.layers import fast_dropout

    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = fast_dropout(x, 0.2, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005  # keep w.p. 1 - p
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1.25))  # inverted scaling 1 / (1 - p)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 1.25)
    assert fast_dropout(x, 0.2, False) is x and fast_dropout(x, 0.0, True) is x


@pytest.mark.parametrize("kernel", ["reference", "fast"])
def test_dropout_impl_not_the_kernel_picks_the_dropout(kernel):
    """`model.dropout_impl` decides how every dropout of FuXi-alpha/HSTU draws its mask, whatever the
    attention kernel: "torch" is F.dropout's random stream, "fast" fast_dropout's."""
    import torch.nn.functional as F

    from model.layers import Dropout, fast_dropout

    x = torch.ones(4096)
    for arch in ("fuxi", "hstu"):
        for impl, draw in (("torch", F.dropout), ("fast", fast_dropout)):
            model = build_model(
                cfg_(
                    architecture=arch, kernel=kernel, dropout_impl=impl, input_dropout=0.3, linear_dropout=0.3
                )
            )
            dropouts = [m for m in model.modules() if isinstance(m, Dropout)]
            assert len(dropouts) == 1 + model.cfg.num_layers  # the input's and one per block
            for module in dropouts:
                torch.manual_seed(0)
                y = module(x)
                torch.manual_seed(0)
                assert torch.equal(y, draw(x, 0.3, True)), (arch, impl)
    torch.manual_seed(0)
    a = F.dropout(x, 0.3, True)
    torch.manual_seed(0)
    assert not torch.equal(a, fast_dropout(x, 0.3, True))  # the two streams differ: the test can tell them
    with pytest.raises(ValueError, match="dropout_impl"):  # the typed config refuses it first
        cfg_(kernel=kernel, dropout_impl="bernoulli")
    with pytest.raises(ValueError, match="dropout impl must be 'torch' or 'fast', got 'bernoulli'"):
        Dropout(0.3, "bernoulli")


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_keep_mask_rate_shape_and_independence(p):
    """16 random bits per element, four elements per 64-bit draw: the keep rate is 1 - p, odd sizes keep
    their shape, and neighbours (which share a draw) are uncorrelated."""
    from model.layers import dropout_keep_mask

    torch.manual_seed(1)
    keep = dropout_keep_mask(torch.Size([1001, 301]), p, torch.device("cpu"))
    assert keep.shape == (1001, 301) and keep.dtype == torch.bool
    k = keep.flatten().float()
    assert abs(k.mean().item() - (1 - p)) < 0.004  # 301k draws: 4.5 standard errors at p = 0.5
    for lag in (1, 2, 3, 4):
        corr = torch.corrcoef(torch.stack([k[:-lag], k[lag:]]))[0, 1].item()
        assert abs(corr) < 0.01, (lag, corr)


# --------------------------------------------------------------------------------------------------
# shapes under bf16 autocast: padded token rows, per-group core dtype


def test_gemm_rows_rounds_only_under_autocast():
    """T itself without autocast; under it, T rounded up to a multiple of 2^(floor(log2 T) - 5)."""
    from model.jagged import gemm_rows

    cpu = torch.device("cpu")
    assert gemm_rows(11_000, cpu) == 11_000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_rows(11_000, cpu) == 11_008  # 43 * 256
        assert gemm_rows(11_008, cpu) == 11_008
        assert gemm_rows(63, cpu) == 63  # too small to matter
        assert gemm_rows(100, cpu) == 100  # quantum 2
        for t in (64, 65, 1000, 4097, 12_345, 99_999):
            r, quantum = gemm_rows(t, cpu), 1 << (t.bit_length() - 6)
            assert t <= r < t + quantum and r % quantum == 0 and r <= t * (1 + 1 / 32)


@pytest.mark.parametrize("arch", ["fuxi", "hstu"])
def test_padded_token_rows_and_fp32_cores_keep_the_function(monkeypatch, arch):
    """Extra zero token rows (`pad_rows`) never reach the real tokens, forward or backward, and small groups'
    cores computing in fp32 change nothing: the jagged fast model with both forced on equals the reference."""
    import model.attention
    import model.jagged

    monkeypatch.setattr(model.jagged, "gemm_rows", lambda n, device: n + 37)
    monkeypatch.setattr(model.attention, "BF16_CORE_MIN_SLOTS", 10**9)  # every group: fp32 core
    items, times = random_rows(9, 60, 30, seed=12)
    base = cfg_(architecture=arch, max_sequence_length=30, padded_length=31)
    torch.manual_seed(0)
    ref = build_model(base)
    randomize_scalars(ref)
    fast = build_model(dataclasses.replace(base, kernel="fast", length_buckets=3))
    fast.load_state_dict(ref.state_dict())
    u0, l0, g0 = _train_grads(ref, items, times)
    u1, l1, g1 = _train_grads(fast, items, times)
    torch.testing.assert_close(u1, u0, **TOL)
    torch.testing.assert_close(l1, l0, **TOL)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("core", ["ams", "hstu"])
def test_core_computes_in_the_given_dtype_and_returns_the_input_dtype(core):
    """bf16 inputs with dtype=float32: the core runs in fp32 (so equals the fp32 core on the same bf16 values
    to fp32 rounding) and returns bf16, with bf16 gradients."""
    x, valid, ts = jagged_batch(3, 5, 40, 8)
    kind = "fuxi" if core == "ams" else "hstu"
    plan = build_plan(ts, 40, kind, "next", 128, 0.301, 64, 16)
    g = torch.Generator().manual_seed(1)
    q, k, v = ((torch.randn(5, 40, 8, generator=g) * valid[..., None]).bfloat16() for _ in range(3))
    w_pos, w_ts = torch.randn(127, generator=g), torch.randn(129, generator=g)
    inv_n = inverse_n(valid, 64, "padded")

    def run(dtype, *qkv):
        leaves = [t.clone().requires_grad_(True) for t in qkv]
        if core == "ams":
            out = ams_channels(*leaves, w_pos, w_ts, inv_n, plan, ("pos", "ts", "sem"), 2, dtype)
        else:
            out = hstu_attention(*leaves, w_pos, w_ts, inv_n, plan, 2, dtype)
        out.float().sum().backward()
        return out, [t.grad for t in leaves]

    out, grads = run(torch.float32, q, k, v)
    ref, ref_grads = run(None, q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16 and all(gr.dtype == torch.bfloat16 for gr in grads)
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=0, atol=0)
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr.float(), rg.bfloat16().float(), rtol=0, atol=0)


def test_fused_loss_under_bf16_autocast_matches_fp32():
    """The dense path under autocast (bf16 score matmuls, chunks padded to a fixed row count, the item
    gradient accumulated transposed) against the fp32 loss: value and gradients within bf16 rounding."""
    import model.loss

    lengths = torch.tensor([70, 33, 58])  # T = 161: with ~40-row chunks, a ragged last chunk
    t, r, d, catalogue = int(lengths.sum()), 12, 16, 30  # every id drawn: dense scoring
    negs = NegativeSampler(r, "per_position", 1, catalogue).sample(lengths, torch.Generator().manual_seed(4))
    assert negs.lookup.values().numel() == catalogue - 1
    g = torch.Generator().manual_seed(5)
    table = torch.randn(catalogue, d, generator=g)
    user0, target = _output_pair(t, d)
    target_ids = torch.randint(1, catalogue, (t,), generator=g)
    results = []
    for amp in (False, True):
        old = model.loss.CHUNK_BYTES
        model.loss.CHUNK_BYTES = 40 * (catalogue - 1) * (2 if amp else 4)  # 40 rows a chunk either way
        try:
            user = user0.clone().requires_grad_(True)
            weights = table.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                rows = torch.nn.functional.normalize(weights[negs.lookup.values()], dim=-1)
                out = SequenceOutput(user, target, target_ids, rows, lengths)
                loss = sampled_softmax_loss(out, negs, 0.05)
            loss.backward()
        finally:
            model.loss.CHUNK_BYTES = old
        assert loss.dtype == torch.float32
        results.append((loss.detach(), user.grad, weights.grad))
    (l0, gu0, gw0), (l1, gu1, gw1) = results
    torch.testing.assert_close(l1, l0, rtol=2e-2, atol=0)
    for a, b in ((gu1, gu0), (gw1, gw0)):
        assert a.shape == b.shape
        assert (a - b).norm() < 0.05 * b.norm()


def _output_pair(t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return (
        torch.nn.functional.normalize(torch.randn(t, d, generator=g), dim=-1),
        torch.nn.functional.normalize(torch.randn(t, d, generator=g), dim=-1),
    )
