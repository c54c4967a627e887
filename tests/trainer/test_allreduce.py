"""The sparse all-reduce's math: the union of every worker's ids with their summed gradients
divided by the world size (what DDP does to dense grads), and a partition of it by owner."""

from __future__ import annotations

import numpy as np

from trainer.allreduce import average_updates, owned

ROWS, DIM = 50, 3


def dense(updates: dict, layer: int) -> np.ndarray:
    out = np.zeros((ROWS, DIM), np.float32)
    ids, grads = updates[layer]
    np.add.at(out, ids, grads)
    return out


def test_average_equals_the_mean_of_dense_gradients():
    rng = np.random.default_rng(0)
    world = 3
    gathered = []
    for _ in range(world):
        ids = np.unique(rng.integers(0, ROWS, size=20))  # a worker's coalesced ids, overlapping
        gathered.append(
            {
                1: (ids, rng.standard_normal((len(ids), DIM)).astype(np.float32)),
                3: (ids[:2], np.ones((2, DIM), np.float32)),
            }
        )
    avg = average_updates(gathered, world)
    assert set(avg) == {1, 3}
    for layer in (1, 3):
        ids, grads = avg[layer]
        assert np.array_equal(ids, np.unique(np.concatenate([g[layer][0] for g in gathered])))
        want = sum(dense(g, layer) for g in gathered) / world
        np.testing.assert_allclose(dense(avg, layer), want, rtol=1e-6, atol=1e-6)
        assert grads.dtype == np.float32


def test_owned_rows_partition_the_union():
    ids = np.arange(0, 40, 3)
    grads = np.arange(len(ids) * DIM, dtype=np.float32).reshape(-1, DIM)
    world = 4
    parts = [owned({0: (ids, grads)}, r, world)[0] for r in range(world)]
    for r, (i, g) in enumerate(parts):
        assert (i % world == r).all()
        np.testing.assert_array_equal(g, grads[np.isin(ids, i)])
    assert np.array_equal(np.sort(np.concatenate([i for i, _ in parts])), ids)
