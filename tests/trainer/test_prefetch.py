"""Prefetcher semantics against an in-memory fake store with slow lookups: dedup, sync re-fetch,
the async staleness bound, the hot-row cache and stall accounting."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engram_store.engine.errors import ConfigError
from trainer.prefetch import PrefetchConfig, Prefetcher

ROWS, DIM, H = 64, 4, 3


class FakeStore:
    """Column 0 of a row: the sum of its pushed grads; column 1: the step of its last push."""

    def __init__(self, latency_s: float = 0.0, push_latency_s: float = 0.0):
        self.rows = np.zeros((ROWS, DIM), np.float32)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(8)
        self.latency_s, self.push_latency_s = latency_s, push_latency_s
        self.lookups = 0

    def lookup_async(self, table, ids, unique=False):
        assert unique == (np.unique(ids).shape[0] == len(ids))  # the prefetcher dedups first

        def run():
            time.sleep(self.latency_s)
            with self.lock:
                self.lookups += 1
                return self.rows[ids].copy()

        return self.pool.submit(run)

    def push_async(self, table, ids, grads, step=0, request_id=None):
        def run():
            time.sleep(self.push_latency_s)
            with self.lock:
                self.rows[ids, 0] += grads[:, 0]
                self.rows[ids, 1] = np.maximum(self.rows[ids, 1], step)

        return self.pool.submit(run)


def batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x = rng.integers(0, ROWS, size=(2, 5))  # (B, T) "tokens" are the row ids here
        yield x, x


def hash_fn(x: np.ndarray) -> dict[int, np.ndarray]:
    return {0: (x[:, :, None] + np.arange(H)) % ROWS}  # (B, T, H)


def run(store: FakeStore, cfg: PrefetchConfig, steps: int = 12, compute_s: float = 0.0):
    """Train-like loop: every row used gets grad 1 per use; returns what each step saw."""
    pf = Prefetcher(store, hash_fn, {0: "t"}, batches(steps), cfg, dim=DIM)
    seen = []
    for step in range(1, steps + 1):
        f = pf.next()
        seen.append((f.ids[0], f.leaves[0].detach().numpy().copy(), f.memory[0].detach().clone()))
        f.memory[0].sum().backward()  # d/d row = number of uses of the row in the batch
        time.sleep(compute_s)
        pf.push(step, f.grads())
    pf.close()
    return pf, seen


def test_dedup_and_coalesced_grad():
    store = FakeStore()
    pf = Prefetcher(store, hash_fn, {0: "t"}, batches(1), PrefetchConfig(depth=0), dim=DIM)
    f = pf.next()
    gids = hash_fn(next(batches(1))[0])[0]
    assert np.array_equal(f.ids[0], np.unique(gids))  # the leaf holds each row once
    assert f.memory[0].shape == (2, 5, H, DIM)
    f.memory[0].sum().backward()
    ids, g = f.grads()[0]
    counts = np.bincount(gids.reshape(-1), minlength=ROWS)[ids]
    assert np.allclose(g, counts[:, None])  # autograd summed the repeats into one row
    assert pf.stats.rows_per_token == pytest.approx(len(ids) / 10)
    pf.close()


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_sync_rows_reflect_every_earlier_push(depth):
    store = FakeStore(latency_s=0.01, push_latency_s=0.02)
    pf, seen = run(store, PrefetchConfig(depth=depth, update="sync"))
    total = np.zeros(ROWS, np.float32)  # replay: grads pushed so far per row
    last = np.zeros(ROWS, np.float32)  # replay: step of each row's last push
    for t, (ids, rows, _) in enumerate(seen, start=1):
        assert np.array_equal(rows[:, 1], last[ids]), f"step {t} used a row before its push"
        assert np.array_equal(rows[:, 0], total[ids])
        total[ids] += _COUNTS.pop(0)  # backward of memory.sum(): grad = uses of the row
        last[ids] = t
    if depth:
        assert pf.stats.rows_refetched > 0  # prefetched batches had rows to patch


_COUNTS: list[np.ndarray] = []


@pytest.fixture(autouse=True)
def _record_counts(monkeypatch):
    """Remember each batch's use count per unique row, in batch order."""
    _COUNTS.clear()
    orig = Prefetcher.next

    def next_(self):
        f = orig(self)
        for layer in f.leaves:
            g = hash_fn(f.x.numpy())[layer].reshape(-1)
            _COUNTS.append(np.array([(g == i).sum() for i in f.ids[layer]], np.float32))
        return f

    monkeypatch.setattr(Prefetcher, "next", next_)


@pytest.mark.parametrize("depth,inflight", [(0, 0), (1, 1), (2, 3)])
def test_async_staleness_bound(depth, inflight):
    """A row used at step t reflects every push of steps <= t - 1 - (depth + max_inflight)."""
    store = FakeStore(latency_s=0.005, push_latency_s=0.03)
    _, seen = run(store, PrefetchConfig(depth=depth, update="async", max_inflight=inflight))
    pushes: list[np.ndarray] = []  # ids pushed at step 1, 2, ...
    for t, (ids, rows, _) in enumerate(seen, start=1):
        bound = t - 1 - (depth + inflight)
        want = np.zeros(ROWS)
        for s in range(1, bound + 1):
            want[pushes[s - 1]] = s
        assert (rows[:, 1] >= want[ids]).all(), f"step {t}: a push of a step <= {bound} missing"
        pushes.append(ids)


def test_hot_row_cache_hits_and_push_invalidates():
    store = FakeStore()
    cfg = PrefetchConfig(depth=0, update="async", cache_rows=1000, cache_staleness=100)
    same = [(np.arange(10)[None, :], np.arange(10)[None, :])] * 3
    pf = Prefetcher(store, hash_fn, {0: "t"}, iter(same), cfg, dim=DIM)
    pf.next()
    pf.next()  # no push in between: all rows from the cache
    assert pf.stats.cache_hits == pf.stats.cache_lookups // 2 > 0
    before = store.lookups
    f = pf.next()
    assert store.lookups == before  # served without the store
    pf.after_push({0: f.ids[0][:3]})
    assert len(pf._cache[0].ids) == len(f.ids[0]) - 3
    pf.close()


def test_hot_row_cache_can_keep_pushed_rows_until_stale():
    store = FakeStore()
    cfg = PrefetchConfig(
        depth=0, update="async", cache_rows=1000, cache_staleness=2, cache_drop_pushed=False
    )
    same = [(np.arange(10)[None, :], np.arange(10)[None, :])] * 6
    pf = Prefetcher(store, hash_fn, {0: "t"}, iter(same), cfg, dim=DIM)
    f = pf.next()  # fetched at step 0
    pf.after_push({0: f.ids[0]})
    assert len(pf._cache[0].ids) == len(f.ids[0])  # kept: the staleness bound counts from the fetch
    before = store.lookups
    pf.next()
    pf.next()  # steps 1 and 2: within cache_staleness of the fetch
    assert store.lookups == before
    pf.next()  # step 3: stale, fetched again
    assert store.lookups > before
    pf.close()


def test_stall_is_measured_and_hidden_by_depth():
    stalls = {}
    for depth in (0, 2):
        store = FakeStore(latency_s=0.03)
        pf, _ = run(store, PrefetchConfig(depth=depth, update="async"), steps=8, compute_s=0.05)
        stalls[depth] = pf.stats.stall_s
    assert stalls[0] > 0.15  # ~8 x 30 ms waited on demand
    assert stalls[2] < stalls[0] / 2


def test_bad_prefetch_config():
    with pytest.raises(ConfigError, match="prefetch depth"):
        PrefetchConfig(depth=-1).validate()
    with pytest.raises(ConfigError, match="update mode"):
        PrefetchConfig(update="eventually").validate()
    with pytest.raises(ConfigError, match="cache"):
        PrefetchConfig(update="sync", cache_rows=10).validate()


def test_cpu_memory_is_a_view_of_the_leaf():
    store = FakeStore()
    pf = Prefetcher(store, hash_fn, {0: "t"}, batches(1), PrefetchConfig(depth=0), dim=DIM)
    f = pf.next()
    assert f.leaves[0].is_leaf and f.leaves[0].requires_grad
    assert f.memory[0].grad_fn is not None and f.x.dtype == torch.int64
    pf.close()
