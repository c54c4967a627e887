"""Shard: one LMDB environment holding the rows and optimizer state of one or more tables.

Layout (docs/design.md "Storage"): sub-database `meta` (JSON table specs and counters under
`table:<name>`, shard state under `shard`), `rows:<name>` per table (8-byte big-endian row id ->
record = row in storage dtype, then state_width * dim float32), `requests` (table \\0 request id ->
step, rows) and `reqseq` (sequence -> request key, oldest first, for pruning).

Concurrency: one writer lock serialises push / import / delete / create / drop / set_shard_state.
Lookups run concurrently; they gather from the RAM mirror under a reader lock, and writers update
the mirror only after their LMDB commit, so a lookup never sees a torn or uncommitted row.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import lmdb
import numpy as np

from engram_store.engine import init
from engram_store.engine.config import ShardConfig, TableConfig
from engram_store.engine.errors import (
    BatchTooLarge,
    DataDirLocked,
    InvalidArgument,
    LayoutMismatch,
    ReadOnly,
    ShardUnavailable,
    StoreFull,
    TableExists,
    TableNotFound,
    WrongShard,
)
from engram_store.engine.mirror import Mirror, RWLock
from engram_store.engine.records import Layout, distinct_ids, put_items, row_keys
from engram_store.engine.routing import slot_of
from engram_store.engine.types import PushResult, ShardStateInfo, TableStats

_MAX_DBS = 4096  # tables per shard (+3 internal databases)
_REQ = struct.Struct(">qq")  # request log value: (step, rows_updated)
_SCAN = 1 << 16  # records read per chunk when scanning a table (export / delete)
_CHUNK = 512  # rows per optimizer chunk: temporaries stay in L1/L2
_PART = 8192  # rows per optimizer task on the writer's thread pool
_OPT_THREADS = 4  # optimizer threads per shard (the gRPC workers need cores too)
_SCRATCH_MAX = 256 << 20  # writer buffers up to this size are kept for the next push


@dataclass
class _Table:
    spec: TableConfig
    db: lmdb._Database  # a sub-database handle (a type only in lmdb's stubs)
    step: int = 0
    pushes: int = 0
    mirror: Mirror = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(self.spec)
        self.record_bytes = self.layout.record_bytes

    def meta_json(self, step: int | None = None, pushes: int | None = None) -> bytes:
        """The `table:<name>` meta value, optionally with new counters."""
        return json.dumps(
            {
                "spec": self.spec.to_dict(),
                "step": self.step if step is None else step,
                "pushes": self.pushes if pushes is None else pushes,
            }
        ).encode()


class Shard:
    """Rows and optimizer state of the tables of one data directory. Thread-safe."""

    def __init__(self, config: ShardConfig) -> None:
        config.validate()
        self.config = config
        os.makedirs(config.data_dir, exist_ok=True)
        self._lock_file = open(os.path.join(config.data_dir, "shard.lock"), "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock_file.close()
            raise DataDirLocked(
                f"data directory {config.data_dir} is in use by another shard process; stop it "
                "or give this shard another --data directory"
            ) from e
        self._lock_file.truncate(0)
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()
        try:
            self._env = lmdb.open(
                config.data_dir,
                map_size=config.map_size,
                max_dbs=_MAX_DBS + 3,
                sync=config.durable,
                metasync=config.durable,
                readahead=False,
                max_readers=config.max_readers,
            )
        except lmdb.Error:
            self._release_lock()
            raise
        self._wlock = threading.Lock()
        self._bufs: dict[str, np.ndarray] = {}  # writer scratch, used under _wlock only
        threads = min(_OPT_THREADS, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(threads, "engram-opt") if threads > 1 else None
        self._mlock = RWLock()
        self._tables: dict[str, _Table] = {}
        self._state = ShardStateInfo()
        self._closed = False
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        """Open the internal databases and restore the tables and shard state."""
        self._meta = self._env.open_db(b"meta")
        self._req = self._env.open_db(b"requests")
        self._reqseq = self._env.open_db(b"reqseq")
        with self._env.begin(db=self._meta) as txn:
            raw_state = txn.get(b"shard")
            metas = [v for k, v in txn.cursor() if k.startswith(b"table:")]
        if raw_state:
            self._state = ShardStateInfo.from_json(raw_state)
        for v in metas:
            d = json.loads(v)
            self._add_table(
                TableConfig.from_dict(d["spec"]),
                self._env.open_db(b"rows:" + d["spec"]["name"].encode()),
                d["step"],
                d["pushes"],
            )

    # ---- lifecycle ----

    def close(self) -> None:
        """Close the LMDB environment and release the data directory."""
        with self._wlock:
            if self._closed:
                return
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown()
            self._env.close()
            self._release_lock()

    def _release_lock(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tables ----

    def _add_table(
        self, spec: TableConfig, db: lmdb._Database, step: int = 0, pushes: int = 0
    ) -> _Table:
        t = _Table(spec, db, step, pushes)
        t.mirror = Mirror(spec.num_rows, t.record_bytes, self.config.cache_rows)
        self._tables[spec.name] = t
        return t

    def _get(self, name: str) -> _Table:
        t = self._tables.get(name)
        if t is None:
            raise TableNotFound(f"table {name!r} does not exist on this shard; create it first")
        return t

    def _writable(self) -> None:
        if self.config.read_only:
            raise ReadOnly("this shard serves lookups only; restart it without --read-only")

    def create_table(self, spec: TableConfig) -> tuple[TableStats, bool]:
        """Create `spec`; the same spec again returns created=False, another spec TableExists."""
        spec.validate()
        with self._wlock:
            old = self._tables.get(spec.name)
            if old is not None:
                if old.spec != spec:
                    raise TableExists(
                        f"table {spec.name!r} exists with another spec ({old.spec}); drop it "
                        "first or use another name"
                    )
                return self._stats(old), False
            self._writable()
            if len(self._tables) >= _MAX_DBS:
                raise StoreFull(f"this shard holds the maximum of {_MAX_DBS} tables; drop one")
            with self._write() as txn:
                db = self._env.open_db(b"rows:" + spec.name.encode(), txn=txn)
                txn.put(b"table:" + spec.name.encode(), _Table(spec, db).meta_json(), db=self._meta)
            t = self._add_table(spec, db)
            return self._stats(t), True

    def drop_table(self, name: str) -> bool:
        """Delete a table and all its rows; False if it did not exist."""
        with self._wlock:
            t = self._tables.get(name)
            if t is None:
                return False
            self._writable()
            with self._write() as txn:
                txn.drop(t.db, delete=True)
                txn.delete(b"table:" + name.encode(), db=self._meta)
            with self._mlock.write():
                del self._tables[name]
                t.mirror.clear()
                t.mirror.gen += 1
            return True

    def table(self, name: str) -> TableConfig:
        """The spec of table `name` (TableNotFound if absent)."""
        return self._get(name).spec

    def tables(self) -> list[TableConfig]:
        """Specs of every table, by name."""
        return [self._tables[n].spec for n in sorted(self._tables)]

    def table_stats(self, name: str) -> TableStats:
        """Stored rows and bytes, step and push count of table `name`."""
        return self._stats(self._get(name))

    def _stats(self, t: _Table) -> TableStats:
        with self._env.begin() as txn:
            n = txn.stat(t.db)["entries"]
        return TableStats(t.spec, n, n * t.record_bytes, t.step, t.pushes)

    def record_bytes(self, table: str) -> int:
        """Bytes of one stored record of `table`: row in storage dtype, then float32 state."""
        return self._get(table).record_bytes

    # ---- validation ----

    def _check_ids(self, t: _Table, ids: np.ndarray) -> None:
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype != np.int64:
            what = (
                f"{ids.ndim}-D {ids.dtype}" if isinstance(ids, np.ndarray) else type(ids).__name__
            )
            raise InvalidArgument(f"ids must be a 1-D np.int64 array, got {what}")
        if ids.shape[0] > self.config.max_batch_rows:
            raise BatchTooLarge(
                f"{ids.shape[0]} ids exceed this shard's max_batch_rows="
                f"{self.config.max_batch_rows}; split the request"
            )
        if ids.shape[0] and (ids.min() < 0 or ids.max() >= t.spec.num_rows):
            bad = int(ids[(ids < 0) | (ids >= t.spec.num_rows)][0])
            raise InvalidArgument(
                f"row id {bad} is out of range for table {t.spec.name!r}; ids must lie in "
                f"[0, {t.spec.num_rows})"
            )

    def _check_owned(self, t: _Table, ids: np.ndarray, push: bool) -> None:
        st = self._state
        if not st.owned and not (push and st.frozen) or ids.shape[0] == 0:
            return
        slots = slot_of(t.spec.name, ids, st.num_slots)
        if st.owned and not np.frombuffer(st.owned, np.uint8)[slots].all():
            raise WrongShard(
                f"stale shard map (shard has version {st.map_version}); rows of "
                f"table {t.spec.name!r} are not owned here: refresh the map"
            )
        if push and st.frozen and np.frombuffer(st.frozen, np.uint8)[slots].any():
            raise ShardUnavailable("slots moving: some rows are being resharded; retry shortly")

    # ---- records ----

    def _read(self, txn: lmdb.Transaction, t: _Table, ids: np.ndarray) -> np.ndarray:
        """Records of distinct `ids` from LMDB; initial rows and state where never stored."""
        if txn.stat(t.db)["entries"] == 0:  # a fresh table: skip n futile gets
            found, vals = [], []
        else:
            get = txn.get
            vals = [get(k, db=t.db) for k in row_keys(ids)]
            found = [i for i, v in enumerate(vals) if v is not None]
        if len(found) == ids.shape[0]:  # every id stored: no None among vals
            stored = b"".join(cast("list[bytes]", vals))
            return np.frombuffer(stored, np.uint8).reshape(-1, t.record_bytes)
        rec = t.layout.encode(
            init.initial_rows(t.spec, ids), init.initial_state(t.spec, ids.shape[0])
        )
        if found:
            stored = b"".join(cast(bytes, vals[i]) for i in found)
            rec[found] = np.frombuffer(stored, np.uint8).reshape(-1, t.record_bytes)
        return rec

    def _records(
        self,
        t: _Table,
        ids: np.ndarray,
        txn: lmdb.Transaction | None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Current records of distinct `ids`: mirror first, then LMDB (or init)."""
        with self._mlock.read():
            pos = t.mirror.find(ids)
            hit = pos >= 0
            if out is None:
                out = np.empty((ids.shape[0], t.record_bytes), np.uint8)
            if hit.all():
                # mode="clip" skips take's defensive copy of `out`; positions are valid
                np.take(t.mirror.rec, pos, axis=0, out=out, mode="clip")
                return out
            out[hit] = t.mirror.rec[pos[hit]]
        miss = np.flatnonzero(~hit)
        if txn is None:
            with self._env.begin() as rtxn:
                out[miss] = self._read(rtxn, t, ids[miss])
        else:
            out[miss] = self._read(txn, t, ids[miss])
        return out

    def _scratch(self, name: str, n: int, width: int) -> np.ndarray:
        """A reusable (n, width) uint8 buffer for the writer (fresh pages fault slowly)."""
        need = n * width
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < need:
            buf = np.empty(max(need, 1 << 20), np.uint8)
            if need <= _SCRATCH_MAX:
                self._bufs[name] = buf
        return buf[:need].reshape(n, width)

    # ---- reads ----

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """float32 (n, dim) current rows of `ids` (any order, duplicates allowed)."""
        t = self._get(table)
        self._check_ids(t, ids)
        self._check_owned(t, ids, push=False)
        if ids.shape[0] == 0:
            return np.empty((0, t.spec.dim), np.float32)
        with self._mlock.read():
            pos = t.mirror.find(ids)
            hit = pos >= 0
            if hit.all():
                return t.layout.rows(t.mirror.rec[pos, : t.layout.row_bytes])
            out = np.empty((ids.shape[0], t.spec.dim), np.float32)
            out[hit] = t.layout.rows(t.mirror.rec[pos[hit], : t.layout.row_bytes])
            gen = t.mirror.gen
        miss = ~hit
        miss_ids, inverse = np.unique(ids[miss], return_inverse=True)
        try:
            with self._env.begin() as txn:
                rec = self._read(txn, t, miss_ids)
        except lmdb.Error:
            if self._tables.get(table) is not t:  # dropped while we read
                raise TableNotFound(f"table {table!r} was dropped; create it again") from None
            raise
        out[miss] = t.layout.rows(rec)[inverse]
        if t.mirror.capacity:
            with self._mlock.write():
                # a write since `gen` may have committed newer values than these: then skip
                if t.mirror.gen == gen:
                    t.mirror.put(miss_ids, rec)
        return out

    def lookup_into(
        self, table: str, ids: np.ndarray, dtype: str, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows of `ids` in wire dtype `dtype` as uint8 (n, row_bytes(dtype, dim)), written into
        the front of `out` (a reusable uint8 buffer of at least that many bytes) when given."""
        from engram_store.engine import dtypes
        from engram_store.engine.config import row_bytes

        t = self._get(table)
        rb = row_bytes(dtype, t.spec.dim)
        n = int(np.asarray(ids).shape[0]) if isinstance(ids, np.ndarray) else 0
        res = np.frombuffer(dtypes.to_bytes(self.lookup(table, ids), dtype), np.uint8)
        if out is None:
            return res.reshape(n, rb).copy()
        view = out.reshape(-1)[: n * rb].reshape(n, rb)
        view[...] = res.reshape(n, rb)
        return view

    def optimizer_state(self, table: str, ids: np.ndarray) -> np.ndarray:
        """float32 (n, state_width * dim) optimizer state of `ids`."""
        t = self._get(table)
        self._check_ids(t, ids)
        uids, inverse = np.unique(ids, return_inverse=True)
        rec = self._records(t, uids, None)
        return np.array(t.layout.state(rec))[inverse]

    # ---- writes ----

    def push(
        self, table: str, ids: np.ndarray, grads: np.ndarray, request_id: str = "", step: int = 0
    ) -> PushResult:
        """Apply one optimizer step to rows `ids` with gradients `grads` (duplicates summed).

        step 0 means the table's step + 1. A request id seen before returns duplicate=True and
        changes nothing. Either everything is applied and committed or nothing is.
        """
        t = self._get(table)
        self._writable()
        self._check_ids(t, ids)
        n, dim = ids.shape[0], t.spec.dim
        if (
            not isinstance(grads, np.ndarray)
            or grads.dtype != np.float32
            or grads.shape != (n, dim)
        ):
            what = (
                f"{grads.dtype} {grads.shape}"
                if isinstance(grads, np.ndarray)
                else type(grads).__name__
            )
            raise InvalidArgument(f"grads must be float32 of shape ({n}, {dim}), got {what}")
        if n and not (np.isfinite(grads.min()) and np.isfinite(grads.max())):
            raise InvalidArgument("grads contain NaN or Inf; skip or clip this step")
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise InvalidArgument(f"step={step} must be an integer >= 0 (0: table step + 1)")
        if not isinstance(request_id, str):
            raise InvalidArgument(f"request_id must be a str, got {type(request_id).__name__}")
        req_key = t.spec.name.encode() + b"\0" + request_id.encode()
        if len(req_key) > self._env.max_key_size():
            raise InvalidArgument(
                f"request_id of {len(request_id)} characters is too long; "
                f"use at most {self._env.max_key_size() - len(table) - 1} bytes"
            )
        with self._wlock:
            if self._tables.get(table) is not t:
                raise TableNotFound(f"table {table!r} was dropped; create it again")
            with self._write() as txn:
                # a retry of an applied push is acknowledged even if its slots moved since
                done = txn.get(req_key, db=self._req) if request_id else None
                if done is not None:
                    old_step, rows_updated = _REQ.unpack(done)
                    return PushResult(rows_updated, True, old_step)
                # ownership under the writer lock: a freeze precedes this push or follows it
                self._check_owned(t, ids, push=True)
                step = int(step) or t.step + 1
                if n == 0:
                    return PushResult(0, False, step)
                uids, order, summed = distinct_ids(ids, grads)
                m = uids.shape[0]
                new = self._scratch("new", m, t.record_bytes)
                self._apply(t, uids, order, grads if summed is None else summed, step, new, txn)
                txn.cursor(db=t.db).putmulti(put_items(uids, new))
                if request_id:
                    self._log_request(txn, req_key, step, m)
                new_step, new_pushes = max(t.step, step), t.pushes + 1
                txn.put(
                    b"table:" + t.spec.name.encode(),
                    t.meta_json(new_step, new_pushes),
                    db=self._meta,
                )
            t.step, t.pushes = new_step, new_pushes
            with self._mlock.write():
                t.mirror.put(uids, new)
                t.mirror.gen += 1
            return PushResult(int(m), False, step)

    def _apply(
        self,
        t: _Table,
        uids: np.ndarray,
        order: np.ndarray | None,
        grads: np.ndarray,
        step: int,
        new: np.ndarray,
        txn: lmdb.Transaction,
    ) -> None:
        """Records after one optimizer step on distinct sorted `uids` into `new`; the gradient
        of uids[i] is grads[order[i]] (grads[i] when order is None). Works in row chunks, which
        keep the optimizer's temporaries in cache."""
        m = uids.shape[0]

        def part(src: np.ndarray | None, start: int) -> None:
            for lo in range(start, min(start + _PART, m), _CHUNK):
                hi = min(lo + _CHUNK, m)
                g = grads[lo:hi] if order is None else grads[order[lo:hi]]
                old = t.mirror.rec[pos[lo:hi]] if src is None else src[lo:hi]
                t.layout.step(old, new[lo:hi], g, step)

        def chunks(src: np.ndarray | None) -> None:
            # numpy releases the GIL in its loops, so parts run in parallel on a multi-core host
            starts = range(0, m, _PART)
            if len(starts) == 1 or self._pool is None:
                for lo in starts:
                    part(src, lo)
            else:
                list(self._pool.map(lambda lo: part(src, lo), starts))

        with self._mlock.read():
            pos = t.mirror.find(uids)
            if (pos >= 0).all():  # warm: gather each chunk straight from the mirror
                chunks(None)
                return
        old = self._records(t, uids, txn, self._scratch("old", m, t.record_bytes))
        chunks(old)

    def _log_request(self, txn: lmdb.Transaction, key: bytes, step: int, rows: int) -> None:
        cur = txn.cursor(db=self._reqseq)
        seq = struct.unpack(">Q", cur.key())[0] + 1 if cur.last() else 0
        txn.put(key, _REQ.pack(step, rows), db=self._req)
        txn.put(struct.pack(">Q", seq), key, db=self._reqseq)
        excess = txn.stat(self._reqseq)["entries"] - self.config.request_log
        if excess > 0 and cur.first():
            for _ in range(excess):
                txn.delete(cur.value(), db=self._req)
                cur.delete()

    @contextmanager
    def _write(self, db: lmdb._Database | None = None) -> Iterator[lmdb.Transaction[bytes]]:
        """A write transaction: committed when the block ends, aborted on any exception (so
        nothing is partly applied); a full LMDB map raises StoreFull."""
        try:
            with self._env.begin(db=db, write=True) as txn:
                yield txn
        except lmdb.MapFullError as e:
            raise StoreFull(
                f"the LMDB map of {self.config.map_size} bytes is full; restart the "
                "shard with a larger --map-size (only touched pages use disk)"
            ) from e

    # ---- shard state and resharding ----

    def shard_state(self) -> ShardStateInfo:
        """Slots this shard owns and slots frozen for moving."""
        return self._state

    def set_shard_state(self, state: ShardStateInfo) -> ShardStateInfo:
        """Replace (and persist) the ownership state; returns it."""
        for name in ("owned", "frozen"):
            v = getattr(state, name)
            if v and len(v) != state.num_slots:
                raise InvalidArgument(
                    f"shard state {name} has {len(v)} bytes; send num_slots="
                    f"{state.num_slots} bytes, or none"
                )
        if (state.owned or state.frozen) and state.num_slots <= 0:
            raise InvalidArgument("shard state with owned/frozen slots needs num_slots > 0")
        with self._wlock:
            if self._state.layout and state.layout and self._state.layout != state.layout:
                raise LayoutMismatch(
                    f"data directory belongs to cluster layout {self._state.layout!r}, not "
                    f"{state.layout!r}; give this shard a fresh --data directory"
                )
            with self._write() as txn:
                txn.put(b"shard", state.to_json().encode(), db=self._meta)
            self._state = state
            return state

    def _slot_mask(self, slot_mask: np.ndarray) -> np.ndarray:
        m = np.asarray(slot_mask)
        if m.ndim != 1 or m.shape[0] == 0:
            raise InvalidArgument("slot mask must be a non-empty 1-D array of num_slots flags")
        return m.astype(bool)

    def export_rows(
        self, table: str, slot_mask: np.ndarray, batch_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Stored rows of the slots in `slot_mask`: (ids, records uint8 (n, record_bytes), step)
        batches of at most `batch_rows`, from one consistent snapshot."""
        t = self._get(table)
        mask = self._slot_mask(slot_mask)
        if batch_rows <= 0:
            raise InvalidArgument(f"batch_rows={batch_rows} must be > 0")
        step = t.step
        return self._export(t, mask, batch_rows, step)

    def _export(
        self, t: _Table, mask: np.ndarray, batch_rows: int, step: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        with self._env.begin(db=t.db) as txn:
            for ids, vals in self._scan(txn, t, mask):
                rec = np.frombuffer(b"".join(vals), np.uint8).reshape(-1, t.record_bytes)
                for lo in range(0, ids.shape[0], batch_rows):
                    yield ids[lo : lo + batch_rows], rec[lo : lo + batch_rows], step

    def _scan(
        self, txn: lmdb.Transaction[bytes], t: _Table, mask: np.ndarray
    ) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """Chunks (ids, values) of the stored rows whose slot is set in `mask`."""
        it = txn.cursor(db=t.db).iternext()
        while True:
            chunk = list(itertools.islice(it, _SCAN))
            if not chunk:
                return
            ids = np.frombuffer(b"".join(k for k, _ in chunk), ">u8").astype(np.int64)
            sel = np.flatnonzero(mask[slot_of(t.spec.name, ids, mask.shape[0])])
            if sel.shape[0]:
                yield ids[sel], [chunk[i][1] for i in sel]

    def import_rows(self, table: str, ids: np.ndarray, records: np.ndarray, step: int) -> int:
        """Store exported records as they are; the table step becomes at least `step`."""
        t = self._get(table)
        self._writable()
        self._check_ids(t, ids)
        rec = np.asarray(records)
        if rec.dtype != np.uint8 or rec.shape != (ids.shape[0], t.record_bytes):
            raise InvalidArgument(
                f"records must be uint8 of shape ({ids.shape[0]}, "
                f"{t.record_bytes}), got {rec.dtype} {rec.shape}"
            )
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise InvalidArgument("import ids must be distinct")
        if ids.shape[0]:
            rows, state = t.layout.rows(rec), t.layout.state(np.ascontiguousarray(rec))
            if not (np.isfinite(rows).all() and np.isfinite(state).all()):
                raise InvalidArgument("imported records contain NaN or Inf; re-export them")
        with self._wlock:
            new_step = max(t.step, int(step))
            with self._write() as txn:
                txn.cursor(db=t.db).putmulti(put_items(ids, rec))
                txn.put(b"table:" + t.spec.name.encode(), t.meta_json(new_step), db=self._meta)
            t.step = new_step
            with self._mlock.write():
                t.mirror.clear()
                t.mirror.gen += 1
            return int(ids.shape[0])

    def delete_rows(self, table: str, slot_mask: np.ndarray) -> int:
        """Delete the stored rows of the slots in `slot_mask`; returns how many."""
        t = self._get(table)
        self._writable()
        mask = self._slot_mask(slot_mask)
        with self._wlock:
            n = 0
            with self._write(db=t.db) as txn:
                doomed = [ids for ids, _ in self._scan(txn, t, mask)]
                for k in row_keys(np.concatenate(doomed)) if doomed else []:
                    n += txn.delete(k)
            with self._mlock.write():
                t.mirror.clear()
                t.mirror.gen += 1
            return n

    # ---- snapshots ----

    def snapshot(self, path: str) -> list[TableStats]:
        """Copy the environment, compacted, into the existing empty directory `path` and return
        every table's stats as copied. Writers wait for the copy (it is one read transaction)."""
        with self._wlock:
            self._env.copy(path, compact=True)
            return [self._stats(self._tables[n]) for n in sorted(self._tables)]

    # ---- stats ----

    def stats(self) -> dict:
        """stored_rows, stored_bytes, map_size_bytes, used_bytes, cache_rows over all tables."""
        info, st = self._env.info(), self._env.stat()
        stored_rows = stored_bytes = 0
        with self._env.begin() as txn:
            for t in list(self._tables.values()):
                n = txn.stat(t.db)["entries"]
                stored_rows += n
                stored_bytes += n * t.record_bytes
        return {
            "stored_rows": stored_rows,
            "stored_bytes": stored_bytes,
            "map_size_bytes": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * st["psize"],
            "cache_rows": sum(t.mirror.n for t in list(self._tables.values())),
        }
