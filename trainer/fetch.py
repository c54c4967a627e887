"""Row sources of the training loop: the Fetcher protocol, met by the store's Prefetcher
(trainer/prefetch.py) and by LocalFetcher, the in-process tables the store is measured against.

Per step the loop calls `next()` for the batch and its memory rows, then, after backward,
`push(step, updates)` (or `push` of its share and `after_push` of every worker's rows, with several
workers), `drain()` before evaluation and the checkpoint, and `close()` at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from engram_store.engine.config import TableConfig
from trainer.engram import LocalMemory
from trainer.hashing import HashConfig, NgramHasher
from trainer.prefetch import Fetched, PrefetchStats

#: layer -> (ids (U,), grads float32 (U, d)): a step's coalesced gradients of one Engram table each
Updates = dict[int, tuple[np.ndarray, np.ndarray]]


@runtime_checkable
class Fetcher(Protocol):
    """What the training loop needs from a row source."""

    stats: PrefetchStats

    def next(self) -> Fetched:
        """The next batch with its memory rows on the compute device."""
        ...

    def push(
        self, step: int, updates: Updates, pushed_ids: dict[int, np.ndarray] | None = None
    ) -> None:
        """Apply a step's gradients (`step` is the global, 1-based optimizer step)."""
        ...

    def after_push(self, pushed: dict[int, np.ndarray]) -> None:
        """Rows in `pushed` changed (pushed by another worker): forget or re-fetch them."""
        ...

    def drain(self) -> None:
        """Return once every push so far is acknowledged."""
        ...

    def close(self) -> None:
        """Finish outstanding work and release threads."""
        ...


class LocalFetcher:
    """The Fetcher over in-process tables (LocalMemory + torch.optim.SparseAdam).

    The reference the remote store is measured against: same initial rows (the store's
    `initial_rows`), same optimizer semantics, no network. The tables receive their gradients
    through autograd (sparse embedding grads), so `push` ignores `updates` and steps SparseAdam.
    """

    def __init__(
        self,
        hasher: NgramHasher | None,
        specs: dict[int, TableConfig],
        hash_config: HashConfig | None,
        batches: Iterator,
        device: torch.device,
    ) -> None:
        from engram_store.engine.init import initial_rows

        self.hasher, self.batches, self.device = hasher, batches, device
        self.memory = LocalMemory(hash_config).to(device) if hash_config else None
        with torch.no_grad():
            for layer, spec in specs.items():
                rows = initial_rows(spec, np.arange(spec.num_rows, dtype=np.int64))
                self.memory.tables[str(layer)].weight.copy_(torch.from_numpy(rows))
        self.opt = (
            torch.optim.SparseAdam(
                list(self.memory.parameters()), lr=next(iter(specs.values())).optimizer.lr
            )
            if specs
            else None
        )
        self.stats = PrefetchStats()

    def over(self, batches: Iterator) -> LocalFetcher:
        """These tables over other batches (validation), with counters of their own; closing
        it leaves the tables to their owner."""
        view = copy.copy(self)
        view.batches, view.stats = batches, PrefetchStats()
        return view

    def next(self) -> Fetched:
        x, y = next(self.batches)
        memory = self.memory(self.hasher.global_ids(x)) if self.memory is not None else {}
        x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)  # (B, T)
        self.stats.steps += 1
        self.stats.tokens += x.numel()
        return Fetched(0, x, y, memory, {}, {})

    def push(
        self, step: int, updates: Updates, pushed_ids: dict[int, np.ndarray] | None = None
    ) -> None:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def after_push(self, pushed: dict[int, np.ndarray]) -> None:
        pass  # one process: no other worker changes these tables

    def drain(self) -> None:
        pass  # every push is applied when push returns

    def close(self) -> None:
        pass  # the tables live as long as this object
