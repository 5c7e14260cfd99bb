"""FuXi-alpha and baselines: reference indexing, causality, padding invariance, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.attention import KERNELS
from model.config import ModelConfig
from model.fuxi import AMS
from model.layers import RelativePositionWeights, RelativeTimeWeights, rms_norm, time_buckets
from model.recommender import build_model, count_parameters
from tests.conftest import make_seq, padded_as_jagged, random_rows
from tests.helpers.reference import naive_ams

ARCHS = ["fuxi", "hstu", "sasrec", "llama"]


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        num_items=50,
        embedding_dim=8,
        dqk=4,
        dv=4,
        num_heads=2,
        max_sequence_length=12,
        padded_length=13,
        input_dropout=0.0,
        linear_dropout=0.0,
    )
    base.update(kw)
    return ModelConfig(**base)


# --- reference worked examples -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "dt,bucket",
    [
        (0, 0),
        (1, 0),
        (-1, 0),
        (10, 7),
        (60, 13),
        (3600, 27),
        (86400, 37),
        (30 * 86400, 49),
        (365 * 86400, 57),
        (3 * 365 * 86400, 61),
        (2**62, 128),
    ],
)
def test_time_bucket_worked_examples(dt, bucket):
    assert time_buckets(torch.tensor([dt], dtype=torch.int64)).item() == bucket


def test_positional_weights_indexed_by_relative_distance():
    n, length = 7, 5
    pos = RelativePositionWeights(n)
    with torch.no_grad():
        pos.weight.copy_(torch.arange(2 * n - 1, dtype=torch.float32))
    w = pos(length)
    for i in range(length):
        for j in range(length):
            assert w[i, j].item() == (n - 1) + (j - i)  # _pos_w[(N-1) + (j - i)]


@pytest.mark.parametrize("mode", ["next", "query"])
def test_temporal_weights_use_reference_time_difference(mode):
    ts = torch.tensor([[100, 110, 3700, 90000, 90000 + 86400 * 30]])  # 4 history items + target time
    tw = RelativeTimeWeights(128, 0.301, mode)
    with torch.no_grad():
        tw.weight.copy_(torch.arange(129, dtype=torch.float32))
    w = tw(ts, 4)
    for i in range(4):
        for j in range(4):
            dt = (ts[0, i + 1] if mode == "next" else ts[0, i]) - ts[0, j]
            expected = min(max(math.floor(math.log(max(abs(dt.item()), 1)) / 0.301), 0), 128)
            assert w[0, i, j].item() == expected


def test_ams_matches_naive_reference_loop():
    torch.manual_seed(0)
    cfg = small_cfg()
    ams = AMS(cfg)
    with torch.no_grad():  # make the small-init scalars large enough to matter
        ams.pos_weights.weight.normal_()
        ams.time_weights.weight.normal_()
    x = torch.randn(2, 5, cfg.embedding_dim)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    x = x * valid[..., None]
    ts = torch.tensor([[0, 5, 70, 4000, 90000, 100000], [10, 20, 5000, 6000, 0, 0]])
    for kernel in ("reference", "fast"):
        x_TD, batch, plans = padded_as_jagged(x, valid, ts, cfg, kernel=kernel)
        ams.kernel = KERNELS[kernel]
        torch.testing.assert_close(
            ams(x_TD, batch, plans), naive_ams(ams, x, valid, ts, cfg)[valid], rtol=1e-5, atol=1e-6
        )


def test_reference_parameter_counts_ml1m():
    cfg = ModelConfig()  # official ML-1M configuration
    model = build_model(cfg)
    assert count_parameters(model.encoder) == 61_200  # 2 x (15,000 + 421 + 129 + 7,550 + 7,500)
    assert model.item_table_weight().shape == (3953, 50)
    assert count_parameters(model) == 61_200 + 3953 * 50 + 211 * 50


# --- causality and padding ---------------------------------------------------------------------------
def _outputs(model, items, times):
    model.eval()
    out = model(make_seq(items, times))
    return out.user_TD


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_later_item_never_changes_earlier_outputs(arch):
    torch.manual_seed(1)
    model = build_model(small_cfg(architecture=arch))
    items = [[3, 7, 9, 11, 4, 20, 5]]
    times = [[100, 200, 5000, 5100, 90000, 95000, 200000]]
    base = _outputs(model, items, times)
    for k in range(1, 6):  # change the item at history position k
        changed = [list(items[0])]
        changed[0][k] = 42
        out = _outputs(model, changed, times)
        torch.testing.assert_close(out[:k], base[:k], rtol=0, atol=0)
        assert not torch.allclose(out[k:], base[k:])
        # timestamps: the official dt = t[i+1] - t[j] lets position k-1 read t[k] (the time of the item it
        # predicts, known at request time); nothing earlier may change
        later = [list(times[0])]
        later[0][k] += 7 * 86400
        for j in range(k + 1, len(later[0])):
            later[0][j] += 7 * 86400
        out = _outputs(model, items, later)
        torch.testing.assert_close(out[: max(k - 1, 0)], base[: max(k - 1, 0)], rtol=0, atol=0)


def test_query_time_mode_is_strictly_causal_in_timestamps():
    torch.manual_seed(2)
    model = build_model(small_cfg(time_delta="query"))
    items, times = [[3, 7, 9, 11, 4]], [[100, 200, 5000, 5100, 90000]]
    base = _outputs(model, items, times)
    later = [[100, 200, 5000, 9_000_000, 9_100_000]]
    torch.testing.assert_close(_outputs(model, items, later)[:3], base[:3], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_invariance(arch):
    torch.manual_seed(3)
    model = build_model(small_cfg(architecture=arch))
    items, times = random_rows(5, 50, 12, seed=4)
    together = _outputs(model, items, times)
    offsets = [0]
    for r in items:
        offsets.append(offsets[-1] + len(r) - 1)
    for u in range(5):
        alone = _outputs(model, [items[u]], [times[u]])
        torch.testing.assert_close(together[offsets[u] : offsets[u + 1]], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_all_parameters_receive_gradients(arch):
    from model.loss import NegativeSampler, sampled_softmax_loss

    torch.manual_seed(5)
    model = build_model(small_cfg(architecture=arch, llama_positions="learned"))
    items, times = random_rows(4, 50, 12, seed=6)
    seq = make_seq(items, times)
    sampler = NegativeSampler(8, "shared", 1, 50)
    neg = sampler.sample(seq["item_id"].lengths().long() - 1)
    loss = sampled_softmax_loss(model(seq, neg.lookup), neg, 0.05)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_zero_temporal_init_leaves_unreached_buckets_out():
    """model.time_weight_init_scale=0: FuXi-alpha's temporal weights start at zero, every other weight as
    the default build's draw; after AdamW steps (weight decay on) only the buckets the batch's pairs
    reached have moved, so a gap training never saw adds nothing to the temporal channel."""
    from model.loss import NegativeSampler, sampled_softmax_loss

    torch.manual_seed(7)
    default = build_model(small_cfg())
    torch.manual_seed(7)
    model = build_model(small_cfg(time_weight_init_scale=0.0))
    for (name, a), (_, b) in zip(default.named_parameters(), model.named_parameters(), strict=True):
        if "time_weights" in name:
            assert a.abs().max() > 0 and torch.count_nonzero(b) == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    items, times = random_rows(4, 50, 12, seed=8)
    seq = make_seq(items, times)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        neg = NegativeSampler(8, "shared", 1, 50).sample(seq["item_id"].lengths().long() - 1)
        opt.zero_grad()
        sampled_softmax_loss(model(seq, neg.lookup), neg, 0.05).backward()
        opt.step()
    # the buckets of the (query, key) pairs of these rows: dt(i, j) = t[i+1] - t[j], j <= i
    reached = set()
    for row in times:
        for i in range(len(row) - 1):
            gaps = torch.tensor([row[i + 1] - row[j] for j in range(i + 1)])
            reached |= set(time_buckets(gaps).tolist())
    for block in model.encoder.blocks:
        moved = set(torch.nonzero(block.ams.time_weights.weight.detach()).flatten().tolist())
        assert moved and moved <= reached


@pytest.mark.parametrize(
    "kw,encoder_params",
    [
        ({}, 2 * (15_000 + 421 + 129 + 7_550 + 7_500)),
        ({"ffn_single_stage": True}, 2 * (15_000 + 421 + 129 + 7_550)),  # w/o MFFN
        ({"channels": ("pos", "sem")}, 2 * (50 * 250 + 421 + 100 * 50 + 50 + 7_500)),  # no temporal channel
        ({"attention": "vanilla"}, 2 * (50 * 200 + 421 + 129 + 50 * 50 + 50 + 7_500)),  # w/o AMS
        (
            {"attention": "vanilla", "ffn_single_stage": True},
            2 * (50 * 200 + 421 + 129 + 50 * 50 + 50),
        ),  # Base
    ],
)
def test_ablation_shapes(kw, encoder_params):
    assert count_parameters(build_model(ModelConfig(**kw)).encoder) == encoder_params


def test_attention_denominator_modes():
    from model.attention import inverse_n

    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    one_over = lambda n: torch.tensor([1.0]) / n  # noqa: E731  (float32, as the cores compute)
    assert torch.equal(inverse_n(valid, 211, "padded"), one_over(211))  # official: constant N
    assert torch.equal(
        inverse_n(valid, 211, "length"), one_over(torch.tensor([3.0, 1.0]))
    )  # paper: true length
    with pytest.raises(ValueError, match="attn_norm"):
        inverse_n(valid, 211, "other")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_fused_backward_matches_pytorch(dtype):
    """model.layers.rms_norm (hand-written CPU backward) against F.rms_norm's autograd, 2-D and 3-D."""
    from model.layers import _RMSNorm

    torch.manual_seed(0)
    for shape in [(37, 150), (3, 11, 50)]:
        x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
        g = torch.randn(shape, dtype=torch.float64).to(dtype)
        y = rms_norm(x)
        assert y.grad_fn is not None and "_RMSNormBackward" in type(y.grad_fn).__name__
        (dx,) = torch.autograd.grad(y, x, g)
        x64 = x.detach().double().requires_grad_(True)
        (dx64,) = torch.autograd.grad(F.rms_norm(x64, (shape[-1],), eps=1e-6), x64, g.double())
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(
            y.double(), F.rms_norm(x64, (shape[-1],), eps=1e-6).detach(), rtol=tol, atol=tol
        )
        torch.testing.assert_close(dx.double(), dx64, rtol=tol, atol=tol)
        assert dx.dtype == dtype
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _RMSNorm.apply(t, 1e-6), (x,))
