"""Config values that would fail later or train nothing are refused up front, in one line naming the field."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys

import pytest

from jobs.cli import main
from pipeline.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    from_dict,
    to_dict,
    to_flat_dict,
    validate,
)
from pipeline.train.presets import PRESETS, get_preset

CASES = [
    (["--set", "epochs=-1"], "epochs must be >= 1 (got -1)"),
    (["--set", "epochs=0"], "epochs must be >= 1 (got 0)"),
    (["--set", "loss.num_negatives=0"], "loss.num_negatives must be >= 1 (got 0)"),
    (["--set", "model.embedding_dim=0"], "model.embedding_dim must be >= 1 (got 0)"),
    (["--set", "model.num_heads=0"], "model.num_heads must be >= 1 (got 0)"),
    (["--set", "batch_size=0"], "batch_size must be >= 1 (got 0)"),
    (["--set", "optim.lr=0"], "optim.lr must be > 0 (got 0.0)"),
    (["--set", "optim.betas=0.9,1.5"], "optim.betas must be two values in [0, 1) (got (0.9, 1.5))"),
    (["--set", "loss.temperature=-0.1"], "loss.temperature must be > 0 (got -0.1)"),
    (["--set", "model.input_dropout=1"], "model.input_dropout must be in [0, 1) (got 1.0)"),
    (["--set", "model.ffn_multiply=0.01"], "model.ffn_multiply gives a 0-wide MFFN (embedding_dim 16)"),
    (["--set", "loss.negatives=all"], "loss.negatives must be one of 'per_position', 'shared', 'full'"),
    (["--set", "data.protocol=random"], "data.protocol must be one of 'anchor', 'validated', 'temporal'"),
    (["--set", "model.architecture=bert"], "model.architecture must be one of 'fuxi', 'hstu'"),
    (["--set", "parallel.sharding_types=rows"], "parallel.sharding_types: 'rows' is not one of row_wise"),
    (["--set", "model.num_layers=two"], "model.num_layers: cannot use 'two'"),
    (["--set", "model.num_layer=2"], "unknown config field 'model.num_layer'"),
    (
        ["--set", "data.cut=yesterday"],
        "data.cut must be a date YYYY-MM-DD, unix seconds or 'end' (got 'yesterday')",
    ),
    (["--set", "keep_checkpoints=-1"], "keep_checkpoints must be >= 0 (got -1)"),
    (["--set", "data.synthetic.min_length=1"], "data.synthetic.min_length must be >= 3"),
    (["--set", "tracking.log_every_steps=0"], "tracking.log_every_steps must be >= 1 (got 0)"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_value_is_one_line_error_and_nonzero_exit(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--preset", "tiny", "--set", "tracking.enabled=false", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuxi: error: "), err
    assert message in err[0], err[0]


def test_no_traceback_from_the_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "train", "--preset", "tiny", "--set", "model.embedding_dim=0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fuxi: error: model.embedding_dim must be >= 1 (got 0)"


def test_every_preset_is_valid_and_run_validates() -> None:
    for name in PRESETS:
        validate(get_preset(name))
    from pipeline.train.run import run

    cfg = get_preset("tiny")
    cfg.loss.num_negatives = 0
    with pytest.raises(ConfigError, match="loss.num_negatives"):
        run(cfg)  # jobs that build configs in code (sweeps, the nightly job) meet the same checks


# accepted values, each coerced by its field's declared type: (override, field, the value the run gets)
ACCEPTED = [
    ("data.cut=1704412800", "data.cut", 1704412800),  # unix seconds, as the README documents
    ("data.cut=2024-01-05", "data.cut", datetime.date(2024, 1, 5)),
    ("data.cut=none", "data.cut", None),
    ("data.cut=end", "data.cut", "end"),  # the last two windows are valid and test
    ("tracking.run_name=123", "tracking.run_name", "123"),  # a name is a string, whatever it looks like
    ("tracking.parent_run_id=0a1f2f", "tracking.parent_run_id", "0a1f2f"),
    ("name=1e3", "name", "1e3"),
    ("epochs=3", "epochs", 3),
    ("optim.lr=1e-3", "optim.lr", 0.001),
    ("model.ffn_multiply=4", "model.ffn_multiply", 4.0),
    ("optim.betas=0.9,0.99", "optim.betas", (0.9, 0.99)),
    ("optim.betas=(0.8, 0.9)", "optim.betas", (0.8, 0.9)),
    ("model.channels=pos,sem", "model.channels", ("pos", "sem")),
    ("model.channels=pos", "model.channels", ("pos",)),
    ("parallel.sharding_types=row_wise,column_wise", "parallel.sharding_types", ("row_wise", "column_wise")),
    ("parallel.embedding_lr=0.01", "parallel.embedding_lr", 0.01),
    ("parallel.embedding_lr=null", "parallel.embedding_lr", None),
    ("tracking.enabled=false", "tracking.enabled", False),
    ("resume=yes", "resume", True),
    ("loss.negatives=full", "loss.negatives", "full"),
    ("model.input_dropout=0", "model.input_dropout", 0.0),
    ("optim.min_lr_ratio=1", "optim.min_lr_ratio", 1.0),
    ("data.synthetic.min_length=3", "data.synthetic.min_length", 3),
    ("run_dir=runs/job-7", "run_dir", "runs/job-7"),
]


@pytest.mark.parametrize(("override", "key", "value"), ACCEPTED, ids=[o for o, _, _ in ACCEPTED])
def test_accepted_value_is_coerced_by_the_declared_type(override: str, key: str, value: object) -> None:
    cfg = validate(apply_overrides(get_preset("tiny"), [override]))
    got = to_flat_dict(cfg)[key]
    assert got == value and type(got) is type(value), (got, value)


def test_train_accepts_a_cut_in_unix_seconds_and_as_a_date(tmp_path) -> None:
    """`fuxi train --set data.cut=...`: 1704412800 is 2024-01-05 00:00 UTC, so both runs are the same run."""
    reports = []
    for cut in ("1704412800", "2024-01-05"):
        out = tmp_path / f"{cut}.json"
        args = ["--set", "data.protocol=temporal", "--set", f"data.cut={cut}", "--set", "epochs=1"]
        args += [
            "--set",
            "tracking.enabled=false",
            "--set",
            f"output_dir={tmp_path}",
            "--report-json",
            str(out),
        ]
        assert main(["train", "--preset", "tiny", *args]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["protocol"] == "temporal" and reports[0]["users"]["valid"] > 0
    assert reports[0]["users"] == reports[1]["users"] and reports[0]["test"] == reports[1]["test"]


def test_overrides_do_not_depend_on_their_order() -> None:
    """Cross-field rules are checked on the finished tree, not after each override."""
    longer = ["model.max_sequence_length=120", "model.padded_length=131"]
    for overrides in (longer, longer[::-1]):
        cfg = validate(apply_overrides(get_preset("tiny"), overrides))
        assert (cfg.model.max_sequence_length, cfg.model.padded_length) == (120, 131)
    with pytest.raises(ConfigError, match=r"^model.padded_length must be >= max_sequence_length \+ 1 = 121"):
        validate(apply_overrides(get_preset("tiny"), longer[:1]))


# train.json of a checkpoint written before the typed config: tuples as lists, dates as strings, and
# without the fields added since (init_optimizer, max_steps, ...): they take their defaults
OLD_TRAIN_JSON = {
    "name": "tiny",
    "model": {
        "architecture": "fuxi",
        "num_items": 201,
        "embedding_dim": 16,
        "num_layers": 2,
        "num_heads": 1,
        "dqk": 16,
        "dv": 16,
        "ffn_multiply": 1.0,
        "max_sequence_length": 50,
        "padded_length": 61,
        "num_time_buckets": 128,
        "time_bucket_divisor": 0.301,
        "input_dropout": 0.2,
        "linear_dropout": 0.2,
        "channels": ["pos", "ts", "sem"],
        "time_delta": "next",
        "attn_norm": "padded",
        "ffn_single_stage": False,
        "ffn_out_init_scale": 0.0,
        "attention": "ams",
        "sasrec_ffn_hidden": 50,
        "llama_positions": "rope",
        "kernel": "fast",
        "fast_chunk": 64,
        "length_buckets": 4,
        "padding": "batch",
        "l2_norm_eps": 1e-06,
        "extra": {},
    },
    "data": {
        "source": "synthetic",
        "synthetic": {
            "num_users": 200,
            "num_items": 200,
            "num_themes": 10,
            "mean_length": 20,
            "max_length": 60,
        },
        "protocol": "temporal",
        "cut": "1704412800",
        "window_seconds": 86400,
        "stream": False,
    },
    "loss": {"num_negatives": 32, "negatives": "shared", "temperature": 0.05},
    "optim": {"lr": 0.001, "betas": [0.9, 0.98], "eps": 1e-08, "weight_decay": 0.0},
    "tracking": {"enabled": False, "uri": None, "experiment": "fuxi-alpha", "run_name": None},
    "parallel": {"sharding_types": [], "embedding_optimizer": "auto", "embedding_lr": None},
    "batch_size": 64,
    "eval_batch_size": 128,
    "epochs": 2,
    "seed": 42,
    "output_dir": "runs",
    "run_dir": None,
    "resume": False,
    "progress": False,
}


def test_train_json_of_an_older_checkpoint_loads(tmp_path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"config": OLD_TRAIN_JSON}))
    cfg = validate(from_dict(TrainConfig, json.loads(path.read_text())["config"]))
    assert cfg.model.channels == ("pos", "ts", "sem") and cfg.optim.betas == (0.9, 0.98)
    assert cfg.data.cut == 1704412800 and cfg.model.num_items == 201
    assert cfg.init_optimizer is True and cfg.max_steps == 0 and cfg.optim.schedule == "constant"
    # and what the typed config writes reads back the same
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    ("section", "change", "message"),
    [
        ("model", {"kernel": "padded"}, "model.kernel must be one of 'reference', 'fast' (got 'padded')"),
        ("model", {"attn_mode": "ams"}, "unknown config field 'model.attn_mode'"),
        ("loss", {"num_negatives": "many"}, "loss.num_negatives"),
    ],
)
def test_train_json_with_a_changed_field_fails_in_one_line(section: str, change: dict, message: str) -> None:
    old = json.loads(json.dumps(OLD_TRAIN_JSON))
    old[section].update(change)
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, old)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
