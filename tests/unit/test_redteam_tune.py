"""Red-team corpus, tune spaces: crafted `fuxi tune --space` files (docs/RELIABILITY.md).

A search space is data: YAML without tags or aliases, or JSON, of at most 1 MiB; every field a
hyperparameter of the config (never a name, path or URI), every distribution's values in the field's
range (its corners are validated before anything runs). One row = one crafted file and the exact line
`fuxi tune` prints (exit 2); a `!!python/...` tag would create a marker file (it never appears), and
nothing is written: no study, MLflow store or run folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers.redteam import files_under

LR = "optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
S = r"{space}: "
SP = S + r"search space "
# (id, file name, its text ({marker} -> the marker's path), the exact message after "fuxi: error: ")
# fmt: off
CASES = [
    # not data
    ("python-object-apply", "s.yaml", "x: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
     S + r"not valid YAML: could not determine a constructor for the tag "
     r"'tag:yaml\.org,2002:python/object/apply:builtins\.open' \(line 1, column 4\)"),
    ("python-object-os-system", "s.yaml", "x: !!python/object/apply:os.system ['touch {marker}']\n",
     S + r"not valid YAML: could not determine a constructor for the tag "
     r"'tag:yaml\.org,2002:python/object/apply:os\.system' \(line 1, column 4\)"),
    ("python-name", "s.yaml", "optim.lr: !!python/name:os.system\n",
     S + r"not valid YAML: could not determine a constructor for the tag "
     r"'tag:yaml\.org,2002:python/name:os\.system' \(line 1, column 11\)"),
    ("python-module-tag", "s.yaml", "optim.lr: !!python/module:os\n",
     S + r"not valid YAML: could not determine a constructor for the tag "
     r"'tag:yaml\.org,2002:python/module:os' \(line 1, column 11\)"),
    ("local-tag", "s.yaml", "optim.lr: !evil {type: float}\n",
     S + r"not valid YAML: could not determine a constructor for the tag '!evil' \(line 1, column 11\)"),
    ("billion-laughs", "s.yaml",
     "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\noptim.lr: {type: categorical, choices: [*c, *c, *c]}\n",
     S + r"not plain YAML: an alias \(line 2\)"),
    ("alias-merge", "s.yaml", "base: &b {type: float, low: 0.1, high: 0.2}\noptim.lr: {<<: *b}\n",
     S + r"not plain YAML: an alias \(line 2\)"),
    ("duplicate-key-yaml", "s.yaml", LR + LR, S + r"duplicate key 'optim\.lr' \(line 1\)"),
    ("duplicate-key-json", "s.json",
     '{"optim.lr": {"type": "float", "low": 0.1, "high": 0.2}, "optim.lr": {"type": "float", "low": 0.1, '
     '"high": 0.2}}', S + r"not valid JSON: duplicate key 'optim\.lr'"),
    ("json-nan", "s.json", '{"optim.lr": {"type": "float", "low": NaN, "high": 0.2}}',
     S + r"not valid JSON: NaN is not JSON"),
    ("json-5000-digits", "s.json", '{"epochs": {"type": "int", "low": 1, "high": ' + "9" * 5000 + "}}",
     S + r"not valid JSON: Exceeds the limit \(4300 digits\).*"),
    ("json-deep", "s.json", "[" * 100_000 + "]" * 100_000, S + r"not valid JSON: maximum recursion depth.*"),
    ("yaml-deep", "s.yaml", "[" * 100_000 + "]" * 100_000, S + r"not valid YAML: RecursionError"),
    ("huge-file", "s.yaml", LR + "#" * (1 << 20),
     S + r"1048\d\d\d bytes, a search space is at most 1048576"),
    ("not-utf8", "s.yaml", b"optim.lr: \xff\xfe\n", S + r"not UTF-8 text"),
    ("broken-yaml", "s.yaml", "optim.lr: {type: float\n",
     S + r"not valid YAML: expected ',' or '}', but got '<stream end>' \(line 2, column 1\)"),
    ("empty", "s.yaml", "", S + r"the search space must be a non-empty mapping field -> distribution"),
    ("list", "s.yaml", "- optim.lr\n",
     S + r"the search space must be a non-empty mapping field -> distribution"),
    ("scalar", "s.json", "3", S + r"the search space must be a non-empty mapping field -> distribution"),
    # fields that are not hyperparameters
    ("field-dotdot", "s.yaml", "../etc: {type: categorical, choices: [1]}\n",
     SP + r"'\.\./etc': not a config field name \(section\.field\)"),
    ("field-nul", "s.json", '{"optim.lr\\u0000": {"type": "float", "low": 0.1, "high": 0.2}}',
     SP + r"'optim\.lr\\x00': not a config field name \(section\.field\)"),
    ("field-unicode", "s.yaml", "optim.lr\u200b: {type: float, low: 0.1, high: 0.2}\n",
     SP + r"'optim\.lr\\u200b': not a config field name \(section\.field\)"),
    ("field-number", "s.yaml", "7: {type: float, low: 0.1, high: 0.2}\n",
     SP + r"'7': not a config field name \(section\.field\)"),
    ("field-unknown", "s.yaml", "optim.lrr: {type: float, low: 0.1, high: 0.2}\n",
     SP + r"'optim\.lrr': unknown config field"),
    ("field-section", "s.yaml", "optim: {type: float, low: 0.1, high: 0.2}\n",
     SP + r"'optim': unknown config field"),
    ("field-unknown-section", "s.yaml", "evil.lr: {type: float, low: 0.1, high: 0.2}\n",
     SP + r"'evil\.lr': unknown config section 'evil'"),
    ("field-dunder", "s.yaml", "optim.__class__: {type: categorical, choices: [1]}\n",
     SP + r"'optim\.__class__': unknown config field"),
    ("field-name", "s.yaml", "name: {type: categorical, choices: ['../../escape']}\n",
     SP + r"'name': not a hyperparameter \(a name, path or URI\); tune numbers, flags and fixed choices"),
    ("field-output-dir", "s.yaml", "output_dir: {type: categorical, choices: [/etc]}\n",
     SP + r"'output_dir': not a hyperparameter \(a name, path or URI\); tune numbers, flags and fixed "
     r"choices"),
    ("field-data-source", "s.yaml", "data.source: {type: categorical, choices: [/etc/passwd]}\n",
     SP + r"'data\.source': not a hyperparameter \(a name, path or URI\); tune numbers, flags and fixed "
     r"choices"),
    ("field-tracking-uri", "s.yaml", "tracking.uri: {type: categorical, choices: ['http://evil']}\n",
     SP + r"'tracking\.uri': not a hyperparameter \(a name, path or URI\); tune numbers, flags and fixed "
     r"choices"),
    ("field-init-checkpoint", "s.yaml", "init_checkpoint: {type: categorical, choices: [../other/ck]}\n",
     SP + r"'init_checkpoint': not a hyperparameter \(a name, path or URI\); tune numbers, flags and "
     r"fixed choices"),
    # distributions
    ("type-unknown", "s.yaml", "optim.lr: {type: uniform, low: 0.1, high: 0.2}\n",
     SP + r"'optim\.lr': needs type one of \('float', 'int', 'categorical'\), got .*"),
    ("spec-list", "s.yaml", "optim.lr: [0.1, 0.2]\n",
     SP + r"'optim\.lr': needs type one of \('float', 'int', 'categorical'\), got \[0\.1, 0\.2\]"),
    ("unknown-key", "s.yaml", "optim.lr: {type: float, low: 0.1, high: 0.2, evil: 1}\n",
     SP + r"'optim\.lr': unknown keys \['evil'\]"),
    ("no-high", "s.yaml", "optim.lr: {type: float, low: 0.1}\n",
     SP + r"'optim\.lr': float needs low and high"),
    ("low-string", "s.yaml", "optim.lr: {type: float, low: abc, high: 0.2}\n",
     SP + r"'optim\.lr': low must be a finite number \(got 'abc'\)"),
    ("low-bool", "s.yaml", "optim.lr: {type: float, low: true, high: 0.2}\n",
     SP + r"'optim\.lr': low must be a finite number \(got 'True'\)"),
    ("high-inf", "s.yaml", "optim.lr: {type: float, low: 0.1, high: .inf}\n",
     SP + r"'optim\.lr': high must be a finite number \(got 'inf'\)"),
    ("low-nan", "s.yaml", "optim.lr: {type: float, low: .nan, high: 0.2}\n",
     SP + r"'optim\.lr': low must be a finite number \(got 'nan'\)"),
    ("low-above-high", "s.yaml", "optim.lr: {type: float, low: 0.2, high: 0.1}\n",
     SP + r"'optim\.lr': low 0\.2 > high 0\.1"),
    ("int-fraction", "s.yaml", "model.num_layers: {type: int, low: 1.5, high: 4}\n",
     SP + r"'model\.num_layers': low must be an integer for type int \(got 1\.5\)"),
    ("step-zero", "s.yaml", "optim.lr: {type: float, low: 0.1, high: 0.2, step: 0}\n",
     SP + r"'optim\.lr': step 0\.0 must be > 0 and <= high - low"),
    ("step-negative", "s.yaml", "model.num_layers: {type: int, low: 1, high: 4, step: -1}\n",
     SP + r"'model\.num_layers': step -1 must be > 0 and <= high - low"),
    ("step-too-big", "s.yaml", "model.num_layers: {type: int, low: 1, high: 4, step: 10}\n",
     SP + r"'model\.num_layers': step 10 must be > 0 and <= high - low"),
    ("log-string", "s.yaml", "optim.lr: {type: float, low: 0.1, high: 0.2, log: 'no'}\n",
     SP + r"'optim\.lr': log must be true or false \(got 'no'\)"),
    ("log-from-zero", "s.yaml", "optim.lr: {type: float, low: 0.0, high: 0.2, log: true}\n",
     SP + r"'optim\.lr': log needs low > 0 and no step"),
    ("choices-empty", "s.yaml", "loss.num_negatives: {type: categorical, choices: []}\n",
     SP + r"'loss\.num_negatives': categorical needs a non-empty list of choices"),
    ("choices-mapping", "s.yaml", "loss.num_negatives: {type: categorical, choices: [{a: 1}]}\n",
     SP + r"'loss\.num_negatives': choice \"\{'a': 1\}\" is not a finite number, a flag, a string of <= 200 "
     r"characters, null, or a list of them"),
    ("choices-nan", "s.yaml", "loss.num_negatives: {type: categorical, choices: [.nan]}\n",
     SP + r"'loss\.num_negatives': choice 'nan' is not a finite number, a flag, a string of <= 200 "
     r"characters, null, or a list of them"),
    ("choices-too-many", "s.json",
     json.dumps({"loss.num_negatives": {"type": "categorical", "choices": list(range(1, 2000))}}),
     SP + r"'loss\.num_negatives': categorical takes only choices \(at most 1000\)"),
    ("choices-long-string", "s.yaml", "optim.schedule: {type: categorical, choices: [" + "x" * 300 + "]}\n",
     SP + r"'optim\.schedule': choice 'x{40}' is not a finite number, a flag, a string of <= 200 "
     r"characters, null, or a list of them"),
    # distributions that would train nothing: refused by the config's own ranges before anything runs
    ("epochs-from-zero", "s.yaml", "epochs: {type: int, low: 0, high: 3}\n",
     r"search space 'epochs' = 0: epochs must be >= 1 \(got 0\)"),
    ("negatives-zero", "s.yaml", "loss.num_negatives: {type: categorical, choices: [0, 64]}\n",
     r"search space 'loss\.num_negatives' = 0: loss\.num_negatives must be >= 1 \(got 0\)"),
    ("lr-negative", "s.yaml", "optim.lr: {type: float, low: -1.0, high: 0.1}\n",
     r"search space 'optim\.lr' = -1\.0: optim\.lr must be > 0 \(got -1\.0\)"),
    ("dropout-one", "s.yaml", "model.input_dropout: {type: float, low: 0.0, high: 1.0}\n",
     r"search space 'model\.input_dropout' = 1\.0: model\.input_dropout must be in \[0, 1\) \(got 1\.0\)"),
    ("schedule-unknown", "s.yaml", "optim.schedule: {type: categorical, choices: [cosine, evil]}\n",
     r"search space 'optim\.schedule' = 'evil': optim\.schedule must be one of .* \(got 'evil'\)"),
]
# fmt: on


@pytest.mark.parametrize("name, text, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_crafted_tune_space_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    name: str,
    text: str | bytes,
    pattern: str,
) -> None:
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    space = tmp_path / name
    if isinstance(text, bytes):
        space.write_bytes(text)
    else:
        space.write_text(text.replace("{marker}", str(marker)))
    before = files_under(tmp_path)
    argv = ["tune", "--preset", "tiny", "--space", str(space), "--study", "s", "--trials", "1"]
    argv += ["--tune-dir", str(tmp_path / "tune"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    regex = "fuxi: error: " + pattern.replace("{space}", re.escape(str(space)))
    assert len(lines) == 1 and re.fullmatch(regex, lines[0]), f"\n{lines}\n!~ {regex}"
    assert not marker.exists()
    assert files_under(tmp_path) == before  # no study, MLflow store or tune folder


def test_a_plain_space_is_read() -> None:
    import tempfile

    from jobs.tune import load_space

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "space.yaml"
        path.write_text(LR + "model.channels: {type: categorical, choices: [[pos, ts], [pos]]}\n")
        lr, channels = load_space(path)
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, True) and channels.choices == ("pos,ts", "pos")
