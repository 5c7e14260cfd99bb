"""`fuxi` turns every error into one line on stderr and exit status 2 (the traceback only with
FUXI_DEBUG=1), and Ctrl-C into one line and exit status 130. The commands run as real processes.
(A truncated DCP shard given to `fuxi eval`: tests/integration/test_safe_loading.py.)"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import error_line, main

ROOT = Path(__file__).resolve().parents[1]


def fuxi(*args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FUXI_DEBUG", None)
    if debug:
        env["FUXI_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_an_os_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # a folder where a file is expected: IsADirectoryError, an OSError the CLI used to print as a traceback
    proc = fuxi("tune", "--space", str(tmp_path), "--study", "s")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"fuxi: error: [Errno 21] Is a directory: '{tmp_path}'"]
    missing = tmp_path / "missing.yaml"
    proc = fuxi("tune", "--space", str(missing), "--study", "s")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"fuxi: error: [Errno 2] No such file or directory: '{missing}'"]


def test_fuxi_debug_shows_the_traceback_then_the_line(tmp_path: Path) -> None:
    proc = fuxi("tune", "--space", str(tmp_path), "--study", "s", debug=True)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2:] == [
        f"IsADirectoryError: [Errno 21] Is a directory: '{tmp_path}'",
        f"fuxi: error: [Errno 21] Is a directory: '{tmp_path}'",
    ]
    assert any(line.strip().startswith('File "') and "jobs/tune.py" in line for line in lines)


def test_a_bad_space_file_names_the_file_line_and_column(tmp_path: Path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: [1\n")
    assert main(["tune", "--space", str(space), "--study", "s"]) == 2
    err = capsys.readouterr().err
    problem = "expected ',' or ']', but got '<stream end>'"
    assert err == f"fuxi: error: {space}: not valid YAML: {problem} (line 2, column 1)\n"


def test_a_multi_line_message_becomes_one_line() -> None:
    with pytest.raises(yaml.YAMLError) as parsed:
        yaml.safe_load("a: [1\n")
    assert str(parsed.value).count("\n") >= 3  # yaml's message: problem, marks and a caret line
    assert error_line(parsed.value) == (
        "ParserError: while parsing a flow sequence "
        'in "<unicode string>", line 1, column 4: a: [1 ^ '
        "expected ',' or ']', but got '<stream end>' "
        'in "<unicode string>", line 2, column 1: ^'
    )
    # messages meant for the user keep their text (no type name), folded the same way
    assert (
        error_line(ValueError("data.csv: row 3:\n  user_id is empty\n"))
        == "data.csv: row 3: user_id is empty"
    )
    assert error_line(KeyError("model.num_layerz")) == "model.num_layerz"  # the key's text, not its repr
    assert error_line(RuntimeError()) == "RuntimeError"
    assert error_line(AttributeError("'NoneType' object has no attribute 'x'")) == (
        "AttributeError: 'NoneType' object has no attribute 'x'"
    )


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """The space file is a FIFO: `fuxi tune` blocks reading it, inside its handler, until SIGINT."""
    fifo = tmp_path / "space.json"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "tune", "--space", str(fifo), "--study", "s"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a runner started in the background (CI under nohup, `cmd &`) hands its children SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler: the child starts with the default one
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while True:  # a non-blocking writer opens only once the reader is there: fuxi is in its handler
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(writer)
    assert proc.returncode == 130
    assert err.splitlines() == ["fuxi: interrupted"]
