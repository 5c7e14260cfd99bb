"""Config values that would fail later or train nothing are refused up front, in one line naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import main
from pipeline.train.config import PRESETS, ConfigError, get_preset, validate

CASES = [
    (["--epochs", "-1"], "epochs must be >= 1 (got -1)"),
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
    (["--set", "data.cut=yesterday"], "data.cut must be a date YYYY-MM-DD or unix seconds (got 'yesterday')"),
    (["--set", "keep_checkpoints=-1"], "keep_checkpoints must be >= 0 (got -1)"),
    (["--set", "data.synthetic.min_length=1"], "data.synthetic.min_length must be >= 3"),
    (["--set", "tracking.log_every_steps=0"], "tracking.log_every_steps must be >= 1 (got 0)"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_value_is_one_line_error_and_nonzero_exit(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--preset", "tiny", "--no-tracking", *args]) == 2
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
