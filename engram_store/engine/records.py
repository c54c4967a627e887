"""How a table's rows and optimizer state pack into LMDB records, and the optimizer step on them.

A record is the row in the table's storage dtype followed by `state_width * dim` float32
optimizer values, little-endian; its key is the 8-byte big-endian global row id (big-endian so
LMDB's byte order is row-id order). Internal to storage.Shard.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from engram_store.engine import dtypes, optimizers
from engram_store.engine.config import TableConfig


def row_keys(ids: np.ndarray) -> list[bytes]:
    """LMDB keys of row ids."""
    return ids.astype(">u8").view("V8").tolist()


def put_items(ids: np.ndarray, rec: np.ndarray) -> Iterator[tuple[bytes, bytes]]:
    """(key, record) pairs for Cursor.putmulti; void-dtype tolist() splits rows into bytes fast."""
    vals = np.ascontiguousarray(rec).view(f"V{rec.shape[1]}").ravel().tolist()
    return zip(row_keys(ids), vals, strict=True)


def distinct_ids(
    ids: np.ndarray, grads: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Sorted distinct ids, the order that sorts `grads` (None: already sorted), and the summed
    gradients of the distinct ids where there were duplicates (None: none; `grads` are then
    used in `order`, chunk by chunk, without a full copy)."""
    if ids.shape[0] < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids, None, None
    order = np.argsort(ids, kind="stable")
    sids = ids[order]
    if bool(np.all(sids[1:] != sids[:-1])):
        return sids, order, None
    uids, summed = optimizers.coalesce(ids, grads)
    return uids, None, summed


class Layout:
    """The record layout of one table."""

    def __init__(self, spec: TableConfig) -> None:
        self.spec = spec
        self.row_bytes = spec.dim * dtypes.itemsize(spec.dtype)
        self.state_dim = spec.state_floats
        self.record_bytes = self.row_bytes + 4 * self.state_dim
        # float32 rows can be updated through views of the records themselves
        self._f32 = spec.dtype == "float32"

    def rows(self, rec: np.ndarray) -> np.ndarray:
        """float32 rows (a new array) of records (n, record_bytes), or of their first row_bytes
        columns."""
        raw = rec[:, : self.row_bytes]
        if self._f32:
            # a fresh contiguous gather is reused as is; a view into LMDB bytes or the mirror
            # is copied
            own = raw.flags.c_contiguous and raw.flags.writeable and raw.base is None
            return raw.view("<f4") if own else np.array(raw).view("<f4")
        return dtypes.to_float32(
            np.ascontiguousarray(raw).view(dtypes.numpy_dtype(self.spec.dtype)), self.spec.dtype
        )

    def state(self, rec: np.ndarray) -> np.ndarray:
        """float32 optimizer state of records (a view)."""
        return rec[:, self.row_bytes :].view("<f4")

    def encode(
        self, rows: np.ndarray, state: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Records (n, record_bytes) of float32 rows and state (into `out` if given)."""
        if out is None:
            out = np.empty((rows.shape[0], self.record_bytes), np.uint8)
        out[:, : self.row_bytes] = dtypes.to_dtype(rows, self.spec.dtype).view(np.uint8)
        out[:, self.row_bytes :] = state.astype("<f4", copy=False).view(np.uint8)
        return out

    def step(self, old: np.ndarray, new: np.ndarray, grads: np.ndarray, step: int) -> None:
        """One optimizer step from records `old` into records `new` (distinct rows)."""
        rb = self.row_bytes
        rows = old[:, :rb].view("<f4") if self._f32 else self.rows(old)
        state = old[:, rb:]
        out_state: np.ndarray | None = new[:, rb:]
        if rb % 4:  # a 16-bit row of odd dim leaves the state unaligned: work on a copy
            state, out_state = np.array(state), None
        rows, out = optimizers.apply(
            self.spec.optimizer,
            rows,
            state.view("<f4"),
            grads,
            step,
            new[:, :rb].view("<f4") if self._f32 else None,
            None if out_state is None else out_state.view("<f4"),
        )
        if not self._f32:
            new[:, :rb] = dtypes.to_dtype(rows, self.spec.dtype).view(np.uint8)
        if out_state is None:
            new[:, rb:] = out.view(np.uint8)
