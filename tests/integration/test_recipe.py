"""The recipe levers of issue 16: the MFFN stage-2 init, the learning-rate schedule, early stopping, the
step budget and the full softmax, each with its range check; and a short training in which FuXi-alpha
must clear a margin over its untrained self, which the official stage-2 init misses (docs/QUALITY.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from model.config import ModelConfig
from model.fuxi import MFFN
from model.loss import NegativeSampler
from pipeline.data.sequences import write_sequences
from pipeline.data.synthetic import SyntheticConfig, synthetic_sequences
from pipeline.train.config import apply_overrides, validate
from pipeline.train.presets import PRESETS, get_preset, resolve_config
from pipeline.train.recipe import (
    MAX_EPOCHS,
    MIN_EPOCHS,
    TARGET_STEPS,
    DataShape,
    data_shape,
    generic,
)
from pipeline.train.run import run
from pipeline.train.trainer import lr_multiplier
from tests.helpers.checkpoints import final_model_configs

# the tiny preset at the official width (d = dqk = dv = 50, d_FFN = 50: where the official SwiGLU
# init makes stage 2 ~3x the residual it is added to), 6 epochs of 4 steps
OFFICIAL_WIDTH = ["model.embedding_dim=50", "model.dqk=50", "model.dv=50", "epochs=6"]
MARGIN = 0.08  # valid NDCG@10 over the untrained model; measured: zero init +0.118, official +0.048

ROOT = Path(__file__).resolve().parents[2]


def train(overrides: list[str]) -> dict:
    cfg = get_preset("tiny")
    cfg.tracking.enabled = False
    cfg.progress = False
    cfg.checkpoint_every_epochs = 0
    apply_overrides(cfg, overrides)
    return run(cfg)


def untrained_valid_ndcg(overrides: list[str]) -> float:
    """The validation NDCG@10 of the model as initialised: one step at a learning rate of 1e-12."""
    report = train(overrides + ["optim.lr=1e-12", "max_steps=1"])
    return report["valid_ndcg_at_10"]


@pytest.mark.parametrize("scale, clears", [(0.0, True), (1.0, False)])
def test_fuxi_clears_a_margin_over_untrained_within_24_steps(tmp_path, scale: float, clears: bool) -> None:
    overrides = OFFICIAL_WIDTH + [f"model.ffn_out_init_scale={scale}", f"output_dir={tmp_path}"]
    base = untrained_valid_ndcg(overrides)
    report = train(overrides)
    assert report["steps"] == 24
    gain = report["valid_ndcg_at_10"] - base
    # the fix learns within the budget; the official init is still far behind at the same step
    assert (gain >= MARGIN) == clears, (scale, base, report["valid_ndcg_at_10"])


def test_stage2_init_scale() -> None:
    cfg = ModelConfig(num_items=10, embedding_dim=8, dqk=8, dv=8)
    torch.manual_seed(0)
    official = MFFN(cfg, 24)
    torch.manual_seed(0)
    zero = MFFN(ModelConfig(num_items=10, embedding_dim=8, dqk=8, dv=8, ffn_out_init_scale=0.0), 24)
    assert official.swiglu is not None and zero.swiglu is not None
    assert torch.count_nonzero(zero.swiglu.w2.weight) == 0
    # the same random draws: only W2 differs, so scale 1.0 is the official init bit for bit
    assert torch.equal(official.swiglu.w1.weight, zero.swiglu.w1.weight)
    assert torch.equal(official.proj.weight, zero.proj.weight)
    h, x = torch.randn(5, 24), torch.randn(5, 8)
    zero.eval()
    assert torch.allclose(zero(h, x), zero.proj(h) + x)  # stage 2 starts as the identity
    with pytest.raises(ValueError, match="ffn_out_init_scale"):
        ModelConfig(ffn_out_init_scale=-0.5)


def test_lr_schedule() -> None:
    assert [lr_multiplier(s, 10, 0, "constant", 0.0) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_multiplier(s, 10, 4, "constant", 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [lr_multiplier(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert cosine[2] == 1.0 and cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    assert lr_multiplier(6, 11, 0, "linear", 0.0) == pytest.approx(0.4)
    assert lr_multiplier(5, 11, 0, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_schedule_early_stopping_and_budget_in_a_run(tmp_path) -> None:
    base = [f"output_dir={tmp_path}", "data.synthetic.num_users=100", "epochs=5"]
    # a budget of 5 steps (2 batches an epoch): stops mid-epoch 3, evaluates and selects there
    report = train(base + ["max_steps=5", "optim.warmup_steps=3", "optim.schedule=cosine"])
    assert report["steps"] == 5 and report["epochs"] == 3 and report["stopped_early"] == "max_steps"
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    # patience 1 at a learning rate too small to improve anything: stops one evaluation after the best
    report = train(base + ["patience=1", "optim.lr=1e-9"])
    assert report["stopped_early"] == "patience"
    assert report["epochs"] == report["selected_epoch"] + 1 < 5
    for bad in ("optim.warmup_steps=-1", "optim.schedule=step", "optim.min_lr_ratio=2", "patience=-1"):
        with pytest.raises(ValueError):
            validate(apply_overrides(get_preset("tiny"), [bad]))
    with pytest.raises(ValueError):
        validate(apply_overrides(get_preset("tiny"), ["loss.negatives=all"]))


def test_full_softmax_scores_every_item_once(tmp_path) -> None:
    sampler = NegativeSampler(7, "full", low=1, high=11)
    neg = sampler.sample(torch.tensor([3, 2]))
    assert neg.ids.tolist() == list(range(1, 11)) and neg.lookup.lengths().tolist() == [10, 0]
    report = train([f"output_dir={tmp_path}", "loss.negatives=full", "epochs=2"])
    assert report["test"]["ndcg_at_10"] > 0


def test_generic_recipe_is_sized_by_the_data() -> None:
    # few users, a small catalogue, long histories: the exact softmax, the official 200 positions, enough
    # epochs for the step budget (3 steps an epoch), capped
    small = generic(DataShape(users=300, items=1683, mean_length=100.0, p95_length=420), "a.parquet")
    assert (small.model.max_sequence_length, small.model.padded_length) == (200, 211)
    assert small.loss.negatives == "full" and small.data.protocol == "validated"
    assert small.epochs == MAX_EPOCHS and small.patience > 0
    # many users, a large catalogue, short histories: sampled negatives, 30 positions, the epoch floor
    big = generic(DataShape(users=100_000, items=50_001, mean_length=9.0, p95_length=23), "b.parquet")
    assert (big.model.max_sequence_length, big.model.padded_length) == (30, 41)
    assert big.loss.negatives == "per_position" and big.epochs == MIN_EPOCHS
    # in between: epochs for TARGET_STEPS steps (8 steps an epoch at 1,000 users)
    mid = generic(DataShape(users=1000, items=9000, mean_length=50.0, p95_length=150), "c.parquet")
    assert mid.epochs == max(MIN_EPOCHS, math.ceil(TARGET_STEPS / 8)) and mid.loss.negatives == "per_position"
    for cfg in (small, big, mid):
        validate(cfg)
    with pytest.raises(ValueError, match="--data"):
        get_preset("auto")


# (layers, dropout, lr, warm-up, weight decay, width, negatives at 1,683 items, negatives per position):
# each architecture's own levers, written out here rather than read from recipe.py
RECIPE_LEVERS = {
    "fuxi": (3, 0.4567, 0.0017692, 20, 0.01, 50, "full", 128),  # its ML-100K study
    "hstu": (3, 0.4567, 0.0017692, 20, 0.01, 50, "full", 128),  # its own study chose the same point
    "sasrec": (2, 0.2, 1e-3, 0, 0.0, 50, "per_position", 128),  # the official ML-1M levers
    "llama": (2, 0.2, 1e-3, 0, 0.0, 50, "per_position", 128),
    "esasrec": (4, 0.1481, 0.0047362, 30, 0.0, 64, "full", 256),  # its study, from its paper's settings
}


def levers(cfg) -> tuple:
    m, o = cfg.model, cfg.optim
    return (
        m.num_layers,
        m.linear_dropout,
        o.lr,
        o.warmup_steps,
        o.weight_decay,
        m.embedding_dim,
        cfg.loss.negatives,
        cfg.loss.num_negatives,
    )


@pytest.mark.parametrize("architecture", sorted(RECIPE_LEVERS))
def test_each_architecture_gets_its_own_generic_recipe(tmp_path, architecture: str) -> None:
    shape = DataShape(users=300, items=1683, mean_length=100.0, p95_length=420)
    cfg = validate(generic(shape, "a.parquet", architecture))
    assert cfg.model.architecture == architecture and levers(cfg) == RECIPE_LEVERS[architecture]
    assert (cfg.model.num_items, cfg.model.max_sequence_length, cfg.epochs) == (1683, 200, MAX_EPOCHS)
    # what `fuxi train --data X --set model.architecture=A` resolves: A's recipe, sized by X
    path = tmp_path / "seq.parquet"
    write_sequences(synthetic_sequences(SyntheticConfig(num_users=60, num_items=80, mean_length=12)), path)
    resolved = resolve_config("auto", str(path), [f"model.architecture={architecture}", "seed=3"])
    assert levers(resolved)[:6] == RECIPE_LEVERS[architecture][:6] and resolved.seed == 3
    assert resolved.model.num_items == data_shape(str(path)).items and resolved.data.source == str(path)
    # the tuned ML-100K preset of a model and its generic recipe share the levers
    if f"ml-100k-{architecture}" in PRESETS:
        preset = get_preset(f"ml-100k-{architecture}")
        assert levers(preset)[:6] == RECIPE_LEVERS[architecture][:6]


def test_a_catalogue_too_large_for_the_exact_softmax_samples_instead() -> None:
    big = DataShape(users=100_000, items=50_001, mean_length=9.0, p95_length=23)
    assert generic(big, "b.parquet", "fuxi").loss.negatives == "per_position"
    assert generic(big, "b.parquet", "esasrec").loss.num_negatives == 256


def test_every_preset_given_data_shows_that_datas_sizes(tmp_path, capsys) -> None:
    path = tmp_path / "other.parquet"
    write_sequences(synthetic_sequences(SyntheticConfig(num_users=30, num_items=77, mean_length=8)), path)
    rows = data_shape(str(path)).items
    assert rows not in (1683, 3953)  # unlike any preset's own catalogue
    with pytest.raises(ValueError, match="model.architecture"):  # a typo names the field, not a recipe
        resolve_config("auto", str(path), ["model.architecture=sasrecc"])
    for name in PRESETS:
        cfg = get_preset(name, str(path))
        assert (cfg.model.num_items, cfg.data.source) == (rows, str(path)), name
        validate(cfg)
    assert main(["presets", "--show", "ml-100k-sasrec", "--data", str(path)]) == 0
    shown = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert shown["model.num_items"] == str(rows) and shown["model.architecture"] == "'sasrec'"
    assert (
        main(["presets", "--show", "auto", "--data", str(path), "--set", "model.architecture=esasrec"]) == 0
    )
    shown = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert (shown["model.num_items"], shown["model.embedding_dim"], shown["loss.num_negatives"]) == (
        str(rows),
        "64",
        "256",
    )


def test_train_without_a_preset_uses_the_generic_recipe(tmp_path, capsys) -> None:
    path = tmp_path / "seq.parquet"
    write_sequences(synthetic_sequences(SyntheticConfig(num_users=60, num_items=80, mean_length=12)), path)
    args = [
        "train",
        "--data",
        str(path),
        "--set",
        "tracking.enabled=false",
        "--set",
        f"output_dir={tmp_path}/runs",
    ]
    report_path = tmp_path / "report.json"
    assert main(args + ["--set", "epochs=1", "--report-json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert f"no preset named, the generic fuxi recipe for {path}" in out
    expected = generic(data_shape(str(path)), str(path))
    report = json.loads(report_path.read_text())
    config = json.loads((Path(report["checkpoint"]) / "train.json").read_text())["config"]
    assert report["epochs"] == 1 and config["name"] == "auto" and config["model"]["max_sequence_length"] == 20
    assert config["loss"]["negatives"] == expected.loss.negatives == "full"
    assert config["optim"]["lr"] == expected.optim.lr and config["patience"] == expected.patience


def test_compare_models_labels_a_variant_and_combines_runs(tmp_path) -> None:
    """benchmarks/compare_models.py builds the docs/quality tables: a --set variant is its own row under
    --label, and --combine of the written JSON files gives the same table without training. Run as a
    script, the way the docs run it."""

    def compare(args: list[str]) -> None:
        script = [sys.executable, "benchmarks/compare_models.py"]
        proc = subprocess.run(script + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    path = tmp_path / "shape.parquet"
    write_sequences(synthetic_sequences(SyntheticConfig(num_users=40, num_items=60, mean_length=10)), path)
    common = [
        "--data",
        str(path),
        "--preset",
        "tiny",
        "--models",
        "fuxi",
        "--seeds",
        "0",
        "--set",
        "epochs=1",
    ]
    compare(common + ["--work", str(tmp_path / "a"), "--out", str(tmp_path / "base")])
    compare(
        common
        + ["--set", "model.channels=pos,sem", "--label", "no-ts", "--work", str(tmp_path / "b")]
        + ["--out", str(tmp_path / "no_ts")]
    )
    rows = [json.loads((tmp_path / f"{n}.json").read_text())[0] for n in ("base", "no_ts")]
    assert [r["model"] for r in rows] == ["fuxi", "fuxi no-ts"]
    assert all(r["data"] == "shape" and r["epochs_run"] == 1 for r in rows)
    assert rows[1]["overrides"] == ["epochs=1", "model.channels=pos,sem"]
    trained = final_model_configs(tmp_path / "b")
    assert trained and all(m["channels"] == ["pos", "sem"] for m in trained)  # the variant is what trained
    compare(
        [
            "--combine",
            str(tmp_path / "base.json"),
            str(tmp_path / "no_ts.json"),
            "--out",
            str(tmp_path / "all"),
        ]
    )
    text = (tmp_path / "all.md").read_text()
    table, paired = text.split("Paired by seed")
    paired, wide = paired.split("side by side")
    cells = [line.split(" | ")[1:4] for line in table.splitlines() if line.startswith("| shape")]
    assert cells == [
        [r["model"], f"{r['test_ndcg_at_10']:.4f}", f"{r['test_ndcg_at_10']:.4f} ± 0.0000"] for r in rows
    ]
    # the paired table: the first model minus the variant, seed by seed (one seed: no standard error)
    diff = rows[0]["test_ndcg_at_10"] - rows[1]["test_ndcg_at_10"]
    assert [line.split(" | ")[1:4] for line in paired.splitlines() if line.startswith("| shape")] == [
        ["fuxi no-ts", f"{diff:+.4f}", f"{diff:+.4f} ± 0.0000"]
    ]
    assert (tmp_path / "all.png").stat().st_size > 0


def test_compare_models_paired_differences_over_seeds(tmp_path) -> None:
    """--combine of hand-made rows: the paired table subtracts seed by seed and reports the standard error
    of the differences (stdev / sqrt(n)), here +0.01, +0.02, -0.01: mean +0.0067, s.e. 0.0088."""
    tests = {"fuxi": [0.10, 0.12, 0.11], "sasrec": [0.09, 0.10, 0.12]}
    hits = {"fuxi": [0.20, 0.22, 0.24], "sasrec": [0.20, 0.20, 0.20]}
    keys = ("epochs_run", "selected_epoch", "steps", "seconds_per_epoch", "to_selected_s", "wall_s")
    rows = [
        {"data": "d", "model": m, "preset": "auto", "seed": seed, "valid_ndcg_at_10": 0.1}
        | {"test_ndcg_at_10": t, "test_hr_at_10": hits[m][seed], "protocol": "temporal"}
        | dict.fromkeys(keys, 1)
        for m, ts in tests.items()
        for seed, t in enumerate(ts)
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = [sys.executable, "benchmarks/compare_models.py", "--combine", str(tmp_path / "rows.json")]
    proc = subprocess.run(
        script + ["--out", str(tmp_path / "t")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "t.md").read_text()
    assert "seeds [0, 1, 2], temporal protocol" in text
    assert "| d | sasrec | +0.0100, +0.0200, -0.0100 | +0.0067 ± 0.0088 | 2 of 3 |" in text
    # both metrics as mean ± sample standard deviation over the seeds
    assert "| d | fuxi | 0.1000, 0.1200, 0.1100 | 0.1100 ± 0.0100 | 0.2200 ± 0.0200 |" in text
    assert "| d | sasrec | 0.0900, 0.1000, 0.1200 | 0.1033 ± 0.0153 | 0.2000 ± 0.0000 |" in text
    # and side by side, one row per data set, the best NDCG@10 in bold
    assert "| d | **0.1100 ± 0.0100** / 0.2200 ± 0.0200 | 0.1033 ± 0.0153 / 0.2000 ± 0.0000 |" in text


def test_compare_models_auto_trains_each_model_on_its_own_recipe(tmp_path) -> None:
    """`compare_models.py --preset auto` on a sequence Parquet file: each model's generic recipe (not
    FuXi-alpha's levers for all), and the table printed."""
    path = tmp_path / "held_out.parquet"
    write_sequences(synthetic_sequences(SyntheticConfig(num_users=40, num_items=60, mean_length=10)), path)
    script = [sys.executable, "benchmarks/compare_models.py", "--data", str(path), "--preset", "auto"]
    args = [
        "--models",
        "sasrec",
        "esasrec",
        "--seeds",
        "0",
        "--set",
        "epochs=1",
        "--work",
        str(tmp_path / "w"),
    ]
    proc = subprocess.run(
        script + args + ["--out", str(tmp_path / "t")], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "| held_out | sasrec |" in proc.stdout and "| held_out | esasrec |" in proc.stdout
    trained = {m["architecture"]: m for m in final_model_configs(tmp_path / "w")}
    assert (trained["sasrec"]["num_layers"], trained["sasrec"]["linear_dropout"]) == (2, 0.2)
    assert (trained["esasrec"]["embedding_dim"], trained["esasrec"]["linear_dropout"]) == (64, 0.1481)
