"""Loop twins of the model's layers, written from the reference description: the slow, obvious form that
the batched and fast kernels are compared against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.fuxi import AMS
from model.layers import time_buckets


def naive_ams(ams: AMS, x, valid, ts, cfg: ModelConfig):
    """Per-(i, j) loop twin of the AMS layer, written from the reference description."""
    b, length, d = x.shape
    h, dv, dqk, n = cfg.num_heads, cfg.dv, cfg.dqk, cfg.padded_length
    proj = F.silu(F.rms_norm(x, (d,), eps=1e-6) @ ams.uvqk)
    u, v, q, k = torch.split(proj, ams.split, dim=-1)
    out = torch.zeros(b, length, h, 3 * dv)
    for bb in range(b):
        for i in range(length):
            for hh in range(h):
                acc = {c: torch.zeros(dv) for c in ("pos", "ts", "sem")}
                for j in range(i + 1):
                    if not valid[bb, j]:
                        continue
                    vj = v[bb, j, hh * dv : (hh + 1) * dv]
                    acc["pos"] += ams.pos_weights.weight[(n - 1) + (j - i)] * vj
                    bucket = time_buckets((ts[bb, i + 1] - ts[bb, j]).reshape(1)).item()
                    acc["ts"] += ams.time_weights.weight[bucket] * vj
                    s = q[bb, i, hh * dqk : (hh + 1) * dqk] @ k[bb, j, hh * dqk : (hh + 1) * dqk]
                    acc["sem"] += F.silu(s) / n * vj
                out[bb, i, hh] = torch.cat([acc["pos"], acc["ts"], acc["sem"]])
    concat = out.reshape(b, length, -1)
    return u * F.rms_norm(concat, (concat.shape[-1],), eps=1e-6)
