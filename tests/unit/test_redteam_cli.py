"""Red-team corpus, the `fuxi` command line: every error is one line `fuxi: error: ...` and exit status 2,
whatever raised it (argparse, a handler's SystemExit, an OSError, a KeyError) and whatever the crafted
value holds (newlines, terminal escapes, NUL: written escaped, so one line stays one line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.redteam import files_under

# (id, argv ({tmp} -> the scratch folder), the exact line after "fuxi: error: ", as a regex)
CASES = [
    (
        "unknown-command",
        ["bogus"],
        r"argument command: invalid choice: 'bogus' \(choose from .*\) \(see fuxi --help\)",
    ),
    (
        "bad-int",
        ["recommend", "--k", "x"],
        r"argument --k: invalid int value: 'x' \(see fuxi recommend --help\)",
    ),
    (
        "bad-choice",
        ["data", "synth-logs", "--item-ids", "uuid", "--out", "{tmp}/x"],
        r"argument --item-ids: invalid choice: 'uuid' \(choose from 'dense', 'hashed', 'string'\) "
        r"\(see fuxi data synth-logs --help\)",
    ),
    (
        "missing-argument",
        ["eval"],
        r"the following arguments are required: --checkpoint \(see fuxi eval --help\)",
    ),
    (
        "handler-system-exit",
        ["data", "build-sequences", "--logs", "{tmp}/l", "--out", "{tmp}/o", "--num-items", "10"],
        r"--num-items is a catalogue of item rows: it needs --identity-ids",
    ),
    ("key-error", ["train", "--preset", "nope"], r"unknown preset 'nope'; choose from \[.*\]"),
    (
        "newline-in-path",
        ["eval", "--checkpoint", "{tmp}/a\nfuxi: error: forged"],
        r"{tmp}/a fuxi: error: forged does not exist",
    ),
    (
        "escape-in-path",
        ["eval", "--checkpoint", "{tmp}/a\x1b[2J\x1b[31m"],
        r"{tmp}/a\\x1b\[2J\\x1b\[31m does not exist",
    ),
    ("nul-in-path", ["eval", "--checkpoint", "{tmp}/a\x00b"], r"{tmp}/a\\x00b does not exist"),
    (
        "device-as-input",
        ["eval", "--checkpoint", "/dev/zero"],
        r"/dev/zero: NotADirectoryError: \[Errno 20\] Cannot list directory '/dev/zero'\. "
        r"Detail: \[errno 20\] Not a directory",
    ),
    (
        "set-unknown-field",
        ["train", "--preset", "tiny", "--set", "evil.x=1", "--set", "tracking.enabled=false"],
        r"unknown config section 'evil' in override 'evil\.x=1'",
    ),
    (
        "set-name-escapes",
        [
            "train",
            "--preset",
            "tiny",
            "--set",
            "name=../../escape",
            "--set",
            "tracking.enabled=false",
            "--set",
            "epochs=1",
        ],
        r"runs: run directory = '\.\./\.\./escape' climbs out with '\.\.'; names must stay inside it",
    ),  # fmt: skip
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_error_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    argv: list[str],
    pattern: str,
) -> None:
    from jobs.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("FUXI_DEBUG", raising=False)
    args = [a.replace("{tmp}", str(work)) for a in argv]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors exit from parse_args
        code = exc.code
    assert code == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    regex = "fuxi: error: " + pattern.replace("{tmp}", re.escape(str(work)))
    assert len(lines) == 1 and re.fullmatch(regex, lines[0]), f"\n{lines}\n!~ {regex}"
    assert not out.out
    assert files_under(work) == set()  # nothing written, not even in the working directory


def test_error_line_of_any_exception() -> None:
    from jobs.cli import error_line

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_line(MemoryError()) == "MemoryError"
    assert (
        error_line(RecursionError("maximum recursion depth exceeded")) == "maximum recursion depth exceeded"
    )
    assert error_line(KeyError("shards")) == "shards"
    assert error_line(ZeroDivisionError("division by zero")) == "ZeroDivisionError: division by zero"
    assert error_line(Unprintable()) == "Unprintable"
    assert error_line(ValueError("a\n  b\r\nc\x00\x1b")) == "a b c\\x00\\x1b"
