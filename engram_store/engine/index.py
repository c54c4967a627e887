"""The id -> offset index of one table's dense arrays: open addressing over int32 offsets.

A slot holds the offset of a stored row (-1: empty); the row's id is read from the table's
`ids_of[offset]` array, which the checkpoint needs anyway, so the index itself costs 4 bytes per
slot (at most 4 / 0.35 ~ 11 bytes per stored row, ~6 on average between growths) and grows with
the rows stored, never with the table's height. Linear probing keeps a probe sequence inside one
or two cache lines; deletion shifts later entries back, so there are no tombstones and a lookup
never scans past the next empty slot.

All loops are numba-compiled and release the GIL. Callers serialise writers (insert / delete /
grow) against readers (find); the shard's per-table reader/writer lock does that.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MIN_SLOTS = 1 << 10
_MAX_LOAD = 0.7  # grow past this fill; the doubled table is then 35 % full
_MUL = np.uint64(0x9E3779B97F4A7C15)


@njit(nogil=True, cache=True, inline="always")
def _home(key: int, shift: int) -> np.int64:
    """Fibonacci hashing: the top bits of key * golden ratio, a slot in [0, 2**(64 - shift))."""
    return np.int64((np.uint64(key) * _MUL) >> np.uint64(shift))


@njit(nogil=True, cache=True, inline="always")
def _probe(slots, shift, ids_of, k):
    """The slot holding key k (slots hold positions into ids_of), or the empty slot that ends
    its probe sequence."""
    mask = np.int64(slots.shape[0] - 1)
    h = _home(k, shift)
    while True:
        v = slots[h]
        if v < 0 or ids_of[v] == k:
            return h
        h = (h + 1) & mask


@njit(nogil=True, cache=True)
def _find(slots, shift, ids_of, keys, out):
    hits = 0
    for i in range(keys.shape[0]):
        v = slots[_probe(slots, shift, ids_of, keys[i])]
        out[i] = v
        hits += v >= 0
    return hits


@njit(nogil=True, cache=True)
def _insert(slots, shift, ids_of, offs):
    """Insert offsets whose ids (ids_of[off]) are absent from the index."""
    mask = slots.shape[0] - 1
    for i in range(offs.shape[0]):
        o = offs[i]
        h = _home(ids_of[o], shift)
        while slots[h] >= 0:
            h = (h + 1) & mask
        slots[h] = o


@njit(nogil=True, cache=True)
def _delete(slots, shift, ids_of, keys):
    """Remove present keys (backward-shift deletion); returns how many were removed."""
    mask = np.int64(slots.shape[0] - 1)
    removed = 0
    for i in range(keys.shape[0]):
        h = _probe(slots, shift, ids_of, keys[i])
        if slots[h] < 0:
            continue
        removed += 1
        # shift back every later entry of the cluster whose home lies at or before the hole
        hole = h
        j = (h + 1) & mask
        while slots[j] >= 0:
            home = _home(ids_of[slots[j]], shift)
            # entry j may fill the hole if its home is not cyclically inside (hole, j]
            if (j > hole and (home <= hole or home > j)) or (j < hole and hole >= home > j):
                slots[hole] = slots[j]
                hole = j
            j = (j + 1) & mask
        slots[hole] = -1
    return removed


class Index:
    """id -> offset for the ids stored in `ids_of` (an int64 array of the table, -1: free)."""

    def __init__(self, expected: int = 0) -> None:
        self.n = 0
        self._alloc(max(_MIN_SLOTS, _pow2(int(expected / _MAX_LOAD) + 1)))

    def _alloc(self, size: int) -> None:
        self.slots = np.full(size, -1, dtype=np.int32)
        self._shift = 64 - (size.bit_length() - 1)

    @property
    def nbytes(self) -> int:
        return int(self.slots.nbytes)

    def find(self, ids_of: np.ndarray, keys: np.ndarray, out: np.ndarray | None = None) -> int:
        """Offsets of `keys` into `out` (int64, -1 where absent); returns how many were found."""
        if out is None:
            raise ValueError("find needs an int64 out array of len(keys)")
        if self.n == 0:
            out[: keys.shape[0]] = -1
            return 0
        return int(_find(self.slots, self._shift, ids_of, keys, out))

    def insert(self, ids_of: np.ndarray, offs: np.ndarray) -> None:
        """Index offsets whose ids (already written to ids_of) are not in the index yet."""
        if self.n + offs.shape[0] > _MAX_LOAD * self.slots.shape[0]:
            self._grow(ids_of, self.n + offs.shape[0])
        _insert(self.slots, self._shift, ids_of, offs)
        self.n += int(offs.shape[0])

    def delete(self, ids_of: np.ndarray, keys: np.ndarray) -> int:
        """Unindex `keys` (before their ids_of entries are cleared); returns how many were."""
        removed = int(_delete(self.slots, self._shift, ids_of, keys))
        self.n -= removed
        return removed

    def rebuild(self, ids_of: np.ndarray, high: int) -> None:
        """Index every live offset below `high` (ids_of >= 0) from scratch."""
        live = np.flatnonzero(ids_of[:high] >= 0).astype(np.int64)
        self.n = 0
        self._alloc(max(_MIN_SLOTS, _pow2(int(live.shape[0] / _MAX_LOAD) + 1)))
        self.insert(ids_of, live)

    def _grow(self, ids_of: np.ndarray, need: int) -> None:
        old = self.slots
        live = old[old >= 0].astype(np.int64)
        self._alloc(_pow2(int(2 * need / _MAX_LOAD) + 1))
        _insert(self.slots, self._shift, ids_of, live)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@njit(nogil=True, cache=True)
def _groups(ids, slots, shift, group, first):
    m = 0
    for i in range(ids.shape[0]):
        h = _probe(slots, shift, ids, ids[i])  # slots hold positions into ids itself
        v = slots[h]
        if v < 0:
            slots[h] = i
            group[i] = m
            first[m] = i
            m += 1
        else:
            group[i] = group[v]
    return m


@njit(nogil=True, cache=True)
def _sum_groups(grads, group, out):
    for i in range(grads.shape[0]):
        o = out[group[i]]
        g = grads[i]
        for j in range(g.shape[0]):
            o[j] += g[j]


def distinct(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids (in order of first occurrence) and their summed gradient rows.

    One hashing pass, no sort. Without duplicates the inputs come back as they are (no copy).
    A duplicated id's gradients are summed in the order they occur, as torch's coalesce does.
    """
    n = ids.shape[0]
    if n < 2:
        return ids, grads
    size = _pow2(2 * n)
    slots = np.full(size, -1, np.int32)
    group = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    m = int(_groups(ids, slots, 64 - (size.bit_length() - 1), group, first))
    if m == n:
        return ids, grads
    out = np.zeros((m, grads.shape[1]), np.float32)
    _sum_groups(np.ascontiguousarray(grads, np.float32), group, out)
    return ids[first[:m]], out
