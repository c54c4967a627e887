"""Shard: the tables of one data directory, in dense host-RAM arrays backed by an LMDB push log.

Rows and optimizer state live in RAM (engine/arrays.py), found through an id -> offset index that
grows with the rows stored. LMDB (one environment per data directory) keeps them durable, used
the way it is fast (docs/design.md "Storage"):

- every acknowledged write is appended to the `log` sub-database as one entry (request id, step,
  distinct ids and their gradients, or imported records, or a deletion), with MDB_APPEND; a write
  is acknowledged after its entry commits (so it survives kill -9; `durable` adds fdatasync and
  survives a power cut). Writes that arrive together share one commit (group commit);
- a background checkpointer writes the arrays, chunk by chunk, into `chunks`, each chunk as of
  the log sequence it was copied at, then trims the log entries every chunk has seen;
- opening the directory loads the chunks and replays the log on top, exactly: an entry is applied
  to a row only if it is newer than the chunk the row was loaded from.

Sub-databases: `meta` (format, uid counter, `table:<name>` spec + counters, `lsn:<uid>` per-chunk
sequences, `shard` ownership state), `log`, `chunks`, `requests` (uid + request id -> seq, step,
rows: exactly-once pushes) and `reqseq` (its pruning order).

Concurrency: a write passes three stages. *Enqueue* (under a short lock): exactly-once check,
ownership, memory reservation, sequence number. *Commit*: one thread commits every queued entry
in one LMDB transaction. *Apply*: entries change the arrays in sequence order, each under its
table's write lock, so two writes are in flight at once (one commits while one applies). Lookups
gather under the table's read lock: a lookup sees every row of its batch at one applied version,
and nothing is applied before it is committed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fcntl
import json
import logging
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import lmdb
import numpy as np

from engram_store.engine import init, kernels, records
from engram_store.engine.arrays import NEVER, TableArrays, chunk_rows_for, reserve
from engram_store.engine.config import ShardConfig, TableConfig, row_bytes
from engram_store.engine.errors import (
    BatchTooLarge,
    ConfigError,
    DataCorrupted,
    DataDirLocked,
    EngramError,
    InvalidArgument,
    LayoutMismatch,
    ReadOnly,
    ShardUnavailable,
    StoreFull,
    TableExists,
    TableNotFound,
    WrongShard,
)
from engram_store.engine.index import distinct
from engram_store.engine.records import DELETE, IMPORT, PUSH, LogHeader
from engram_store.engine.routing import ShardMap, slot_of
from engram_store.engine.types import PushResult, ShardStateInfo, TableStats

log = logging.getLogger(__name__)

FORMAT = 2  # the data directory format this engine writes (meta `format`)
MARKER = "engram-shard.json"  # written beside data.mdb: a shard lived here
_MAX_DBS = 4096  # tables per shard
_REQ = struct.Struct(">qqq")  # request log value: (seq, step, rows_updated)
_MAX_STEP = 1 << 62
_FLUSH_BYTES = 64 << 20  # checkpoint bytes per LMDB transaction
_SPLIT_ROWS = 16384  # optimizer work split over two threads above this many rows
_SCAN = 1 << 16  # offsets per chunk when scanning a table's ids (export / delete)
_DBS = (b"meta", b"log", b"chunks", b"requests", b"reqseq")


@dataclass
class _Entry:
    """One write on its way through enqueue -> commit -> apply."""

    table: TableArrays
    kind: int
    seq: int
    step: int
    request_id: str
    header: bytes
    payload: memoryview
    data: tuple  # the decoded payload (ids, values) the apply stage uses
    reserved: int = 0  # memory bytes reserved for new rows
    committed: bool = False
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Shard:
    """Rows and optimizer state of the tables of one data directory. Thread-safe."""

    def __init__(self, config: ShardConfig) -> None:
        config.validate()
        self.config = config
        self._closed = True
        self._check_files(config.data_dir)
        self._lock_file = None
        self._dir_fd: int | None = None
        if config.read_only:
            if not os.path.exists(os.path.join(config.data_dir, "data.mdb")):
                raise ConfigError(
                    f"--read-only serves an existing shard, and {config.data_dir} holds none; "
                    "start it writable first, or give the directory of one"
                )
        else:
            os.makedirs(config.data_dir, exist_ok=True)
        try:
            self._lock_file = open(os.path.join(config.data_dir, "shard.lock"), "a+")  # noqa: SIM115
        except OSError:
            if not config.read_only:
                raise
            # a read-only directory: no writer can open it either, so there is nothing to lock
        if self._lock_file is not None:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # the directory itself is locked too: deleting shard.lock does not let a second
                # process in (it would lock a new file of the same name)
                self._dir_fd = os.open(config.data_dir, os.O_RDONLY)
                fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if self._dir_fd is not None:
                    os.close(self._dir_fd)
                    self._dir_fd = None
                self._lock_file.close()
                raise DataDirLocked(
                    f"data directory {config.data_dir} is in use by another shard process; stop "
                    "it or give this shard another --data directory"
                ) from e
            self._lock_file.truncate(0)
            self._lock_file.write(f"{os.getpid()}\n")
            self._lock_file.flush()
        self._tables: dict[str, TableArrays] = {}
        self._state = ShardStateInfo()
        self._qlock = threading.Lock()  # enqueue: sequence numbers, request ids, reservations
        self._queue: list[_Entry] = []
        self._pending: dict[tuple[int, str], _Entry] = {}
        self._commit_lock = threading.Lock()
        self._turn = threading.Condition()  # apply order
        self._failed: set[int] = set()
        self._paused = 0  # > 0: enqueue waits (snapshot, drop, shard state)
        self._unpaused = threading.Condition(self._qlock)
        self._next_seq = 1
        self._applied_seq = 0
        self._reserved = 0
        self._log_bytes = 0  # payload bytes of the log entries kept
        self._log_sizes: dict[int, int] = {}
        self._next_uid = 1
        self._pool = ThreadPoolExecutor(2, "engram-opt") if (os.cpu_count() or 1) > 1 else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ckpt_lock = threading.Lock()
        self._ckpt_thread: threading.Thread | None = None
        self._loaded = False
        try:
            self._env = self._open_env()
            self._closed = False
            self._load()
            self._after_load()
            self._loaded = True
        except BaseException:
            self.close()
            raise
        if not config.read_only:
            self._ckpt_thread = threading.Thread(
                target=self._checkpoint_loop, name="engram-ckpt", daemon=True
            )
            self._ckpt_thread.start()

    # ---- files ----

    @staticmethod
    def _check_files(data_dir: str) -> None:
        """Refuse a directory whose data file is missing, empty or shorter than LMDB says,
        before LMDB maps it (a short map crashes the process with SIGBUS on first touch)."""
        path = os.path.join(data_dir, "data.mdb")
        marker = os.path.join(data_dir, MARKER)
        if os.path.exists(marker) and (not os.path.exists(path) or os.path.getsize(path) == 0):
            raise DataCorrupted(
                f"{path} is {'missing' if not os.path.exists(path) else 'empty'}, but "
                f"{data_dir} held a shard ({MARKER}); restore it from a snapshot (engram "
                "restore) or remove the directory to start an empty shard"
            )
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(2 * 4096)
        # the two LMDB meta pages: magic 0xBEEFC0DE, then the last used page number
        last = -1
        psize = 4096
        for page in (0, 1):
            off = page * psize
            meta = head[off + 16 : off + 16 + 136]
            if len(meta) < 136:
                break
            magic, _version = struct.unpack_from("<II", meta, 0)
            if magic != 0xBEEFC0DE:
                raise DataCorrupted(
                    f"{path} is not an LMDB data file (bad meta page {page}); restore it from "
                    "a snapshot or remove the directory"
                )
            (txn_pgno,) = struct.unpack_from("<Q", meta, 120)
            last = max(last, txn_pgno)
        if last >= 0 and size < (last + 1) * psize:
            raise DataCorrupted(
                f"{path} is truncated: {size} bytes, but LMDB uses {(last + 1) * psize}; "
                "restore it from a snapshot (engram restore)"
            )

    def _open_env(self) -> lmdb.Environment:
        c = self.config
        ro = c.read_only
        try:
            env = lmdb.open(
                c.data_dir,
                map_size=c.map_size,
                max_dbs=8,
                sync=c.durable,
                metasync=c.durable,
                readahead=False,
                max_readers=c.max_readers,
                readonly=ro,
                # LMDB's reader table needs a writable lock.mdb; a read-only directory has no
                # writer to coordinate with
                lock=not ro or os.access(c.data_dir, os.W_OK),
            )
            dbs = [env.open_db(n, create=not ro) for n in _DBS]
        except lmdb.Error as e:
            if "env" in locals():
                env.close()
            self._release_lock()
            raise DataCorrupted(
                f"cannot open LMDB in {c.data_dir} ({e}); restore it from a snapshot or use "
                "another --data directory"
            ) from e
        if not ro:
            with open(os.path.join(c.data_dir, MARKER), "w") as f:
                json.dump({"format": FORMAT}, f)
        self._meta, self._log, self._chunks, self._req, self._reqseq = dbs
        return env

    # ---- lifecycle ----

    def close(self) -> None:
        """Stop the checkpointer (after one last checkpoint), close LMDB, release the dir."""
        if self._closed:
            if getattr(self, "_lock_file", None) is not None:
                self._release_lock()
            return
        self._stop.set()
        self._wake.set()
        if self._ckpt_thread is not None:
            self._ckpt_thread.join()
        try:
            if self._loaded and not self.config.read_only and self._log_bytes:
                self.checkpoint()
        except StoreFull as e:  # the log still holds every write: the next open replays it
            log.warning("final checkpoint skipped (%s); the next open replays the log", e)
        finally:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown()
            self._env.close()
            self._release_lock()

    def _release_lock(self) -> None:
        fd = getattr(self, "_dir_fd", None)
        if fd is not None:
            os.close(fd)  # closing drops the directory's flock
            self._dir_fd = None
        if self._lock_file is None or self._lock_file.closed:
            return
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- recovery ----

    def _load(self) -> None:
        """Tables and shard state from meta, arrays from the checkpoint chunks, then the log."""
        where = os.path.join(self.config.data_dir, "data.mdb")
        with self._env.begin() as txn:
            fmt = txn.get(b"format", db=self._meta)
            metas = [(k, v) for k, v in txn.cursor(db=self._meta) if k.startswith(b"table:")]
            raw_state = txn.get(b"shard", db=self._meta)
            uid = txn.get(b"next_uid", db=self._meta)
        if fmt is None and metas:
            raise DataCorrupted(
                f"{where} was written by engram < 0.3 (one LMDB record per row); export it "
                "with that version (engram export) and import it here"
            )
        if fmt is not None and int(fmt) != FORMAT:
            raise DataCorrupted(f"{where} has format {int(fmt)}; this engine reads {FORMAT}")
        if raw_state:
            try:
                self._state = ShardStateInfo.from_json(raw_state)
            except (ValueError, KeyError, TypeError) as e:
                raise DataCorrupted(f"{where}: the stored shard state does not parse ({e})") from e
        self._next_uid = int(uid) if uid else 1
        counters: dict[int, int] = {}
        for _, v in metas:
            d = json.loads(v)
            spec = TableConfig.from_dict(d["spec"])
            t = self._new_arrays(spec, int(d["uid"]), int(d["chunk_rows"]))
            t.step, t.pushes = int(d["step"]), int(d["pushes"])
            counters[t.uid] = int(d["counters_lsn"])
            self._tables[spec.name] = t
        by_uid = {t.uid: t for t in self._tables.values()}
        bases = {uid: self._load_chunks(t, where) for uid, t in by_uid.items()}
        self._replay(by_uid, bases, counters, where)

    def _new_arrays(self, spec: TableConfig, uid: int, chunk_rows: int) -> TableArrays:
        per = TableArrays.bytes_per_row(spec)
        cap = max(1, min(spec.num_rows, self.config.memory_budget() // per))
        return TableArrays(spec, uid, cap, chunk_rows)

    def _load_chunks(self, t: TableArrays, where: str) -> np.ndarray:
        """Fill `t` from its checkpoint chunks; returns the per-offset base sequence (the lsn of
        the chunk each loaded row came from)."""
        base = reserve(t.capacity, np.int64)
        with self._env.begin() as txn:
            raw = txn.get(b"lsn:%d" % t.uid, db=self._meta)
            if raw is not None:
                lsns = records.unpack_lsns(raw, f"{where} table {t.spec.name!r}")
                t.chunk_lsn[: lsns.shape[0]] = lsns
            cur = txn.cursor(db=self._chunks)
            prefix = struct.pack(">I", t.uid)
            ok = cur.set_range(prefix)
            while ok and cur.key()[:4] == prefix:
                c = struct.unpack(">I", cur.key()[4:])[0]
                what = f"{where} table {t.spec.name!r} chunk {c}"
                head, ids, rows, state = records.unpack_chunk(
                    cur.value(), what, t.row_bytes, t.state_floats
                )
                lo = c * t.chunk_rows
                if head.uid != t.uid or head.chunk != c or lo + head.rows > t.capacity:
                    raise DataCorrupted(f"{what}: the chunk belongs elsewhere")
                sl = slice(lo, lo + head.rows)
                t.ids_of[sl] = ids
                t.rows[sl] = rows
                t.state[sl] = state
                base[sl] = t.chunk_lsn[c]
                t.high = max(t.high, lo + head.rows)
                ok = cur.next()
        # a row in two chunks (deleted and stored again between their copies): the newer wins
        live = np.flatnonzero(t.ids_of[: t.high] >= 0).astype(np.int64)
        if live.shape[0]:
            order = np.lexsort((-base[live], t.ids_of[live]))
            ids_sorted = t.ids_of[live[order]]
            first = np.r_[True, ids_sorted[1:] != ids_sorted[:-1]]
            t.ids_of[live[order[~first]]] = -1
        t.index.rebuild(t.ids_of, t.high)
        free = np.flatnonzero(t.ids_of[: t.high] < 0).astype(np.int64)
        if free.shape[0]:
            t._free, t._nfree = free[::-1].copy(), int(free.shape[0])
        return base

    def _replay(
        self,
        by_uid: dict[int, TableArrays],
        bases: dict[int, np.ndarray],
        counters: dict[int, int],
        where: str,
    ) -> None:
        """Apply the kept log entries newer than each row's chunk; cut a damaged tail."""
        last = 0
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._log)
            ok = cur.first()
            while ok:
                seq, part = records.key_seq(cur.key())
                what = f"{where} log entry {seq}"
                try:
                    if part != 0:
                        raise DataCorrupted(f"{what}: payload without a header")
                    head = LogHeader.unpack(cur.value(), what)
                    if not cur.next() or records.key_seq(cur.key()) != (seq, 1):
                        raise DataCorrupted(f"{what}: header without its payload")
                    payload = cur.value()
                    head.check_payload(payload, what)
                except DataCorrupted:
                    if self._has_entries_after(seq):
                        raise
                    self._cut_tail(seq, what)
                    break
                last = seq
                self._log_sizes[seq] = head.payload_bytes
                self._log_bytes += head.payload_bytes
                t = by_uid.get(head.uid)
                if t is not None:
                    data = self._decode(t, head.kind, head.n, payload)
                    self._apply_data(t, head.kind, seq, head.step, data, bases[t.uid])
                    if seq > counters.get(t.uid, 0) and head.kind != DELETE:
                        t.step = max(t.step, head.step)
                        t.pushes += head.kind == PUSH
                ok = cur.next()
        self._next_seq = max(last, self._stored_seq()) + 1
        self._applied_seq = self._next_seq - 1

    def _stored_seq(self) -> int:
        with self._env.begin() as txn:
            raw = txn.get(b"seq", db=self._meta)
        return int(raw) if raw else 0

    def _has_entries_after(self, seq: int) -> bool:
        with self._env.begin(db=self._log) as txn:
            cur = txn.cursor()
            return cur.set_range(records.log_key(seq + 1, 0))

    def _cut_tail(self, seq: int, what: str) -> None:
        if self.config.read_only:
            log.warning("%s is damaged (the last entry); ignored (read-only shard)", what)
            return
        log.warning("%s is damaged and is the last entry: the log is cut back before it", what)
        with self._write() as txn:
            txn.delete(records.log_key(seq, 0), db=self._log)
            txn.delete(records.log_key(seq, 1), db=self._log)

    def _after_load(self) -> None:
        """Reopen LMDB: recovery read every page, and the map would keep them resident."""
        with self._env.begin(write=not self.config.read_only) as txn:
            if not self.config.read_only:
                txn.put(b"format", str(FORMAT).encode(), db=self._meta)
        self._env.close()
        self._env = self._open_env()

    # ---- tables ----

    def _get(self, name: str) -> TableArrays:
        t = self._tables.get(name)
        if t is None:
            raise TableNotFound(f"table {name!r} does not exist on this shard; create it first")
        return t

    def _writable(self) -> None:
        if self.config.read_only:
            raise ReadOnly("this shard serves lookups only; restart it without --read-only")

    def _meta_json(self, t: TableArrays, counters_lsn: int) -> bytes:
        return json.dumps(
            {
                "spec": t.spec.to_dict(),
                "uid": t.uid,
                "chunk_rows": t.chunk_rows,
                "step": t.step,
                "pushes": t.pushes,
                "counters_lsn": counters_lsn,
            }
        ).encode()

    def create_table(self, spec: TableConfig) -> tuple[TableStats, bool]:
        """Create `spec`; the same spec again returns created=False, another spec TableExists."""
        spec.validate()
        with self._qlock:
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
            t = self._new_arrays(spec, self._next_uid, chunk_rows_for(spec))
            with self._write() as txn:
                txn.put(b"table:" + spec.name.encode(), self._meta_json(t, 0), db=self._meta)
                txn.put(b"next_uid", str(t.uid + 1).encode(), db=self._meta)
            self._next_uid += 1
            self._tables[spec.name] = t
            return self._stats(t), True

    def drop_table(self, name: str) -> bool:
        """Delete a table, its rows and its request ids; False if it did not exist."""
        with self._quiet():
            t = self._tables.get(name)
            if t is None:
                return False
            self._writable()
            with self._ckpt_lock, self._write() as txn:
                txn.delete(b"table:" + name.encode(), db=self._meta)
                txn.delete(b"lsn:%d" % t.uid, db=self._meta)
                self._delete_prefix(txn, self._chunks, struct.pack(">I", t.uid))
                self._delete_prefix(txn, self._req, struct.pack(">I", t.uid))
            with t.lock.write():
                t.dropped = True
                del self._tables[name]
            return True

    @staticmethod
    def _delete_prefix(txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes) -> None:
        cur = txn.cursor(db=db)
        ok = cur.set_range(prefix)
        while ok and cur.key() and bytes(cur.key()).startswith(prefix):
            ok = cur.delete()

    def table(self, name: str) -> TableConfig:
        """The spec of table `name` (TableNotFound if absent)."""
        return self._get(name).spec

    def tables(self) -> list[TableConfig]:
        """Specs of every table, by name."""
        return [self._tables[n].spec for n in sorted(self._tables)]

    def table_stats(self, name: str) -> TableStats:
        """Stored rows and bytes, step and push count of table `name`."""
        return self._stats(self._get(name))

    @staticmethod
    def _stats(t: TableArrays) -> TableStats:
        n = t.stored
        return TableStats(t.spec, n, n * t.record_bytes, t.step, t.pushes)

    def record_bytes(self, table: str) -> int:
        """Bytes of one exported record of `table`: row in storage dtype, then float32 state."""
        return self._get(table).record_bytes

    # ---- validation ----

    def _check_ids(self, t: TableArrays, ids: np.ndarray) -> None:
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

    def _check_owned(self, t: TableArrays, ids: np.ndarray, push: bool) -> None:
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

    def _check_values(self, what: str, x: np.ndarray) -> None:
        if x.shape[0] == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InvalidArgument(f"{what} contain NaN or Inf; skip or clip this step")
        limit = self.config.max_abs_value
        if max(-lo, hi) > limit:
            raise InvalidArgument(
                f"{what} reach {max(-lo, hi):.3g}, above this shard's limit of {limit:g} (the "
                "optimizer state would overflow float32); clip them"
            )

    # ---- reads ----

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """float32 (n, dim) current rows of `ids` (any order, duplicates allowed)."""
        t = self._get(table)
        return self.lookup_into(table, ids, "float32").view("<f4").reshape(-1, t.spec.dim)

    def lookup_into(
        self, table: str, ids: np.ndarray, dtype: str, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows of `ids` in wire dtype `dtype` as uint8 (n, row_bytes(dtype, dim)), written into
        the front of `out` (a reusable uint8 buffer of at least that many bytes) when given.

        One gather from the rows array; rows in the storage dtype are copied as they are, other
        dtypes are converted after the gather. Every row of the batch is read at one applied
        version (the table's read lock is held during the gather)."""
        t = self._get(table)
        self._check_ids(t, ids)
        self._check_owned(t, ids, push=False)
        n, dim = ids.shape[0], t.spec.dim
        rb = row_bytes(dtype, dim)
        if out is None:
            res = np.empty((n, rb), np.uint8)
        else:
            if out.dtype != np.uint8 or out.size < n * rb:
                raise InvalidArgument(f"out must be a uint8 buffer of >= {n * rb} bytes")
            res = out.reshape(-1)[: n * rb].reshape(n, rb)
        same = dtype == t.spec.dtype
        dst = res if same else np.empty((n, t.row_bytes), np.uint8)
        offs = np.empty(n, np.int64)
        with t.lock.read():
            if t.dropped:
                raise TableNotFound(f"table {table!r} was dropped; create it again")
            hits = self._find_gather(t, ids, offs, dst)
        if hits < n:
            miss = np.flatnonzero(offs < 0)
            uniq, inv = np.unique(ids[miss], return_inverse=True)
            fresh = kernels.encode(init.initial_rows(t.spec, uniq), t.spec.dtype)
            dst[miss] = fresh[inv.reshape(-1)]
        if not same:
            kernels.convert(dst, t.spec.dtype, dtype, dim, res)
        return res

    def _find_gather(
        self, t: TableArrays, ids: np.ndarray, offs: np.ndarray, dst: np.ndarray
    ) -> int:
        """Offsets of `ids` and their rows into `dst` (call under the table's read lock); the
        halves of a large batch on two threads (random rows are memory-latency bound, and the
        numba loops release the GIL). Rows never stored gather row 0 here; the caller
        overwrites them with initial rows."""

        def part(a: int, b: int) -> int:
            h = t.find(ids[a:b], offs[a:b])
            o = offs[a:b] if h == b - a else np.maximum(offs[a:b], 0)
            kernels.gather(t.rows, o, dst[a:b])
            return h

        n = ids.shape[0]
        if self._pool is None or n < _SPLIT_ROWS:
            return part(0, n)
        futs = [self._pool.submit(part, 0, n // 2), self._pool.submit(part, n // 2, n)]
        return sum(f.result() for f in futs)

    def optimizer_state(self, table: str, ids: np.ndarray) -> np.ndarray:
        """float32 (n, state_floats) optimizer state of `ids`."""
        t = self._get(table)
        self._check_ids(t, ids)
        offs = np.empty(ids.shape[0], np.int64)
        out = np.empty((ids.shape[0], t.state_floats), np.float32)
        with t.lock.read():
            t.find(ids, offs)
            hit = offs >= 0
            out[hit] = t.state[offs[hit]]
        if not hit.all():
            out[~hit] = init.initial_state(t.spec, int((~hit).sum()))
        return out

    # ---- writes ----

    def push(
        self, table: str, ids: np.ndarray, grads: np.ndarray, request_id: str = "", step: int = 0
    ) -> PushResult:
        """Apply one optimizer step to rows `ids` with gradients `grads` (duplicates summed).

        step 0 means the table's step + 1. A request id seen before returns duplicate=True and
        changes nothing. The push is acknowledged (returns) after its log entry committed and it
        was applied; when it raises, nothing of it was applied or logged.
        """
        t = self._get(table)
        self._writable()
        if t.spec.dtype == "float8_e4m3":
            raise ReadOnly(
                f"table {table!r} stores float8_e4m3 rows, which are served, not trained; "
                "import it as bfloat16 or float32 to train it"
            )
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
        self._check_step(step)
        self._check_request_id(t, request_id)
        self._check_values("grads", grads)
        if n == 0:
            done = self._done(t, request_id)
            return done if done is not None else PushResult(0, False, int(step) or t.step + 1)
        uids, g = distinct(np.ascontiguousarray(ids), grads)
        uids, g = np.ascontiguousarray(uids), np.ascontiguousarray(g, np.float32)
        payload = np.empty(uids.shape[0] * (8 + 4 * dim), np.uint8)
        payload[: 8 * uids.shape[0]] = uids.view(np.uint8)
        payload[8 * uids.shape[0] :] = g.reshape(-1).view(np.uint8)
        e = self._enqueue(t, PUSH, request_id, int(step), payload, (uids, g))
        if isinstance(e, PushResult):
            return e
        self._run(e)
        return PushResult(int(uids.shape[0]), False, e.step)

    def import_rows(self, table: str, ids: np.ndarray, records: np.ndarray, step: int) -> int:
        """Store exported records (row in storage dtype + float32 state) as they are; the table
        step becomes at least `step`. All or nothing."""
        t = self._get(table)
        self._writable()
        self._check_ids(t, ids)
        self._check_step(step)
        rec = np.asarray(records)
        if rec.dtype != np.uint8 or rec.shape != (ids.shape[0], t.record_bytes):
            raise InvalidArgument(
                f"records must be uint8 of shape ({ids.shape[0]}, "
                f"{t.record_bytes}), got {rec.dtype} {rec.shape}"
            )
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise InvalidArgument("import ids must be distinct")
        if ids.shape[0] == 0 and int(step) <= t.step:
            return 0  # nothing to store; an empty import with a higher step moves the step
        rec = np.ascontiguousarray(rec)
        rows = kernels.decode(rec[:, : t.row_bytes], t.spec.dtype, t.spec.dim)
        self._check_values("imported rows", rows)
        if t.state_floats:
            self._check_values("imported optimizer state", rec[:, t.row_bytes :].view("<f4"))
        ids = np.ascontiguousarray(ids)
        payload = np.empty(ids.shape[0] * (8 + t.record_bytes), np.uint8)
        payload[: 8 * ids.shape[0]] = ids.view(np.uint8)
        payload[8 * ids.shape[0] :] = rec.reshape(-1)
        e = self._enqueue(t, IMPORT, "", int(step), payload, (ids.copy(), rec))
        assert not isinstance(e, PushResult)
        self._run(e)
        return int(ids.shape[0])

    def delete_rows(self, table: str, slot_mask: np.ndarray) -> int:
        """Delete the stored rows of the slots in `slot_mask`; returns how many."""
        t = self._get(table)
        self._writable()
        mask = self._slot_mask(slot_mask)
        with t.lock.read():
            before = t.stored
        e = self._enqueue(t, DELETE, "", 0, mask.astype(np.uint8), (mask,))
        assert not isinstance(e, PushResult)
        self._run(e)
        return before - t.stored

    def _check_step(self, step: object) -> None:
        if (
            not isinstance(step, (int, np.integer))
            or isinstance(step, bool)
            or not 0 <= step < _MAX_STEP
        ):
            raise InvalidArgument(
                f"step={step} must be an integer in [0, 2^62) (0: the table's step + 1)"
            )

    def _check_request_id(self, t: TableArrays, request_id: object) -> None:
        if not isinstance(request_id, str):
            raise InvalidArgument(f"request_id must be a str, got {type(request_id).__name__}")
        limit = min(self._env.max_key_size() - 4, 1024)
        if len(request_id.encode()) > limit:
            raise InvalidArgument(
                f"request_id of {len(request_id)} characters is too long; use at most {limit} bytes"
            )

    def _done(self, t: TableArrays, request_id: str) -> PushResult | None:
        """The result of an applied push with this request id, if there was one."""
        if not request_id:
            return None
        e = self._pending.get((t.uid, request_id))
        if e is not None:
            return PushResult(int(e.data[0].shape[0]), True, e.step)
        with self._env.begin(db=self._req) as txn:
            raw = txn.get(struct.pack(">I", t.uid) + request_id.encode())
        if raw is None:
            return None
        _seq, step, rows = _REQ.unpack(raw)
        return PushResult(int(rows), True, int(step))

    def _enqueue(
        self,
        t: TableArrays,
        kind: int,
        request_id: str,
        step: int,
        payload: np.ndarray,
        data: tuple,
    ) -> _Entry | PushResult:
        psum = kernels.checksum(payload)
        with self._qlock:
            while self._paused:
                self._unpaused.wait()
            if self._closed or self._tables.get(t.spec.name) is not t:
                raise TableNotFound(f"table {t.spec.name!r} was dropped; create it again")
            done = self._done(t, request_id)
            if done is not None:
                pending = self._pending.get((t.uid, request_id))
                if pending is None:
                    return done
            else:
                pending = None
            if pending is not None:
                # a retry of a push in flight: answer when that one has been applied
                self._qlock.release()
                try:
                    pending.done.wait()
                finally:
                    self._qlock.acquire()
                if pending.error is not None:
                    raise pending.error
                return PushResult(int(pending.data[0].shape[0]), True, pending.step)
            if kind != DELETE:
                ids = data[0]
                # ownership under the enqueue lock: a freeze precedes this write or follows it
                self._check_owned(t, ids, push=kind == PUSH)
            reserved = self._reserve(t, data[0]) if kind != DELETE else 0
            seq = self._next_seq
            self._next_seq += 1
            if kind == PUSH:
                step = step or max(t.step, t.assigned_step) + 1
            head = LogHeader(
                kind,
                t.uid,
                int(payload.shape[0]) if kind == DELETE else int(data[0].shape[0]),
                step,
                seq,
                int(payload.nbytes),
                psum,
                request_id,
            ).pack()
            e = _Entry(t, kind, seq, step, request_id, head, payload.data, data, reserved)
            self._queue.append(e)
            if request_id:
                self._pending[(t.uid, request_id)] = e
            t.assigned_step = max(t.assigned_step, step)
            return e

    def _reserve(self, t: TableArrays, ids: np.ndarray) -> int:
        """Reserve memory for the rows of `ids` not stored yet (StoreFull past the budget)."""
        offs = np.empty(ids.shape[0], np.int64)
        with t.lock.read():
            new = ids.shape[0] - t.find(ids, offs)
        if not new:
            return 0
        need = new * TableArrays.bytes_per_row(t.spec)
        used = self.memory_bytes() + self._reserved
        budget = self.config.memory_budget()
        if used + need > budget:
            raise StoreFull(
                f"storing {new} more rows of table {t.spec.name!r} needs {need} bytes; this "
                f"shard uses {used} of its {budget}-byte memory budget: add shards, raise "
                "--memory, or drop tables"
            )
        if t.stored + new > t.capacity:
            raise StoreFull(
                f"table {t.spec.name!r} would hold {t.stored + new} rows on this shard, above "
                f"its capacity of {t.capacity}; add shards or raise --memory"
            )
        self._reserved += need
        return need

    def _run(self, e: _Entry) -> None:
        """Commit `e` (with whatever else is queued), then apply it in sequence order."""
        try:
            self._commit(e)
            self._apply_turn(e)
        finally:
            with self._qlock:
                self._reserved -= e.reserved
                if e.request_id:
                    self._pending.pop((e.table.uid, e.request_id), None)
            e.done.set()
        self._maybe_checkpoint()

    def _commit(self, e: _Entry) -> None:
        with self._commit_lock:
            if not e.committed and e.error is None:
                with self._qlock:
                    batch, self._queue = self._queue, []
                try:
                    with self._write() as txn:
                        cur = txn.cursor(db=self._log)
                        for b in batch:
                            cur.put(records.log_key(b.seq, 0), b.header, append=True)
                            cur.put(records.log_key(b.seq, 1), b.payload, append=True)
                            if b.request_id:
                                self._log_request(txn, b)
                        txn.put(b"seq", str(batch[-1].seq).encode(), db=self._meta)
                    for b in batch:
                        b.committed = True
                        self._log_sizes[b.seq] = len(b.payload)
                        self._log_bytes += len(b.payload)
                except BaseException as exc:
                    for b in batch:
                        b.error = exc
                    with self._turn:
                        self._failed.update(b.seq for b in batch)
                        self._turn.notify_all()
        if e.error is not None:
            raise e.error

    def _log_request(self, txn: lmdb.Transaction, e: _Entry) -> None:
        key = struct.pack(">I", e.table.uid) + e.request_id.encode()
        rows = int(e.data[0].shape[0])
        txn.put(key, _REQ.pack(e.seq, e.step, rows), db=self._req)
        txn.put(struct.pack(">Q", e.seq), key, db=self._reqseq)
        excess = txn.stat(self._reqseq)["entries"] - self.config.request_log
        cur = txn.cursor(db=self._reqseq)
        if excess > 0 and cur.first():
            for _ in range(excess):
                txn.delete(cur.value(), db=self._req)
                cur.delete()

    def _skip_failed(self) -> int:
        """Count the entries whose commit failed as applied (they changed nothing) where they are
        next in line; returns the applied sequence. Call with self._turn held."""
        while self._applied_seq + 1 in self._failed:
            self._failed.discard(self._applied_seq + 1)
            self._applied_seq += 1
        return self._applied_seq

    def _apply_turn(self, e: _Entry) -> None:
        with self._turn:
            while self._skip_failed() + 1 != e.seq:
                self._turn.wait()
        try:
            self._apply_data(e.table, e.kind, e.seq, e.step, e.data, None)
        except BaseException:
            # committed but not applied cannot be left behind: the arrays no longer match the
            # log. Applying validated data does not fail; if it does, stop serving writes.
            log.exception("applying log entry %d failed; the shard stops accepting writes", e.seq)
            self.config = _read_only(self.config)
            raise
        finally:
            with self._turn:
                self._applied_seq = max(self._applied_seq, e.seq)
                self._turn.notify_all()

    # ---- applying entries (live and in replay) ----

    @staticmethod
    def _decode(t: TableArrays, kind: int, n: int, payload: bytes | memoryview) -> tuple:
        buf = np.frombuffer(payload, np.uint8)
        if kind == DELETE:
            return (buf.astype(bool),)
        ids = buf[: 8 * n].view("<i8")
        if kind == PUSH:
            return ids, buf[8 * n :].view("<f4").reshape(n, t.spec.dim)
        return ids, buf[8 * n :].reshape(n, t.record_bytes)

    def _apply_data(
        self,
        t: TableArrays,
        kind: int,
        seq: int,
        step: int,
        data: tuple,
        base: np.ndarray | None,
    ) -> None:
        """Apply one entry to `t`. In replay, `base` holds each loaded row's chunk sequence: the
        entry then changes only rows it is newer than (and rows stored since)."""
        if kind == DELETE:
            self._apply_delete(t, seq, data[0], base)
            return
        ids, values = data
        offs = np.empty(ids.shape[0], np.int64)
        with t.lock.read():
            t.find(ids, offs)
        if base is not None:
            keep = (offs < 0) | (base[np.maximum(offs, 0)] < seq)
            if not keep.all():
                ids, values, offs = ids[keep], values[keep], offs[keep]
            if ids.shape[0] == 0:
                return
        new = np.flatnonzero(offs < 0)
        if kind == PUSH and new.shape[0]:
            fresh_rows = self._initial_rows(t.spec, ids[new])
        with t.lock.write():
            if new.shape[0]:
                high = t.high
                offs[new] = t.allocate(ids[new], seq - 1)
                if base is not None:
                    base[offs[new]] = -1
                if kind == PUSH:
                    new_offs = offs[new]
                    kernels.scatter(t.rows, new_offs, fresh_rows)
                    # offsets past the old high-water mark are untouched zero pages: a zero
                    # initial state (all but Adagrad's accumulator value) needs no writing
                    if t.state_floats and _zero_state(t.spec):
                        reused = new_offs[new_offs < high]
                        if reused.shape[0]:
                            t.state[reused] = 0.0
                    elif t.state_floats:
                        kernels.scatter(
                            t.state, new_offs, init.initial_state(t.spec, new_offs.shape[0])
                        )
            t.mark(offs)
            if kind == PUSH:
                self._step_rows(t, offs, ids, values, step)
            else:
                t.rows[offs] = values[:, : t.row_bytes]
                if t.state_floats:
                    t.state[offs] = values[:, t.row_bytes :].view("<f4")
            if base is None:  # replay counts from the stored counters (Shard._replay)
                t.step = max(t.step, step)
                t.pushes += kind == PUSH
                self._applied_seq = max(self._applied_seq, seq)

    def _initial_rows(self, spec: TableConfig, ids: np.ndarray) -> np.ndarray:
        """Initial rows of never-stored ids in the storage dtype; two threads for many (numpy's
        loops release the GIL)."""
        n = ids.shape[0]
        if self._pool is None or n < _SPLIT_ROWS:
            return kernels.encode(init.initial_rows(spec, ids), spec.dtype)
        out = np.empty((n, spec.row_bytes), np.uint8)
        h = n // 2

        def part(a: int, b: int) -> None:
            kernels.encode(init.initial_rows(spec, ids[a:b]), spec.dtype, out[a:b])

        for f in [self._pool.submit(part, 0, h), self._pool.submit(part, h, n)]:
            f.result()
        return out

    def _step_rows(
        self, t: TableArrays, offs: np.ndarray, ids: np.ndarray, grads: np.ndarray, step: int
    ) -> None:
        m = offs.shape[0]
        if self._pool is None or m < _SPLIT_ROWS:
            kernels.optimizer_step(t.spec, t.rows, t.state, offs, ids, grads, step)
            return
        h = m // 2
        parts = ((0, h), (h, m))
        futs = [
            self._pool.submit(
                kernels.optimizer_step,
                t.spec,
                t.rows,
                t.state,
                offs[a:b],
                ids[a:b],
                np.ascontiguousarray(grads[a:b]),
                step,
            )
            for a, b in parts
        ]
        for f in futs:
            f.result()

    def _apply_delete(
        self, t: TableArrays, seq: int, mask: np.ndarray, base: np.ndarray | None
    ) -> None:
        with t.lock.write():
            for lo in range(0, t.high, _SCAN):
                hi = min(lo + _SCAN, t.high)
                ids = t.ids_of[lo:hi]
                live = ids >= 0
                if not live.any():
                    continue
                slots = slot_of(t.spec.name, np.where(live, ids, 0), mask.shape[0])
                sel = live & mask[slots]
                if base is not None:
                    sel &= base[lo:hi] < seq
                if sel.any():
                    offs = np.flatnonzero(sel).astype(np.int64) + lo
                    t.release(t.ids_of[offs].copy(), offs)
            if base is None:
                self._applied_seq = max(self._applied_seq, seq)

    # ---- LMDB ----

    @contextmanager
    def _write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction: committed when the block ends, aborted on any exception (so
        nothing is partly written); a full map or disk raises StoreFull naming it."""
        try:
            with self._env.begin(write=True) as txn:
                yield txn
        except lmdb.MapFullError as e:
            raise StoreFull(
                f"the LMDB map of {self.config.map_size} bytes in {self.config.data_dir} is "
                "full; restart the shard with a larger --map-size (only used pages take disk)"
            ) from e
        except lmdb.DiskError as e:
            raise StoreFull(
                f"writing to {self.config.data_dir} failed ({e}); free disk space there"
            ) from e
        except lmdb.Error as e:
            if "No space" in str(e) or "Input/output" in str(e):
                raise StoreFull(
                    f"writing to {self.config.data_dir} failed ({e}): the disk is full or "
                    "failing; free space there"
                ) from e
            raise

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Hold back new writes and wait until every queued one was applied."""
        with self._qlock:
            self._paused += 1
            target = self._next_seq - 1
        try:
            with self._turn:
                while self._skip_failed() < target and not self._closed:
                    self._turn.wait(0.1)
            yield
        finally:
            with self._qlock:
                self._paused -= 1
                self._unpaused.notify_all()

    # ---- checkpoints ----

    def memory_bytes(self) -> int:
        """RAM the tables' arrays and indexes use."""
        return sum(t.nbytes for t in list(self._tables.values()))

    def _maybe_checkpoint(self) -> None:
        if self._log_bytes >= self._checkpoint_threshold():
            self._wake.set()

    def _checkpoint_threshold(self) -> int:
        c = self.config
        return max(c.checkpoint_min_bytes, int(c.checkpoint_ratio * self.memory_bytes()))

    def _checkpoint_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._log_bytes >= self._checkpoint_threshold():
                try:
                    self.checkpoint()
                except EngramError:
                    log.exception("checkpoint failed; the log keeps every write")

    def checkpoint(self) -> int:
        """Write every changed chunk of every table, then trim the log; returns bytes written.

        Chunks are copied under their table's read lock, one at a time, each as of the applied
        sequence at its copy, so writes go on meanwhile. Unchanged chunks only advance their
        sequence."""
        self._writable()
        written = 0
        with self._ckpt_lock:
            batch: list[tuple[bytes, bytes]] = []
            lsn_updates: dict[int, tuple[TableArrays, dict[int, int]]] = {}
            counters: dict[int, tuple[TableArrays, bytes]] = {}
            for t in list(self._tables.values()):
                upd: dict[int, int] = {}
                lsn_updates[t.uid] = (t, upd)
                for c in range(t.n_chunks_used()):
                    with t.lock.read():
                        if t.dropped:
                            break
                        lsn = self._applied_seq
                        if t.dirty[c]:
                            rng = t.chunk_range(c)
                            batch.append(
                                (
                                    records.chunk_key(t.uid, c),
                                    records.pack_chunk(
                                        t.uid,
                                        c,
                                        lsn,
                                        t.ids_of[rng],
                                        t.rows[rng],
                                        t.state[rng],
                                    ),
                                )
                            )
                            t.dirty[c] = False
                        upd[c] = lsn
                        counters[t.uid] = (t, self._meta_json(t, lsn))
                    if sum(len(v) for _, v in batch) >= _FLUSH_BYTES:
                        written += self._flush(batch, lsn_updates, counters)
                        batch = []
                with t.lock.read():
                    counters[t.uid] = (t, self._meta_json(t, self._applied_seq))
            written += self._flush(batch, lsn_updates, counters)
        _release_free_heap()
        _unmap_file_pages(os.path.join(self.config.data_dir, "data.mdb"))
        return written

    def _flush(
        self,
        batch: list[tuple[bytes, bytes]],
        lsn_updates: dict[int, tuple[TableArrays, dict[int, int]]],
        counters: dict[int, tuple[TableArrays, bytes]],
    ) -> int:
        """One transaction: chunks, per-chunk sequences, counters, and the log trimmed."""
        new_lsns: dict[int, np.ndarray] = {}
        for uid, (t, upd) in lsn_updates.items():
            arr = t.chunk_lsn[: t.n_chunks_used()].copy()
            for c, lsn in upd.items():
                arr[c] = max(arr[c], lsn)
            new_lsns[uid] = arr
        trim = self._trim_point(new_lsns)
        try:
            with self._write() as txn:
                for k, v in batch:
                    txn.put(k, v, db=self._chunks)
                for uid, arr in new_lsns.items():
                    t = lsn_updates[uid][0]
                    if t.dropped:
                        continue
                    txn.put(b"lsn:%d" % uid, records.pack_lsns(arr), db=self._meta)
                    if uid in counters:
                        txn.put(b"table:" + t.spec.name.encode(), counters[uid][1], db=self._meta)
                trimmed = self._trim(txn, trim)
        except BaseException:
            for t, upd in lsn_updates.values():  # those chunks are still to be written
                t.dirty[list(upd)] = True
            raise
        for uid, arr in new_lsns.items():
            t = lsn_updates[uid][0]
            np.maximum(t.chunk_lsn[: arr.shape[0]], arr, out=t.chunk_lsn[: arr.shape[0]])
            lsn_updates[uid][1].clear()
        self._log_bytes -= trimmed
        return sum(len(v) for _, v in batch)

    def _trim_point(self, new_lsns: dict[int, np.ndarray]) -> int:
        """The highest sequence every stored row's chunk has seen."""
        point = self._applied_seq
        for t in list(self._tables.values()):
            arr = new_lsns.get(t.uid)
            if arr is None:
                arr = t.chunk_lsn[: t.n_chunks_used()]
            used = arr[arr != NEVER]
            if used.shape[0]:
                point = min(point, int(used.min()))
        return point

    def _trim(self, txn: lmdb.Transaction, upto: int) -> int:
        cur = txn.cursor(db=self._log)
        trimmed = 0
        ok = cur.first()
        while ok and cur.key():  # after deleting the last entry the cursor has no key
            seq, _part = records.key_seq(bytes(cur.key()))
            if seq > upto:
                break
            trimmed += self._log_sizes.pop(seq, 0)
            ok = cur.delete()
        return trimmed

    # ---- shard state and resharding ----

    def shard_state(self) -> ShardStateInfo:
        """Slots this shard owns and slots frozen for moving."""
        return self._state

    def set_shard_state(self, state: ShardStateInfo) -> ShardStateInfo:
        """Replace (and persist) the ownership state once every write before it was applied."""
        for name in ("owned", "frozen"):
            v = getattr(state, name)
            if v and len(v) != state.num_slots:
                raise InvalidArgument(
                    f"shard state {name} has {len(v)} bytes; send num_slots="
                    f"{state.num_slots} bytes, or none"
                )
        if state.num_slots < 0 or state.shard_index < 0 or state.map_version < 0:
            raise InvalidArgument(
                f"shard state num_slots={state.num_slots}, shard_index={state.shard_index}, "
                f"map_version={state.map_version} must all be >= 0"
            )
        if (state.owned or state.frozen) and state.num_slots <= 0:
            raise InvalidArgument("shard state with owned/frozen slots needs num_slots > 0")
        if state.shard_map_json:
            try:
                ShardMap.from_json(state.shard_map_json)
            except ConfigError as e:
                raise InvalidArgument(f"shard state's {e}; send the map's to_json()") from None
        with self._quiet():
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
        batches of at most `batch_rows`, ids ascending. Each batch is read at one applied
        version; rows of frozen slots (a reshard move) do not change between batches."""
        t = self._get(table)
        mask = self._slot_mask(slot_mask)
        if batch_rows <= 0:
            raise InvalidArgument(f"batch_rows={batch_rows} must be > 0")
        return self._export(t, mask, batch_rows)

    def _export(
        self, t: TableArrays, mask: np.ndarray, batch_rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        # the stored ids of the masked slots, ascending (the order exports merge in)
        parts = []
        with t.lock.read():
            high = t.high
        for lo in range(0, high, _SCAN):
            with t.lock.read():
                ids = t.ids_of[lo : min(lo + _SCAN, t.high)].copy()
            live = ids >= 0
            slots = slot_of(t.spec.name, np.where(live, ids, 0), mask.shape[0])
            parts.append(ids[live & mask[slots]])
        wanted = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        offs = np.empty(batch_rows, np.int64)
        for b in range(0, wanted.shape[0], batch_rows):
            ids = wanted[b : b + batch_rows]
            with t.lock.read():
                if t.dropped:
                    raise TableNotFound(f"table {t.spec.name!r} was dropped during the export")
                o = offs[: ids.shape[0]]
                t.find(ids, o)
                here = o >= 0  # a row deleted since the scan is left out
                if not here.all():
                    ids, o = ids[here], o[here]
                rec = np.empty((ids.shape[0], t.record_bytes), np.uint8)
                rec[:, : t.row_bytes] = t.rows[o]
                if t.state_floats:
                    rec[:, t.row_bytes :] = t.state[o].view(np.uint8)
                step = t.step
            if ids.shape[0]:
                yield ids, rec, step

    # ---- snapshots ----

    def snapshot(self, path: str) -> list[TableStats]:
        """Copy the environment, compacted, into the existing empty directory `path` and return
        every table's stats as copied. Writes pause only while the copy's read transaction
        starts; the copy holds the checkpoint and the log up to that point."""
        with self._quiet():
            stats = [self._stats(self._tables[n]) for n in sorted(self._tables)]
            txn = self._env.begin()
        try:
            self._env.copy(path, compact=True, txn=txn)
        finally:
            txn.abort()
        return stats

    # ---- stats ----

    def stats(self) -> dict:
        """stored_rows, stored_bytes, map_size_bytes, used_bytes (LMDB), memory_bytes (RAM
        arrays + indexes), log_bytes (kept log payload) over all tables."""
        info, st = self._env.info(), self._env.stat()
        tables = list(self._tables.values())
        return {
            "stored_rows": sum(t.stored for t in tables),
            "stored_bytes": sum(t.stored * t.record_bytes for t in tables),
            "map_size_bytes": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * st["psize"],
            "memory_bytes": self.memory_bytes(),
            "memory_budget_bytes": self.config.memory_budget(),
            "log_bytes": self._log_bytes,
            "cache_rows": sum(t.stored for t in tables),
        }


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_trim()


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps a push's freed temporaries in every
    thread's arena: hundreds of MB of RSS that hold no rows)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_MADV_DONTNEED = 4  # Linux


def _unmap_file_pages(path: str) -> None:
    """Drop this process's page-table entries of the LMDB map of `path` (MADV_DONTNEED).

    LMDB reads through a shared read-only map, and the kernel maps the page-cache pages around
    every read fault (fault-around), so each commit leaves ~64 KB of just-written log pages in
    the process's RSS. They are clean page cache, not memory the shard holds: dropping the
    entries changes nothing for a reader (its next touch maps the same page again)."""
    if not sys.platform.startswith("linux"):
        return
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            spans = [line.split()[0] for line in f if line.rstrip().endswith(" " + target)]
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return
    for span in spans:
        lo, hi = (int(x, 16) for x in span.split("-"))
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _zero_state(spec: TableConfig) -> bool:
    """Whether never-stored rows start with an all-zero optimizer state."""
    o = spec.optimizer
    return not (o.kind in ("adagrad", "rowwise_adagrad") and o.initial_accumulator_value)


def _read_only(config: ShardConfig) -> ShardConfig:
    return dataclasses.replace(config, read_only=True)
