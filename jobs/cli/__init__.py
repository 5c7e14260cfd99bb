"""The `fuxi` command. This package is the one place its parser is built, one module per command group:

    train.py    fuxi train | eval | presets
    data.py     fuxi data synth | prepare | download | kuairand | stats | synth-logs | build-sequences | ...
    jobs.py     fuxi sweep | tune | report | register | promote | nightly
    serving.py  fuxi recommend | index | serve | export

Imports stay inside the handlers so `fuxi --help` does not load torch, Ray or MLflow. Training and data
commands call the layers below (`pipeline.train`, `pipeline.data`); jobs call training only through this
command line, and load checkpoints through `serving.loading` (tests/unit/test_layout.py).

Every error a command raises is one line on stderr, `fuxi: error: <message>`, and exit status 2; with
FUXI_DEBUG=1 the traceback comes first. So are a usage error (argparse's) and a handler's
`SystemExit("message")`. Characters that are not printable (newlines, terminal escapes, NUL: a crafted
file name may hold them) are written escaped. Ctrl-C is `fuxi: interrupted` and exit status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn

from jobs.cli import data, jobs, serving, train

# errors whose message is meant for the user as it stands; any other exception is named by its type
USER_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


class Parser(argparse.ArgumentParser):
    """argparse, its usage errors one line as well (`fuxi CMD --help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"fuxi: error: {printable(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fuxi", description="Train and evaluate FuXi-alpha and its baselines.")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_commands(sub)
    data.add_commands(sub)
    jobs.add_commands(sub)
    serving.add_commands(sub)
    return parser


def printable(text: str) -> str:
    """`text` on one line: line breaks folded to spaces, other unprintable characters escaped."""
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def error_line(exc: BaseException) -> str:
    """The exception as one line: its message with line breaks folded, prefixed by the exception type
    unless it is one of USER_ERRORS (whose messages name the file or field themselves)."""
    try:  # a KeyError's str() is the repr of its key: its text is the message
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else exc
        message = printable(str(text))
    except Exception:  # an exception whose message cannot be formatted is named by its type
        message = ""
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
    except SystemExit as exc:  # a handler's own exit: a status passes through, a message is an error
        if not isinstance(exc.code, str):
            raise
        print(f"fuxi: error: {printable(exc.code)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("FUXI_DEBUG") == "1":
            traceback.print_exc()
        print(f"fuxi: error: {error_line(exc)}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
