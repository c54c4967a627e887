"""One table's rows, optimizer state and ids in dense host-RAM arrays.

`rows[offset]` is a row in the storage dtype (uint8, spec.row_bytes wide), `state[offset]` its
float32 optimizer state, `ids_of[offset]` its global row id (-1: a freed offset). A row gets an
offset the first time it is stored (pushed or imported); rows never stored are computed from
(seed, id) on demand (engine/init.py) and cost nothing. The id -> offset index (engine/index.py)
grows with the rows stored.

The arrays are anonymous memory maps reserved for the table's whole capacity with
MAP_NORESERVE: the address space is reserved once (so the arrays never move or get copied when
they grow), and only the pages of stored rows use memory. What is used is accounted in bytes
(`nbytes`), and the shard refuses a push that would take it past its memory budget.

Offsets are grouped into checkpoint chunks of `chunk_rows`; a chunk is dirty when a row in it
changed since it was last written (engine/shard.py writes dirty chunks in the background).
"""

from __future__ import annotations

import mmap
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from engram_store.engine.config import TableConfig
from engram_store.engine.errors import StoreFull
from engram_store.engine.index import Index

_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
CHUNK_BYTES = 16 << 20  # target bytes of one checkpoint chunk
NEVER = -2  # chunk lsn: never written and empty


def chunk_rows_for(spec: TableConfig) -> int:
    """Offsets per checkpoint chunk: a power of two near CHUNK_BYTES of records."""
    per = spec.row_bytes + 4 * spec.state_floats + 8
    n = max(1024, CHUNK_BYTES // per)
    return 1 << (n.bit_length() - 1)


def reserve(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zeroed array backed by a lazily committed anonymous map: only the pages written take
    memory, so `shape` may span a table's whole height."""
    dt = np.dtype(dtype)
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    count = int(np.prod(dims, dtype=np.int64))
    if count == 0:
        return np.zeros(dims, dt)
    mm = mmap.mmap(
        -1, count * dt.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE
    )
    if _HUGEPAGE is not None and count * dt.itemsize >= 1 << 21:
        # random rows of a big table: 2 MiB pages cut TLB misses (rows take offsets in order,
        # so a huge page fills densely)
        try:
            mm.madvise(_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(mm, dtype=dt, count=count).reshape(dims)


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
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
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class TableArrays:
    """Dense arrays and index of one table on one shard. Writers hold `lock.write()`, readers
    `lock.read()`; the shard's apply stage is the only writer."""

    def __init__(self, spec: TableConfig, uid: int, capacity: int, chunk_rows: int) -> None:
        self.spec, self.uid = spec, uid
        self.row_bytes, self.state_floats = spec.row_bytes, spec.state_floats
        self.capacity = int(capacity)
        self.chunk_rows = int(chunk_rows)
        self.rows = reserve((self.capacity, self.row_bytes), np.uint8)
        self.state = reserve((self.capacity, self.state_floats), np.float32)
        self.ids_of = reserve(self.capacity, np.int64)
        self.index = Index()
        self.high = 0  # offsets below this were used at some point
        self._free = np.empty(0, np.int64)
        self._nfree = 0
        n_chunks = -(-self.capacity // self.chunk_rows)
        self.dirty = np.zeros(n_chunks, bool)
        self.chunk_lsn = np.full(n_chunks, NEVER, np.int64)
        self.lock = RWLock()
        self.step = 0  # highest optimizer step applied
        self.assigned_step = 0  # highest step given to a queued push
        self.pushes = 0  # pushes applied
        self.dropped = False

    # ---- accounting ----

    @property
    def stored(self) -> int:
        return self.index.n

    @property
    def record_bytes(self) -> int:
        """Bytes of one exported record: the row in the storage dtype, then float32 state."""
        return self.row_bytes + 4 * self.state_floats

    @property
    def nbytes(self) -> int:
        """Memory the table uses: the arrays up to the high-water offset and the index."""
        return self.high * (self.record_bytes + 8) + self.index.nbytes + 8 * self._free.shape[0]

    @staticmethod
    def bytes_per_row(spec: TableConfig) -> int:
        """What one more stored row costs (arrays + ~one index slot)."""
        return spec.row_bytes + 4 * spec.state_floats + 8 + 8

    def n_chunks_used(self) -> int:
        return -(-self.high // self.chunk_rows)

    # ---- offsets ----

    def find(self, ids: np.ndarray, out: np.ndarray) -> int:
        """Offsets of ids into `out` (-1: not stored); returns how many are stored."""
        return self.index.find(self.ids_of, ids, out)

    def allocate(self, ids: np.ndarray, lsn: int) -> np.ndarray:
        """Offsets for new distinct ids (not stored yet), indexed; their rows and state are left
        for the caller to fill. `lsn` (the writing entry's sequence - 1) is the chunk's virtual
        checkpoint for chunks that get their first rows now."""
        n = ids.shape[0]
        take = min(n, self._nfree)
        offs = np.empty(n, np.int64)
        if take:
            offs[:take] = self._free[self._nfree - take : self._nfree]
            self._nfree -= take
        rest = n - take
        if rest:
            if self.high + rest > self.capacity:
                raise StoreFull(
                    f"table {self.spec.name!r} holds its capacity of {self.capacity} rows on "
                    "this shard; add shards or raise the shard's --memory"
                )
            offs[take:] = np.arange(self.high, self.high + rest, dtype=np.int64)
            lo_chunk = self.high // self.chunk_rows
            self.high += rest
            hi_chunk = -(-self.high // self.chunk_rows)
            fresh = self.chunk_lsn[lo_chunk:hi_chunk]
            fresh[fresh == NEVER] = lsn
        self.ids_of[offs] = ids
        self.index.insert(self.ids_of, offs)
        self.mark(offs)
        return offs

    def release(self, ids: np.ndarray, offs: np.ndarray) -> None:
        """Forget stored rows (ids at offs); their offsets are reused by later rows."""
        self.index.delete(self.ids_of, ids)
        self.ids_of[offs] = -1
        self.mark(offs)
        need = self._nfree + offs.shape[0]
        if need > self._free.shape[0]:
            grown = np.empty(max(need, 2 * self._free.shape[0], 1024), np.int64)
            grown[: self._nfree] = self._free[: self._nfree]
            self._free = grown
        self._free[self._nfree : need] = offs
        self._nfree = need

    def mark(self, offs: np.ndarray) -> None:
        if offs.shape[0]:
            self.dirty[offs // self.chunk_rows] = True

    def live_offsets(self) -> np.ndarray:
        """Offsets of every stored row, ascending."""
        return np.flatnonzero(self.ids_of[: self.high] >= 0).astype(np.int64)

    def chunk_range(self, chunk: int) -> slice:
        lo = chunk * self.chunk_rows
        return slice(lo, min(lo + self.chunk_rows, self.high))
