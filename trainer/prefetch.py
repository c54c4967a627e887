"""Prefetcher: fetch Engram rows for batches ahead of the step that uses them.

Engram addresses depend only on the input tokens (docs/algorithm.md, "The idea"), so the rows a batch needs
are known as soon as the batch is drawn. The prefetcher hashes batches `depth` steps ahead in a
background thread and issues their store lookups while the model computes the current step; the step
only waits ("stalls") when a lookup has not come back in time.

Per (batch, layer) the ids are deduplicated with `np.unique(..., return_inverse=True)`: the store
returns each unique row once, the leaf tensor that receives gradients is the (U, d) block of unique
rows, and the (B, T, H, d) memory tensor is `rows_unique[inverse]`. Autograd therefore sums the
gradient of repeated ids into one row: `leaf.grad` is already the coalesced sparse gradient that the
store's optimizer expects.

Update semantics (PrefetchConfig.update):

* ``sync``: every push is acknowledged before any later lookup of the pushed rows is used. Batches
  that were prefetched before the push of step t was acknowledged re-fetch exactly the ids that
  intersect the ids pushed at step t; the patched rows replace the prefetched ones before the batch
  is used. Training is then identical to single-process training with an in-process table, for any
  prefetch depth.
* ``async`` (default): pushes go out without waiting, at most `max_inflight` outstanding (the
  oldest is awaited before another is sent). Bounded staleness: a row used at step t reflects every
  push of steps <= t - 1 - (depth + max_inflight) (plus `cache_staleness` steps when the hot-row
  cache is on); in sync terms it is at most depth + max_inflight (+ cache_staleness) steps stale.

Hot-row cache (async only, off by default): a row fetched for a lookup issued at step s is reused by
lookups for batches up to step s + cache_staleness. With `cache_drop_pushed` (default) a push of the
row by this worker drops it, so the cache only saves fetches between pushes; without it a pushed row
stays until its staleness runs out, which is what makes hot n-grams cheap on the wire (the bound
above holds either way: it counts from the fetch, not from the push).

On CUDA the unique rows go through pinned host buffers and a non-blocking host-to-device copy on a
side stream; the compute stream waits on an event recorded after the copy. On CPU the same code runs
with these steps as no-ops.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from trainer.config import PrefetchConfig  # torch-free, so the CLI can read its defaults


class Store(Protocol):
    """What the prefetcher needs from engram_store.rpc.client.StoreClient."""

    def lookup_async(self, table: str, ids: np.ndarray, *, unique: bool = False) -> Future: ...

    def push_async(
        self,
        table: str,
        ids: np.ndarray,
        grads: np.ndarray,
        step: int = 0,
        request_id: str | None = None,
    ) -> Future: ...


@dataclass
class PrefetchStats:
    """Counters since construction (or the last reset)."""

    steps: int = 0
    tokens: int = 0
    rows_fetched: int = 0  # rows requested from the store (after dedup and cache)
    rows_refetched: int = 0  # sync mode: rows fetched again after a push
    cache_hits: int = 0
    cache_lookups: int = 0
    stall_s: float = 0.0  # time the step waited for rows
    wait_push_s: float = 0.0  # time spent waiting for push acknowledgements

    @property
    def rows_per_token(self) -> float:
        return self.rows_fetched / max(self.tokens, 1)

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / max(self.cache_lookups, 1)

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, type(getattr(self, f))())


@dataclass
class _LayerFetch:
    ids: np.ndarray  # (U,) sorted unique global row ids
    inverse: np.ndarray  # (B*T*H,) index into ids
    shape: tuple[int, ...]  # (B, T, H)
    hit_mask: np.ndarray | None  # (U,) rows served by the cache
    hit_rows: np.ndarray | None  # (hits, d)
    future: Future | None  # lookup of the misses
    patches: list[tuple[np.ndarray, Future]] = field(default_factory=list)  # sync re-fetches


@dataclass
class _Pending:
    index: int
    issued_at: int  # training step at which the lookups were issued
    x: Any
    y: Any
    layers: dict[int, _LayerFetch]


@dataclass
class Fetched:
    """One batch ready for a step: tokens, targets and per-layer memory on the compute device."""

    index: int
    x: torch.Tensor  # (B, T)
    y: torch.Tensor  # (B, T)
    memory: dict[int, torch.Tensor]  # layer -> (B, T, H, d) = leaves[layer][inverse]
    leaves: dict[int, torch.Tensor]  # layer -> (U, d) unique rows, requires_grad
    ids: dict[int, np.ndarray]  # layer -> (U,) global row ids of the leaves

    def grads(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """layer -> (ids (U,), grads float32 (U, d)) after backward; rows without grad are zero."""
        out = {}
        for layer, leaf in self.leaves.items():
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            out[layer] = (self.ids[layer], g.detach().float().cpu().numpy())
        return out


class _RowCache:
    """Per-layer hot rows: sorted ids with their rows and the step at which they were fetched."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ids = np.empty(0, np.int64)
        self.rows: np.ndarray | None = None
        self.step = np.empty(0, np.int64)

    def get(self, ids: np.ndarray, use_step: int, staleness: int) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask over ids, rows of the hits) for rows cached at a step >= use_step - staleness."""
        if self.rows is None or not len(self.ids):
            return np.zeros(len(ids), bool), np.empty((0, 0), np.float32)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        hit = (self.ids[pos] == ids) & (self.step[pos] + staleness >= use_step)
        return hit, self.rows[pos[hit]]

    def put(self, ids: np.ndarray, rows: np.ndarray, step: int) -> None:
        if not len(ids):
            return
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), np.float32)
        keep = ~np.isin(self.ids, ids)
        all_ids = np.concatenate([self.ids[keep], ids])
        all_rows = np.concatenate([self.rows[keep], rows])
        all_step = np.concatenate([self.step[keep], np.full(len(ids), step, np.int64)])
        if len(all_ids) > self.capacity:  # evict the oldest fetches first
            newest = np.argsort(-all_step, kind="stable")[: self.capacity]
            all_ids, all_rows, all_step = all_ids[newest], all_rows[newest], all_step[newest]
        order = np.argsort(all_ids)
        self.ids, self.rows, self.step = all_ids[order], all_rows[order], all_step[order]

    def drop(self, ids: np.ndarray) -> None:
        if len(self.ids):
            keep = ~np.isin(self.ids, ids)
            self.ids, self.step = self.ids[keep], self.step[keep]
            self.rows = self.rows[keep]


class _DeviceCopier:
    """Host arrays -> device tensors. CUDA: pinned buffer + non-blocking copy on a side stream,
    finished by making the compute stream wait on the copy's event. CPU: zero-copy views."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def start(self, host: np.ndarray) -> tuple[torch.Tensor, Any]:
        """Begin the copy; returns (tensor, event or None). Use the tensor only after finish()."""
        t = torch.from_numpy(np.ascontiguousarray(host))
        if not self.cuda:
            return t, None
        # pin_memory() draws from torch's caching host allocator, which keeps the block until the
        # non-blocking copy that reads it has completed: a pool of pinned buffers, reuse-safe.
        pinned = t.pin_memory()
        with torch.cuda.stream(self.stream):
            dev = pinned.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event

    def finish(self, copy: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """The tensor, usable on the current (compute) stream."""
        dev, event = copy
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)  # kernels queued from now on run after the copy lands
            dev.record_stream(stream)  # memory allocated on the side stream, used on this one
        return dev


@dataclass
class _Staged:
    """A batch whose rows are assembled on the host and whose device copies have started."""

    pending: _Pending
    rows: dict[int, tuple[torch.Tensor, Any]]  # layer -> copy of (U, d)
    inverse: dict[int, tuple[torch.Tensor, Any]]  # layer -> copy of (B*T*H,)
    x: tuple[torch.Tensor, Any]
    y: tuple[torch.Tensor, Any]


class Prefetcher:
    """Iterates over batches with their Engram rows fetched `config.depth` batches ahead.

    `batches` yields (x, y) token arrays (B, T); `hash_fn(x)` returns {layer: int64 (B, T, H)} global
    row ids; `tables` maps each Engram layer to its store table. Call `next()` once per step, then
    `push(step, fetched.grads())` (or `after_push` on workers that did not push) after backward.
    The training loop's row source for store tables (it meets trainer.fetch.Fetcher).
    """

    def __init__(
        self,
        store: Store,
        hash_fn: Callable[[np.ndarray], dict[int, np.ndarray]],
        tables: dict[int, str],
        batches: Iterator[tuple[Any, Any]],
        config: PrefetchConfig = PrefetchConfig(),
        device: torch.device | str = "cpu",
        dim: int | None = None,
        request_prefix: str = "",
    ) -> None:
        config.validate()
        self.store, self.hash_fn, self.tables = store, hash_fn, dict(tables)
        self.config = config
        self.device = torch.device(device)
        self.dim = dim
        self.request_prefix = request_prefix
        self.stats = PrefetchStats()
        self._batches = batches
        self._window: collections.deque[Future] = collections.deque()  # futures of _Pending
        self._next_index = 0
        self._step = 0  # index of the batch handed out by the last next()
        self._exhausted = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engram-prefetch")
        self._inflight: collections.deque[list[Future]] = collections.deque()
        self._cache = {layer: _RowCache(config.cache_rows) for layer in self.tables}
        self._lock = threading.Lock()  # guards the cache (prefetch thread vs pushes)
        self._copier = _DeviceCopier(self.device)
        self._staged: _Staged | None = None  # CUDA: next batch, device copy under way

    # -- issuing ---------------------------------------------------------------------------------

    def _prepare(self, index: int, issued_at: int, x: Any, y: Any) -> _Pending:
        """Hash, dedup, serve cache hits and issue lookups for the misses (prefetch thread)."""
        tokens = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        ids_by_layer = self.hash_fn(tokens) if self.tables else {}
        layers = {}
        for layer, table in self.tables.items():
            gids = np.asarray(ids_by_layer[layer], dtype=np.int64)  # (B, T, H)
            uniq, inverse = np.unique(gids.reshape(-1), return_inverse=True)
            hit_mask = hit_rows = None
            miss = uniq
            if self.config.cache_rows:
                with self._lock:
                    hit_mask, hit_rows = self._cache[layer].get(
                        uniq, index, self.config.cache_staleness
                    )
                miss = uniq[~hit_mask]
            # distinct ids: the client skips its dedup sort
            fut = self.store.lookup_async(table, miss, unique=True) if len(miss) else None
            layers[layer] = _LayerFetch(uniq, inverse, gids.shape, hit_mask, hit_rows, fut)
        return _Pending(index, issued_at, x, y, layers)

    def _fill(self, want: int) -> None:
        """Keep `want` batches submitted ahead of the consumer."""
        while not self._exhausted and len(self._window) < want:
            try:
                x, y = next(self._batches)
            except StopIteration:
                self._exhausted = True
                break
            self._window.append(
                self._pool.submit(self._prepare, self._next_index, self._step, x, y)
            )
            self._next_index += 1

    # -- consuming -------------------------------------------------------------------------------

    def next(self) -> Fetched:
        """The next batch with its rows; blocks (counted as stall) until they are here."""
        t0 = time.perf_counter()
        staged, self._staged = self._staged, None
        if staged is None:
            self._fill(1)
            if not self._window:
                raise StopIteration
            staged = self._stage(self._window.popleft().result())
        self.stats.stall_s += time.perf_counter() - t0
        pending = staged.pending
        self._step = pending.index + 1
        # Issue the next `depth` batches now so their lookups overlap this step's compute.
        self._fill(self.config.depth)
        memory, leaves, ids = {}, {}, {}
        for layer, copy in staged.rows.items():
            lf = pending.layers[layer]
            leaf = self._copier.finish(copy).requires_grad_(True)  # (U, d)
            inv = self._copier.finish(staged.inverse[layer])  # (B*T*H,)
            memory[layer] = leaf[inv].view(*lf.shape, leaf.shape[1])  # (B, T, H, d)
            leaves[layer], ids[layer] = leaf, lf.ids
        x, y = self._copier.finish(staged.x), self._copier.finish(staged.y)  # (B, T)
        self.stats.steps += 1
        self.stats.tokens += int(x.numel())
        # CUDA, async: if the next batch's rows are already here, start its host-to-device copy
        # now so it overlaps this step's compute. (sync mode may still patch it after the push.)
        if (
            self._copier.cuda
            and self.config.update == "async"
            and self._window
            and self._window[0].done()
            and self._lookups_done(self._window[0].result())
        ):
            self._staged = self._stage(self._window.popleft().result())
        return Fetched(pending.index, x, y, memory, leaves, ids)

    @staticmethod
    def _lookups_done(pending: _Pending) -> bool:
        return all(lf.future is None or lf.future.done() for lf in pending.layers.values())

    def _stage(self, pending: _Pending) -> _Staged:
        """Assemble the batch's rows on the host (waiting for lookups) and start device copies."""
        rows, inverse = {}, {}
        for layer, lf in pending.layers.items():
            rows[layer] = self._copier.start(self._assemble(layer, lf, pending.issued_at))
            inverse[layer] = self._copier.start(lf.inverse.astype(np.int64, copy=False))
        x, y = (
            v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            for v in (pending.x, pending.y)
        )
        return _Staged(pending, rows, inverse, self._copier.start(x), self._copier.start(y))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Fetched:
        return self.next()

    def _assemble(self, layer: int, lf: _LayerFetch, issued_at: int) -> np.ndarray:
        """(U, d) float32 rows of a layer: cache hits + fetched misses, then sync patches."""
        fetched = lf.future.result() if lf.future is not None else None
        n_miss = len(lf.ids) if lf.hit_mask is None else int((~lf.hit_mask).sum())
        self.stats.rows_fetched += n_miss
        if lf.hit_mask is None:
            rows = fetched if fetched is not None else np.empty((0, self.dim or 0), np.float32)
        else:
            self.stats.cache_lookups += len(lf.ids)
            self.stats.cache_hits += int(lf.hit_mask.sum())
            dim = fetched.shape[1] if fetched is not None else lf.hit_rows.shape[1]
            rows = np.empty((len(lf.ids), dim), np.float32)
            if fetched is not None:
                rows[~lf.hit_mask] = fetched
                with self._lock:
                    self._cache[layer].put(lf.ids[~lf.hit_mask], fetched, issued_at)
            if len(lf.hit_rows):
                rows[lf.hit_mask] = lf.hit_rows
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        for sub_ids, fut in lf.patches:  # in push order: later pushes overwrite earlier ones
            patch = fut.result()
            rows[np.searchsorted(lf.ids, sub_ids)] = patch
            self.stats.rows_refetched += len(sub_ids)
        return rows

    # -- pushing ---------------------------------------------------------------------------------

    def push(
        self,
        step: int,
        updates: dict[int, tuple[np.ndarray, np.ndarray]],
        pushed_ids: dict[int, np.ndarray] | None = None,
    ) -> None:
        """Send each layer's (ids, coalesced grads) with the global `step` (1-based Adam step).

        sync: waits for the acknowledgements, then makes already-prefetched batches re-fetch the
        rows they share with `pushed_ids` (default: the ids pushed here). async: returns at once,
        keeping at most max_inflight pushes outstanding.
        """
        futs = []
        for layer, (ids, grads) in updates.items():
            if len(ids):
                rid = f"{self.request_prefix}{step}/{layer}" if self.request_prefix else None
                futs.append(
                    self.store.push_async(self.tables[layer], ids, grads, step=step, request_id=rid)
                )
        all_ids = pushed_ids if pushed_ids is not None else {k: v[0] for k, v in updates.items()}
        t0 = time.perf_counter()
        if self.config.update == "sync":
            for f in futs:
                f.result()
            self.stats.wait_push_s += time.perf_counter() - t0
            self.after_push(all_ids)
            return
        self._inflight.append(futs)
        while len(self._inflight) > self.config.max_inflight:
            for f in self._inflight.popleft():
                f.result()
        self.stats.wait_push_s += time.perf_counter() - t0
        self.after_push(all_ids)

    def after_push(self, pushed: dict[int, np.ndarray]) -> None:
        """Rows in `pushed` changed in the store (acknowledged, in sync mode).

        sync: batches already in the window re-fetch the rows they share with `pushed`.
        async: the hot-row cache forgets them.
        """
        if self.config.update == "async":
            if self.config.cache_rows and self.config.cache_drop_pushed:
                with self._lock:
                    for layer, ids in pushed.items():
                        self._cache[layer].drop(ids)
            return
        for pf in self._window:
            pending: _Pending = pf.result()  # hashing only: the lookups may still be in flight
            for layer, lf in pending.layers.items():
                ids = pushed.get(layer)
                if ids is None or not len(ids):
                    continue
                common = np.intersect1d(lf.ids, ids, assume_unique=True)
                if len(common):
                    fut = self.store.lookup_async(self.tables[layer], common, unique=True)
                    lf.patches.append((common, fut))

    def drain(self) -> None:
        """Wait for every outstanding push."""
        while self._inflight:
            for f in self._inflight.popleft():
                f.result()

    def close(self) -> None:
        """Finish outstanding pushes and stop the prefetch thread."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
