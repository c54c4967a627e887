"""The RAM mirror of a table's hot rows, and the reader/writer lock that guards it.

Internal to storage.Shard: lookups gather from the mirror; pushes read their old rows and state
from it and write the new ones back after the LMDB commit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

# A dense id -> position index over more rows than this would reserve too much address space;
# such tables run without a mirror.
MAX_INDEXED_ROWS = 1 << 31


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Mirror:
    """Packed records (row in storage dtype, then float32 state) of up to `capacity` rows.

    Records as stored, so a push gathers, updates and scatters one array, and a record read from
    LMDB goes in unchanged. `_pos1[row id]` is the row's position + 1 (0: absent). It is
    allocated with np.zeros, which the OS backs lazily, so a 10 M-row table costs only the index
    pages its hot rows touch. When an insert does not fit, the mirror is emptied and refilled
    (hot rows come back first). `gen` counts committed writes (the Shard bumps it), so a lookup
    can tell whether records it read from LMDB are still current before inserting them.
    """

    def __init__(self, num_rows: int, record_bytes: int, capacity: int) -> None:
        self.num_rows, self.record_bytes = num_rows, record_bytes
        self.capacity = capacity if num_rows <= MAX_INDEXED_ROWS else 0
        self.gen = 0
        self.n = 0
        self._pos1: np.ndarray | None = None
        self._ids = np.empty(0, dtype=np.int64)
        self.rec = np.empty((0, record_bytes), dtype=np.uint8)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Position (int64) of each id, -1 where absent."""
        if self.n == 0 or self._pos1 is None:
            return np.full(ids.shape[0], -1, dtype=np.int64)
        pos = self._pos1[ids].astype(np.int64)
        pos -= 1
        return pos

    def put(self, ids: np.ndarray, rec: np.ndarray) -> None:
        """Insert or overwrite the records of distinct `ids`; call with the write lock held."""
        if self.capacity == 0 or ids.shape[0] == 0:
            return
        if self._pos1 is None:
            self._pos1 = np.zeros(self.num_rows, dtype=np.int32)
        pos = self.find(ids)
        hit = pos >= 0
        if hit.all():
            self.rec[pos] = rec
            return
        if self.n + int((~hit).sum()) > self.capacity:
            self.clear()
            hit[:] = False
        else:
            self.rec[pos[hit]] = rec[hit]
        new = np.flatnonzero(~hit)[: self.capacity]
        k = new.shape[0]
        self._reserve(self.n + k)
        at = slice(self.n, self.n + k)
        if k < ids.shape[0]:
            ids, rec = ids[new], rec[new]
        self._ids[at] = ids
        self.rec[at] = rec
        self._pos1[ids] = np.arange(self.n + 1, self.n + k + 1, dtype=np.int32)
        self.n += k

    def clear(self) -> None:
        """Forget every row; call with the write lock held."""
        if self.n and self._pos1 is not None:
            self._pos1[self._ids[: self.n]] = 0
        self.n = 0

    def _reserve(self, need: int) -> None:
        cap = self._ids.shape[0]
        if need <= cap:
            return
        cap = min(self.capacity, max(need, 2 * cap, 1024))
        ids = np.empty(cap, dtype=np.int64)
        rec = np.empty((cap, self.record_bytes), dtype=np.uint8)
        ids[: self.n] = self._ids[: self.n]
        rec[: self.n] = self.rec[: self.n]
        self._ids, self.rec = ids, rec
