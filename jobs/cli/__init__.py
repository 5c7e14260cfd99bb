"""The `fuxi` command. This package is the one place its parser is built, one module per command group:

    train.py    fuxi train | eval | presets
    data.py     fuxi data synth | prepare | download | kuairand | stats | synth-logs | build-sequences | ...
    jobs.py     fuxi sweep | tune | report | register | promote | nightly
    serving.py  fuxi recommend | index | serve | export

Imports stay inside the handlers so `fuxi --help` does not load torch, Ray or MLflow. Training and data
commands call the layers below (`pipeline.train`, `pipeline.data`); jobs call training only through this
command line, and load checkpoints through `serving.loading` (tests/test_layout.py).

"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import data, jobs, serving, train


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        print(f"fuxi: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
