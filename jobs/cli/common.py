"""Helpers shared by the command groups."""

from __future__ import annotations

import os


def quiet_mlflow() -> None:
    """No artifact progress bars in a command's output."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
