"""The `fuxi` command. This package is the one place its parser is built, one module per command group:

    train.py    fuxi train | eval | presets
    data.py     fuxi data synth | prepare | download | kuairand | stats | synth-logs | build-sequences | ...
    jobs.py     fuxi sweep | tune | report | register | promote | nightly
    serving.py  fuxi recommend | index | serve | export

Imports stay inside the handlers so `fuxi --help` does not load torch, Ray or MLflow. Training and data
commands call the layers below (`pipeline.train`, `pipeline.data`); jobs call training only through this
command line, and load checkpoints through `serving.loading` (tests/unit/test_layout.py).

Every error a command raises is one line on stderr, `fuxi: error: <message>`, and exit status 2; with
FUXI_DEBUG=1 the traceback comes first. Ctrl-C is `fuxi: interrupted` and exit status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from jobs.cli import data, jobs, serving, train

# errors whose message is meant for the user as it stands; any other exception is named by its type
USER_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuxi", description="Train and evaluate FuXi-alpha and its baselines."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_commands(sub)
    data.add_commands(sub)
    jobs.add_commands(sub)
    serving.add_commands(sub)
    return parser


def error_line(exc: BaseException) -> str:
    """The exception as one line: its message with line breaks folded, prefixed by the exception type
    unless it is one of USER_ERRORS (whose messages name the file or field themselves)."""
    message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if not isinstance(exc, USER_ERRORS) or not message:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fuxi: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # SystemExit (a handler's own exit) passes through
        if os.environ.get("FUXI_DEBUG") == "1":
            traceback.print_exc()
        print(f"fuxi: error: {error_line(exc)}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
