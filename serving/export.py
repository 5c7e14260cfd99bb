"""The user encoder as a `torch.export` program, for a serving stack outside Python (or outside this code).

    fuxi export --model models:/fuxi-alpha@champion --out runs/export/champion

The training model is jagged: it plans length groups on the host (numpy), which torch.export cannot
trace. `SequentialRecommender.encode_fixed` is its padded twin for histories that all have the same
length: items [B, L] int64, timestamps [B, L + 1] int64 (the history's, then the request time) -> user
vectors [B, D] float32, L2-normalised. The export makes B dynamic where torch.export accepts it
(up to MAX_DYNAMIC_BATCH rows; `max_batch` in the manifest) and fixes L; the program is checked
against the eager jagged model (`LoadedModel.user_vectors`) on random histories, max |difference| <=
TOLERANCE.

What a serving stack needs beside encoder.pt2 (all in the output folder):
  item_vectors.safetensors  "items" [num_items, D] float32: the L2-normalised table rows; score = user .
                            item; row 0 is padding (never recommend it), filter the history's rows
  vocab.parquet             raw item id <-> row (when the model has a vocabulary; else ids are rows)
  manifest.json             shapes, dtypes, L, the tolerance measured, the checkpoint it came from
`--out` is a path or a URI (`s3://...`): torch.export and safetensors write a local temporary folder, whose
files are then copied by the storage layer, manifest.json last (a reader that finds the manifest finds
the rest).
Limitation: exactly L items per history (the model's absolute positions and causal attention make left
padding change the result). Take the last L items (the model reads at most max_sequence_length), or
export one program per length you serve (`--length`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import storage

TOLERANCE = 1e-5  # max |exported - eager| on a user vector's entries (unit vectors, fp32)
# the largest dynamic batch: above ~1024/L rows of 25+ tokens the attention core takes another branch,
# which torch.export reports as a guard on the batch size; 32 keeps one branch for every length
MAX_DYNAMIC_BATCH = 32


class FixedShapeEncoder(nn.Module):
    """forward(items [B, L], timestamps [B, L + 1]) -> user vectors [B, D]: `encode_fixed`."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, items_BL: torch.Tensor, times_BL1: torch.Tensor) -> torch.Tensor:
        return self.model.encode_fixed(items_BL, times_BL1)


def example_inputs(
    num_items: int, batch: int, length: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random histories of rows 1..num_items-1 with increasing timestamps (seconds)."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items, (batch, length), generator=g)
    gaps = torch.randint(1, 10**5, (batch, length + 1), generator=g)
    return items, 1_600_000_000 + torch.cumsum(gaps, 1)


def export_program(loaded: Any, batch: int, length: int) -> tuple[Any, int]:
    """(ExportedProgram, the largest batch of its dynamic batch dimension; 0: the batch is fixed).
    Tries dynamic batches of up to MAX_DYNAMIC_BATCH, then smaller ones (the attention core's branch
    point moves with L), then the example's fixed shape."""
    module = FixedShapeEncoder(loaded.model).eval()
    for top in (MAX_DYNAMIC_BATCH, 16, 8, 4):
        args = example_inputs(loaded.cfg.model.num_items, 2, length)
        try:
            b = torch.export.Dim("batch", min=1, max=top)
            return torch.export.export(module, args, dynamic_shapes=({0: b}, {0: b})), top
        except Exception:  # a guard on the batch size: try a smaller range
            continue
    args = example_inputs(loaded.cfg.model.num_items, batch, length)
    return torch.export.export(module, args), 0


def max_difference(program: Any, loaded: Any, batch: int, length: int, seeds: int = 3) -> float:
    """max |program - eager jagged model| over `seeds` random batches."""
    worst = 0.0
    run = program.module()
    for seed in range(1, seeds + 1):
        items, times = example_inputs(loaded.cfg.model.num_items, batch, length, seed)
        with torch.no_grad():
            got = run(items, times)
        want = loaded.user_vectors(items.tolist(), times[:, :length].tolist(), times[:, length].tolist())
        worst = max(worst, float((got - want).abs().max()))
    return worst


def export_encoder(
    checkpoint: str | Path, out: str | Path, batch: int = 1, length: int | None = None
) -> dict:
    """Export, check and write encoder.pt2 + item_vectors.safetensors + vocab.parquet + manifest.json."""
    from safetensors.torch import save_file

    from serving.loading import load_checkpoint_model

    loaded = load_checkpoint_model(checkpoint)
    length = length or loaded.cfg.model.max_sequence_length
    if not 1 <= length <= loaded.cfg.model.max_sequence_length:
        raise ValueError(f"length={length}: expected 1..{loaded.cfg.model.max_sequence_length}")
    start = time.perf_counter()
    program, top = export_program(loaded, batch, length)
    dynamic = top > 0
    seconds = time.perf_counter() - start
    diff = max_difference(program, loaded, min(3, top) if dynamic else batch, length)
    if diff > TOLERANCE:
        raise RuntimeError(f"exported encoder differs from eager by {diff:.2e} > {TOLERANCE:.0e}")
    out = os.fspath(out)
    vocab = storage.join(loaded.path, "vocab.parquet", field="checkpoint file")
    has_vocab = storage.is_file(vocab)
    with tempfile.TemporaryDirectory(prefix="fuxi-export-") as staging:
        torch.export.save(program, os.path.join(staging, "encoder.pt2"))
        save_file(
            {"items": loaded.item_vectors().contiguous()}, os.path.join(staging, "item_vectors.safetensors")
        )
        for name in ("encoder.pt2", "item_vectors.safetensors"):
            storage.copy_file(os.path.join(staging, name), storage.join(out, name, field="export file"))
    if has_vocab:
        storage.copy_file(vocab, storage.join(out, "vocab.parquet", field="export file"))
    manifest = {
        "checkpoint": storage.display(loaded.source or loaded.path),
        "architecture": loaded.cfg.model.architecture,
        "inputs": {
            "items": f"int64 [B, {length}]: item rows, oldest first",
            "timestamps": f"int64 [B, {length + 1}]: the items' timestamps (s), then the request time",
        },
        "output": f"float32 [B, {loaded.cfg.model.embedding_dim}]: L2-normalised user vectors",
        "batch": f"dynamic (1..{top})" if dynamic else batch,
        "max_batch": top if dynamic else batch,
        "dynamic_batch": dynamic,
        "length": length,
        "item_vectors": "item_vectors.safetensors['items'], score = user . item, row 0 is padding",
        "vocabulary": "vocab.parquet (raw id <-> row)" if has_vocab else None,
        "max_abs_difference_vs_eager": diff,
        "tolerance": TOLERANCE,
        "export_seconds": round(seconds, 2),
        "torch": torch.__version__,
    }
    storage.write_bytes(
        storage.join(out, "manifest.json", field="export file"), json.dumps(manifest, indent=1).encode()
    )
    return manifest
