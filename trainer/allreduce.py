"""The sparse all-reduce of Engram gradients between data-parallel workers.

DDP averages the dense gradients; the tables' gradients are (ids, grads) per layer, different ids
on every worker. Each worker gathers everyone's, sums them per id and divides by the world size
(DDP's average), then pushes only the ids it owns (id % W == rank): every row is pushed once per
step, with the gradient of the whole global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.fetch import Updates


def average_updates(gathered: Sequence[Updates], world: int) -> Updates:
    """Every worker's (ids, grads) per layer -> (sorted union ids, summed grads / world).

    The layers are those of the first worker's updates (every worker has the same Engram layers).
    """
    out = {}
    for layer in gathered[0]:
        ids = np.concatenate([g[layer][0] for g in gathered])  # (sum U_w,)
        grads = torch.from_numpy(np.concatenate([g[layer][1] for g in gathered]))  # (sum U_w, d)
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(uniq), grads.shape[1], dtype=torch.float32)  # (U, d)
        summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)), grads)
        out[layer] = (uniq, (summed / world).numpy())
    return out


def owned(updates: Updates, rank: int, world: int) -> Updates:
    """The rows worker `rank` of `world` pushes: those whose id % world == rank."""
    return {
        layer: (ids[ids % world == rank], g[ids % world == rank])
        for layer, (ids, g) in updates.items()
    }


def allreduce_sparse(updates: Updates, world: int) -> Updates:
    """average_updates over every worker's `updates`, on every worker (a collective: every
    worker calls it at the same step)."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, updates)
    return average_updates(gathered, world)
