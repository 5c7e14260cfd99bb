"""eSASRec: the LiGR layer against a plain padded reference (RecTools' formulation), both attention kernels,
the whole recommender across length groups, causality, and a tiny training run through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import model.jagged
from model.config import ModelConfig
from model.esasrec import ESASRecStack, LiGRBlock
from model.loss import NegativeSampler, sampled_softmax_loss
from model.recommender import build_model, count_parameters
from tests.conftest import make_seq, padded_as_jagged, random_rows
from tests.helpers.checkpoints import final_model_configs


def cfg_(**kw) -> ModelConfig:
    base = dict(
        architecture="esasrec",
        num_items=60,
        embedding_dim=12,
        num_heads=3,
        dqk=4,  # = D / H, as nn.MultiheadAttention has
        dv=4,
        ffn_multiply=2.0,
        max_sequence_length=16,
        padded_length=17,
        input_dropout=0.0,
        linear_dropout=0.0,
    )
    base.update(kw)
    return ModelConfig(**base)


def ligr_reference(block: LiGRBlock, x_BLD: Tensor, valid_BL: Tensor) -> Tensor:
    """One LiGR layer as RecTools' LiGRLayer computes it on a padded batch: torch's multi-head attention
    function (what nn.MultiheadAttention runs) with a causal mask and a key-padding mask, affine LayerNorms,
    sigmoid gates on the layer input, a SwiGLU feed-forward; no dropout. Reads the block's parameters."""
    b, length, d = x_BLD.shape
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    z = F.layer_norm(x_BLD, (d,), block.attn_norm.weight, block.attn_norm.bias, 1e-5)
    zt = z.transpose(0, 1)  # the functional form is sequence-first
    a, _ = F.multi_head_attention_forward(
        zt, zt, zt, d, block.cfg.num_heads,
        block.qkv.weight, block.qkv.bias, None, None, False, 0.0,
        block.out.weight, block.out.bias,
        training=False, key_padding_mask=~valid_BL, need_weights=False, attn_mask=causal,
    )  # fmt: skip
    gate = torch.sigmoid(F.linear(x_BLD, block.attn_gate.weight, block.attn_gate.bias))
    x = x_BLD + gate * a.transpose(0, 1)
    z = F.layer_norm(x, (d,), block.ffn_norm.weight, block.ffn_norm.bias, 1e-5)
    f = F.linear(F.silu(F.linear(z, block.w1.weight)) * F.linear(z, block.w3.weight), block.w2.weight)
    return x + torch.sigmoid(F.linear(x, block.ffn_gate.weight, block.ffn_gate.bias)) * f


@pytest.fixture
def split_groups(monkeypatch):
    """Length groups with no fixed cost per group, so short test rows really split into several groups
    (the default cost keeps rows this short in one)."""
    monkeypatch.setattr(model.jagged, "plan_groups", partial(model.jagged.plan_groups, group_cost=0.0))


LENGTH_MIXES = [[5, 5, 5], [7, 1, 3, 6], [1, 1], [16, 2, 9, 4, 11, 3, 14]]


@pytest.mark.parametrize("kernel", ["fast", "reference"])
@pytest.mark.parametrize("max_groups", [1, 3])
@pytest.mark.parametrize("lengths", LENGTH_MIXES)
def test_ligr_block_matches_padded_reference_forward_and_backward(split_groups, kernel, max_groups, lengths):
    """float64: outputs at real tokens, the input gradient and every parameter gradient."""
    torch.manual_seed(len(lengths) + max_groups)
    cfg = cfg_(kernel=kernel)
    block = LiGRBlock(cfg).double()
    with torch.no_grad():  # biases and norm affines away from their init, so a misplaced one shows
        for name, p in block.named_parameters():
            if "norm.weight" in name:
                p.normal_(1.0, 0.2)
            elif p.dim() == 1:
                p.normal_(0.0, 0.5)
    length = max(lengths)
    valid = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(len(lengths), length, cfg.embedding_dim, dtype=torch.float64) * valid[..., None]
    x.requires_grad_(True)
    ts = torch.cumsum(torch.randint(1, 1000, (len(lengths), length + 1)), 1)
    grad_out = torch.randn(int(valid.sum()), cfg.embedding_dim, dtype=torch.float64)

    x_TD, batch, _ = padded_as_jagged(x, valid, ts, cfg, kind="hstu", max_groups=max_groups)
    assert len(batch) == min(max_groups, len(set(lengths)))  # the mixes really are split into groups
    got = block(x_TD, batch)
    got_grads = torch.autograd.grad(got, [x, *block.parameters()], grad_out)

    want = ligr_reference(block, x, valid)[valid]
    want_grads = torch.autograd.grad(want, [x, *block.parameters()], grad_out)

    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    names = ["x", *(n for n, _ in block.named_parameters())]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_ligr_reference_is_rectools_module_stack():
    """The functional reference above equals nn.MultiheadAttention + nn.LayerNorm modules holding the same
    weights (RecTools' LiGRLayer is built from these modules), so the parity test checks RecTools' layer."""
    torch.manual_seed(0)
    cfg = cfg_()
    block = LiGRBlock(cfg).eval()
    mha = torch.nn.MultiheadAttention(cfg.embedding_dim, cfg.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight)
        mha.in_proj_bias.copy_(block.qkv.bias.normal_())
        mha.out_proj.weight.copy_(block.out.weight)
        mha.out_proj.bias.copy_(block.out.bias.normal_())
    mha.eval()
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    x = torch.randn(2, 5, cfg.embedding_dim) * valid[..., None]
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    z = block.attn_norm(x)
    a, _ = mha(z, z, z, attn_mask=causal, key_padding_mask=~valid, need_weights=False)
    h = x + torch.sigmoid(block.attn_gate(x)) * a
    z = block.ffn_norm(h)
    want = h + torch.sigmoid(block.ffn_gate(h)) * block.w2(F.silu(block.w1(z)) * block.w3(z))
    with torch.no_grad():
        torch.testing.assert_close(ligr_reference(block, x, valid)[valid], want[valid], rtol=1e-5, atol=1e-6)


def test_parameter_count_and_init_follow_rectools():
    """Per block: MHA (fused in-projection with bias, out-projection with bias), two affine LayerNorms, two
    gates D -> D with bias, a bias-free SwiGLU of width D * ffn_multiply; projection biases zero at init."""
    d, mult, layers = 64, 4.0, 2
    cfg = ModelConfig(
        architecture="esasrec", embedding_dim=d, dqk=d, dv=d, ffn_multiply=mult, num_layers=layers
    )
    stack = ESASRecStack(cfg)
    f = int(d * mult)
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + 2 * 2 * d + 2 * (d * d + d) + 3 * d * f
    assert count_parameters(stack) == layers * per_block
    mha = torch.nn.MultiheadAttention(d, 1)
    block = stack.blocks[0]
    assert count_parameters(mha) == count_parameters(block.qkv) + count_parameters(block.out)
    assert not block.qkv.bias.any() and not block.out.bias.any()
    # xavier-normal: std sqrt(2 / (fan_in + fan_out)); the fused q/k/v matrix is [3D, D]
    assert block.qkv.weight.std().item() == pytest.approx((2 / (4 * d)) ** 0.5, rel=0.05)
    assert block.w1.weight.std().item() == pytest.approx((2 / (d + f)) ** 0.5, rel=0.05)


# --------------------------------------------------------------------------------------------------
# the whole recommender


def _train_step(model, items, times):
    seq = make_seq(items, times)
    neg = NegativeSampler(16, "per_position", 1, model.cfg.num_items, dedup=False).sample(
        seq["item_id"].lengths().long() - 1, torch.Generator().manual_seed(0)
    )
    model.zero_grad(set_to_none=True)
    out = model(seq, neg.lookup)
    loss = sampled_softmax_loss(out, neg, 0.05)
    loss.backward()
    return out.user_TD.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "variant",
    [
        {"kernel": "fast"},
        {"kernel": "fast", "length_buckets": 4},
        {"length_buckets": 3},
        {"padding": "fixed"},
    ],
)
def test_recommender_variants_match_one_padded_reference_group(split_groups, variant):
    """Loss, user vectors, encode_last and every gradient: the fast kernel and jagged length groups against
    the reference kernel on one group padded to the batch's longest row."""
    items, times = random_rows(9, 60, 17, seed=11)
    torch.manual_seed(0)
    ref = build_model(cfg_(kernel="reference", length_buckets=0))
    fast = build_model(ModelConfig(**{**ref.cfg.__dict__, **variant}))
    fast.load_state_dict(ref.state_dict())
    u0, l0, g0 = _train_step(ref, items, times)
    u1, l1, g1 = _train_step(fast, items, times)
    tol = dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(u1, u0, **tol)
    torch.testing.assert_close(l1, l0, **tol)
    assert g0.keys() == g1.keys() and all(g.abs().sum() > 0 for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    ref.eval(), fast.eval()
    seq = make_seq(items, times)
    last = ref.encode_last(seq)
    torch.testing.assert_close(fast.encode_last(seq), last, **tol)
    ends = torch.tensor([len(r) - 1 for r in items]).cumsum(0) - 1  # each row's last history token
    torch.testing.assert_close(last, ref(seq).user_TD[ends], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_a_later_item_never_changes_earlier_outputs(kernel):
    torch.manual_seed(1)
    model = build_model(cfg_(kernel=kernel)).eval()
    items, times = [3, 7, 9, 11, 4, 20, 5, 33], [100 * i for i in range(8)]
    base = model(make_seq([items], [times])).user_TD
    for k in range(1, 7):
        changed = list(items)
        changed[k] = 42
        out = model(make_seq([changed], [times])).user_TD
        torch.testing.assert_close(out[:k], base[:k], rtol=0, atol=0)
        assert not torch.allclose(out[k:], base[k:])


def test_a_row_alone_equals_the_row_in_a_batch(split_groups):
    torch.manual_seed(3)
    model = build_model(cfg_(length_buckets=3)).eval()
    items, times = random_rows(6, 60, 17, seed=4)
    together = model(make_seq(items, times)).user_TD
    start = 0
    for row_items, row_times in zip(items, times, strict=True):
        alone = model(make_seq([row_items], [row_times])).user_TD
        torch.testing.assert_close(together[start : start + len(alone)], alone, rtol=1e-5, atol=1e-6)
        start += len(alone)
    assert start == together.shape[0]


def test_dropout_positions():
    """In training the block drops out the attention output [T, D], the SwiGLU product [T, d_ffn] and the
    feed-forward output [T, D] (`dropout`), and the attention probabilities [n, H, L, L] (`attn_dropout`,
    reference kernel; SDPA's dropout_p under the fast kernel). Nothing is dropped in eval."""
    cfg = cfg_(kernel="reference", linear_dropout=0.3)
    block = LiGRBlock(cfg)
    seen: list[tuple[str, tuple[int, ...]]] = []
    for name in ("dropout", "attn_dropout"):
        module = getattr(block, name)
        module.register_forward_hook(lambda m, args, out, n=name: seen.append((n, tuple(args[0].shape))))
    valid = torch.ones(2, 5, dtype=torch.bool)
    x_TD, batch, _ = padded_as_jagged(torch.randn(2, 5, 12), valid, torch.zeros(2, 6, dtype=torch.long), cfg)
    block.train()
    out = block(x_TD, batch)
    assert seen == [
        ("attn_dropout", (2, 3, 5, 5)),
        ("dropout", (10, 12)),
        ("dropout", (10, cfg.d_ffn)),
        ("dropout", (10, 12)),
    ]
    block.eval()
    assert not torch.allclose(block(x_TD, batch), out)


def test_dropout_is_on_in_training_and_off_in_eval():
    """linear_dropout reaches the block (attention probabilities and both branches): two training forwards
    differ, two eval forwards are equal."""
    torch.manual_seed(2)
    model = build_model(cfg_(linear_dropout=0.3))
    seq = make_seq(*random_rows(3, 60, 10, seed=5))
    model.train()
    assert not torch.allclose(model(seq).user_TD, model(seq).user_TD)
    model.eval()
    torch.testing.assert_close(model(seq).user_TD, model(seq).user_TD, rtol=0, atol=0)


def test_exported_encoder_equals_encode_last():
    """The serving export (`torch.export` of encode_fixed, dynamic batch) computes what encode_last does."""
    from serving.export import FixedShapeEncoder, example_inputs

    torch.manual_seed(0)
    model = build_model(cfg_()).eval()
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(
        FixedShapeEncoder(model), example_inputs(60, 2, 10), dynamic_shapes=({0: batch}, {0: batch})
    )
    items, times = example_inputs(60, 5, 10, seed=3)
    rows = [[*r, 1] for r in items.tolist()]  # history + a target slot (its id is never read)
    want = model.encode_last(make_seq(rows, times.tolist()))
    torch.testing.assert_close(program.module()(items, times), want, rtol=1e-5, atol=1e-6)


def test_preset_keeps_the_papers_width_with_its_studys_levers():
    """ml-100k-esasrec: the paper's ML-1M width (d 64, one head, SwiGLU x4) under the levers its own
    ML-100K study chose (pipeline/train/recipe.py; docs/QUALITY.md)."""
    from pipeline.train.config import validate
    from pipeline.train.presets import get_preset

    cfg = validate(get_preset("ml-100k-esasrec"))
    m = cfg.model
    assert (m.architecture, m.embedding_dim, m.num_layers, m.num_heads, m.d_ffn) == ("esasrec", 64, 4, 1, 256)
    assert m.dqk * m.num_heads == m.dv * m.num_heads == m.embedding_dim  # nn.MultiheadAttention's widths
    assert (m.input_dropout, m.linear_dropout, cfg.optim.lr) == (0.2185, 0.1481, 0.0047362)
    assert (cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.schedule) == (30, 0.0, "cosine")
    assert (cfg.loss.negatives, cfg.loss.num_negatives) == ("full", 256)


def test_tiny_training_run_through_the_cli(tmp_path, monkeypatch, capsys):
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    argv = ["train", "--preset", "tiny", "--set", "tracking.enabled=false", "--report-json", str(report_path)]
    argv += ["--set", "model.architecture=esasrec", "--set", "loss.negatives=per_position"]
    assert main(argv) == 0
    assert "esasrec" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    losses = [h["train_loss"] for h in report["history"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for key in ("ndcg_at_10", "hr_at_10", "mrr"):
        assert torch.isfinite(torch.tensor(report["test"][key])), key
    assert 0.0 < report["test"]["hr_at_10"] <= 1.0


def test_compare_models_runs_esasrec_and_refuses_a_missing_preset_before_training(tmp_path):
    """benchmarks/compare_models.py (run as a script, as users run it): esasrec is one of the default
    models and gets its row; a per-model preset pattern that names no preset for one of the models stops
    with one line before anything trains."""
    from pipeline.data.sequences import write_sequences
    from pipeline.data.synthetic import SyntheticConfig, synthetic_sequences

    root = Path(__file__).resolve().parents[2]
    path = tmp_path / "shape.parquet"
    write_sequences(synthetic_sequences(SyntheticConfig(num_users=40, num_items=60, mean_length=10)), path)
    script = [sys.executable, str(root / "benchmarks" / "compare_models.py")]
    common = [
        "--data",
        str(path),
        "--seeds",
        "0",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "t"),
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def compare(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*script, *common, *args], capture_output=True, text=True, env=env, timeout=600)

    refused = compare("--preset", "tiny-{model}", "--models", "esasrec")
    assert refused.returncode == 2
    assert "--preset 'tiny-{model}': no preset tiny-esasrec" in refused.stderr
    assert not (tmp_path / "w" / "runs").exists()  # nothing trained
    assert "esasrec" in compare("--help").stdout

    done = compare("--preset", "tiny", "--models", "esasrec", "--set", "epochs=1")
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "t.json").read_text())
    assert row["model"] == "esasrec" and math.isfinite(row["test_ndcg_at_10"])
    trained = final_model_configs(tmp_path / "w")
    assert trained and all(m["architecture"] == "esasrec" for m in trained)
