"""Both row sources satisfy the Fetcher protocol the training loop is written against, and the
in-process one lends its tables to validation without sharing its counters."""

from __future__ import annotations

import numpy as np
import torch

from tests.trainer.test_prefetch import DIM, FakeStore, batches, hash_fn
from trainer.fetch import Fetcher, LocalFetcher
from trainer.prefetch import PrefetchConfig, Prefetcher


def test_prefetcher_is_a_fetcher():
    pf = Prefetcher(FakeStore(), hash_fn, {0: "t"}, batches(2), PrefetchConfig(), dim=DIM)
    try:
        assert isinstance(pf, Fetcher)
    finally:
        pf.close()


def test_local_fetcher_is_a_fetcher_and_lends_its_tables():
    def tokens(n):
        for _ in range(n):
            x = np.zeros((2, 4), np.int64)  # (B, T)
            yield x, x

    local = LocalFetcher(None, {}, None, tokens(3), torch.device("cpu"))
    assert isinstance(local, Fetcher)
    view = local.over(tokens(2))
    assert isinstance(view, Fetcher) and view.memory is local.memory
    f = view.next()
    assert f.x.shape == (2, 4) and f.grads() == {}
    assert view.stats.tokens == 8 and local.stats.tokens == 0  # validation is not training
    local.next()
    assert local.stats.tokens == 8
    for fetcher in (view, local):
        fetcher.push(1, {})
        fetcher.after_push({})
        fetcher.drain()
        fetcher.close()


def test_an_object_without_drain_is_not_a_fetcher():
    class Partial:
        stats = None

        def next(self): ...

        def push(self, step, updates, pushed_ids=None): ...

        def close(self): ...

    assert not isinstance(Partial(), Fetcher)
