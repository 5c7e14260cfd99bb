"""Reading what training wrote, the way the product reads it (pointers resolved by the checkpointer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.train.checkpoint import Checkpointer, read_meta


def final_model_configs(work: Path) -> list[dict[str, Any]]:
    """The model config in the `final` checkpoint's train.json of every run under `work`."""
    found = []
    for root in sorted(work.rglob("checkpoints")):
        final = Checkpointer(root).named("final")
        if final is not None:
            found.append(read_meta(final)["config"]["model"])
    return found
