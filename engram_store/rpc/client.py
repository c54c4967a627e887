"""StoreClient: read and train memory tables held by one or many shard servers.

    with StoreClient("127.0.0.1:7000") as c:            # finds the other shards from this one
        rows = c.lookup("engram_l1", ids)                 # float32 (*ids.shape, dim)
        bits = c.lookup("engram_l1", uniq, "bfloat16", unique=True, raw=True, view=True)
        c.push("engram_l1", ids, grads)                   # applied exactly once, even if retried

A lookup deduplicates ids (unless the caller says they are unique), routes each to its shard with
the ShardMap, sends one request per shard (chunked by max_batch_rows, and split into sub-requests
of about split_bytes that are in flight together when the answer is large) in parallel and
reassembles rows in request order, in the wire dtype asked for. Failures arrive as the errors.py
class the server raised (status.py). ShardUnavailable (and its subclasses: timeouts, slots moving,
a snapshot in progress) is retried with exponential backoff, and WrongShard (our shard map is
stale) after refreshing the map, as retry.py's policy says; every other error is raised as it is.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from engram_store.engine.config import DTYPES, FP8_BLOCK, TableConfig, row_bytes
from engram_store.engine.errors import EngramError, InvalidArgument, ShardUnavailable, WrongShard
from engram_store.engine.index import distinct
from engram_store.engine.routing import ShardMap
from engram_store.engine.types import PushResult, TableStats
from engram_store.rpc import wire
from engram_store.rpc.auth import open_channel
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc
from engram_store.rpc.retry import RetryPolicy, stale_map
from engram_store.rpc.status import error_from_rpc

# the core's result classes: a caller gets the same types from a local Shard and from the store
TableInfo = TableStats  # a table across all shards: rows/bytes/pushes summed, step the max

#: a lookup whose answer is larger than this many bytes is split into sub-requests of about
#: this size, SPLIT_INFLIGHT of them in flight at once: an answer of any size then stays under the
#: message limit, its parts are gathered and sent overlapping, and every message stays below
#: glibc's 32 MiB mmap threshold, so both ends reuse freed buffers (a 48 MiB message faults in
#: 12,288 fresh pages per call). A smaller answer is cheaper as one request, a view of the
#: message: on a loaded 2-core machine a 16 MiB answer took 0.77-0.83x the time of a raw reply
#: whole, 0.52-0.68x in 4 MiB parts copied into one array (bench_lookup)
SPLIT_BYTES = 16 << 20
SPLIT_INFLIGHT = 4


def _coalesce(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids with their gradient rows summed (as the shard sums them), or the arrays
    unchanged when the ids are already distinct (the common case: no copy of the gradients).
    One hashing pass (the engine's), no sort."""
    return distinct(np.ascontiguousarray(ids, np.int64), grads)


def _contiguous(pos: np.ndarray) -> bool:
    """Whether ascending positions `pos` are one range (every part of a one-shard lookup)."""
    return len(pos) > 0 and int(pos[-1]) - int(pos[0]) + 1 == len(pos)


def _take(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """a[pos] for ascending positions: a view when they are one range, else a gather."""
    return a[pos[0] : pos[-1] + 1] if _contiguous(pos) else a[pos]


class _Rows:
    """The rows of one lookup, from the answers of its requests (parts: positions into the
    lookup's ids per request): float32, or as they travel with `raw`."""

    def __init__(self, n: int, parts: list[tuple[int, np.ndarray]], dtype: str, raw: bool) -> None:
        self.n, self.parts, self.dtype, self.raw = n, parts, dtype, raw
        self.dim = 0
        self.rows: np.ndarray | None = None  # (n, width), filled by put()

    def _decode(self, response: bytes, expect: int) -> np.ndarray:
        rows, dim, dtype = wire.decode_lookup_response(response)
        if dtype != self.dtype or len(rows) != expect:
            raise InvalidArgument(
                f"the shard answered {len(rows)} rows of {dtype} for {expect} ids of "
                f"{self.dtype}; the shard and this client disagree on the wire format"
            )
        self.dim = dim
        return rows if self.raw else wire.wire_to_float32(rows, dtype, dim)

    def one(self, response: bytes) -> np.ndarray:
        """The rows of a lookup answered by one request: a view of `response` where no
        conversion is asked."""
        return self._decode(response, self.n)

    def put(self, i: int, response: bytes) -> None:
        """Copy the answer of request i into place (fanout's `each`: the response is freed)."""
        pos = self.parts[i][1]
        rows = self._decode(response, len(pos))
        if self.rows is None:
            self.rows = np.empty((self.n, rows.shape[1]), rows.dtype)
        if _contiguous(pos):
            self.rows[pos[0] : pos[-1] + 1] = rows
        else:
            self.rows[pos] = rows


class _Stub(store_pb2_grpc.MemoryStoreStub):
    """MemoryStoreStub plus LookupRaw and PushRaw, which skip protobuf's copies of the large
    messages (wire.py): LookupRaw answers serialized bytes, PushRaw sends them."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.LookupRaw = channel.unary_unary(
            "/engram.v1.MemoryStore/Lookup", request_serializer=pb.LookupRequest.SerializeToString
        )
        self.PushRaw = channel.unary_unary(  # requests from wire.encode_push_request
            "/engram.v1.MemoryStore/PushGradients",
            response_deserializer=pb.PushGradientsResponse.FromString,
        )


class StoreClient:
    """Client of a sharded memory store (docs/design.md "Client")."""

    def __init__(
        self,
        target: ShardMap | str | list[str] | tuple[str, ...],
        config: ClientConfig = ClientConfig(),
        map_provider: Callable[[], ShardMap] | None = None,
        split_bytes: int = SPLIT_BYTES,
        split_inflight: int = SPLIT_INFLIGHT,
    ):
        """`target`: a ShardMap, one shard's "host:port" (the map is discovered from it), or a
        list of addresses (their map if they publish one, else ShardMap.balanced over them).
        `map_provider` returns the current map when a shard says ours is stale. A lookup of a
        table whose dim this client knows and whose answer exceeds `split_bytes` is sent as
        sub-requests of about that size, `split_inflight` in flight at once (0: never split)."""
        config.validate()
        if split_bytes < 0 or split_inflight < 1:
            raise InvalidArgument(
                f"split_bytes={split_bytes} must be >= 0 (0: never split) and "
                f"split_inflight={split_inflight} >= 1"
            )
        self.config = config
        self.split_bytes = split_bytes
        self.split_inflight = split_inflight
        self._retry = RetryPolicy.of(config)
        self._map_provider = map_provider
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[grpc.Channel, _Stub]] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=config.threads, thread_name_prefix="engram-client"
        )
        self._dims: dict[str, int] = {}
        self._steps: dict[str, int] = {}  # highest step this client saw applied, per table
        # gradients travel in the wire dtype, but never as fp8 (wire.GRAD_DTYPES)
        self._grad_dtype = config.wire_dtype if config.wire_dtype in wire.GRAD_DTYPES else "float32"
        if isinstance(target, ShardMap):
            self._map = target
        else:
            addresses = [target] if isinstance(target, str) else list(target)
            if not addresses:
                raise InvalidArgument("StoreClient needs at least one shard address")
            published = self._published_map(addresses[:1])
            if published is not None:
                self._map = published
            elif len(addresses) == 1:
                self._map = ShardMap.single(addresses[0])
            else:
                self._map = ShardMap.balanced(addresses)

    # ---- plumbing ----

    @property
    def shard_map(self) -> ShardMap:
        """The shard map requests are routed with now."""
        return self._map

    def _stub(self, address: str) -> _Stub:
        with self._lock:
            entry = self._stubs.get(address)
            if entry is None:
                opts = [
                    ("grpc.max_send_message_length", self.config.max_message_bytes),
                    ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ]
                channel = open_channel(address, self.config, opts)  # TLS, token (auth.py)
                entry = self._stubs[address] = (channel, _Stub(channel))
            return entry[1]

    def _call(
        self, address: str, method: str, request: object, first: grpc.Future | None = None
    ) -> Any:
        """One RPC, retried by the retry policy; `first` is an attempt already in flight.

        Raises the class the shard raised: WrongShard when our map is outdated (also when the
        shard stays unreachable and map_provider knows a newer map), ShardUnavailable (or its
        subclass) once the retries are spent.
        """
        rpc = getattr(self._stub(address), method)
        pending = [first] if first is not None else []

        def once() -> Any:
            if pending:
                return pending.pop().result()
            return rpc(request, timeout=self.config.timeout_s)

        try:
            return self._retry.call(once)
        except ShardUnavailable as e:
            if self._provider_has_newer_map():
                # the shard may have been removed or moved while we were idle
                raise WrongShard(f"shard {address} unreachable; the shard map changed") from None
            c = self.config
            spent = (
                f"{c.retries} retries"
                if c.retries is not None
                else f"retrying for {c.retry_budget_s:g} s (ClientConfig.retry_budget_s)"
            )
            raise type(e)(f"shard {address} failed after {spent}: {e.code}: {e}") from None

    def _provider_has_newer_map(self) -> bool:
        """Whether map_provider knows a newer map than ours (False without a provider)."""
        if self._map_provider is None:
            return False
        try:
            return self._map_provider().version > self._map.version
        except Exception:  # the provider itself may be down; the original error is clearer
            return False

    def _fanout(
        self,
        calls: Sequence[tuple[str, str, object]],
        window: int = 0,
        each: Callable[[int, Any], Any] | None = None,
    ) -> list[Any]:
        """Send (address, method, request) calls in parallel, at most `window` in flight at once
        (0: all); responses in the same order, or what `each(i, response)` made of each one as
        it arrived (so that a large answer can be consumed and freed early).

        A call refused for a stale map gives its WrongShard error in place of a response, so a
        caller can resend just the parts that were rejected; any other error is raised once
        every call has ended.
        """
        n = len(calls)
        window = min(window or n, n)

        def start(i: int) -> grpc.Future:
            address, method, request = calls[i]
            return getattr(self._stub(address), method).future(
                request, timeout=self.config.timeout_s
            )

        # one call blocks in this thread: grpc's future path adds a thread hand-off
        inflight = {i: start(i) for i in range(window)} if n > 1 else {}
        out: list[Any] = []
        error: EngramError | None = None
        for i, (address, method, request) in enumerate(calls):
            try:
                response = self._call(address, method, request, first=inflight.pop(i, None))
            except EngramError as e:
                if stale_map(e):
                    out.append(e)
                    continue
                error = error or e
                out.append(None)
                continue
            finally:
                if n > 1 and i + window < n:
                    inflight[i + window] = start(i + window)
            out.append(each(i, response) if each is not None and error is None else response)
        if error is not None:
            raise error
        return out

    def _published_map(self, addresses) -> ShardMap | None:
        """The map that a shard of `addresses` publishes in its ShardState, if any."""
        last: EngramError | None = None
        for address in addresses:
            try:
                st = self._call(address, "Stats", pb.StatsRequest())
            except EngramError as e:
                last = e
                continue
            if st.shard.shard_map_json:
                return ShardMap.from_json(st.shard.shard_map_json)
            return None
        raise last or ShardUnavailable("no shard address to ask for the shard map")

    def refresh_map(self) -> ShardMap:
        """Fetch the current shard map (map_provider, else any shard's Stats) and use it."""
        new = (
            self._map_provider() if self._map_provider else self._published_map(self._map.addresses)
        )
        if new is not None and new.version >= self._map.version:
            self._map = new
        return self._map

    def _route(
        self, m: ShardMap, table: str, ids: np.ndarray, chunk_rows: int = 0
    ) -> list[tuple[int, np.ndarray]]:
        """(shard, positions into ids) per request: grouped by shard, chunked by max_batch_rows
        (or `chunk_rows` when smaller)."""
        if m.num_shards == 1 or len(ids) == 0:  # an empty lookup still learns dim from shard 0
            groups = [(0, np.arange(len(ids)))]
        else:
            shard = m.shard_of(table, ids)
            order = np.argsort(shard, kind="stable")
            bounds = np.searchsorted(shard[order], np.arange(m.num_shards + 1))
            groups = [
                (s, order[bounds[s] : bounds[s + 1]])
                for s in range(m.num_shards)
                if bounds[s + 1] > bounds[s]
            ]
        step = min(self.config.max_batch_rows, chunk_rows or self.config.max_batch_rows)
        return [
            (s, pos[i : i + step]) for s, pos in groups for i in range(0, max(len(pos), 1), step)
        ]

    # ---- rows ----

    @staticmethod
    def _check_ids(ids) -> np.ndarray:
        ids = np.asarray(ids)
        if not (np.issubdtype(ids.dtype, np.integer) or (ids.size == 0 and ids.dtype == float)):
            raise InvalidArgument(
                f"ids must be an integer array, got dtype {ids.dtype}; pass row ids as int64"
            )
        return ids.astype(np.int64, copy=False)

    def lookup(
        self,
        table: str,
        ids,
        dtype: str | None = None,
        *,
        unique: bool = False,
        raw: bool = False,
        view: bool = False,
    ) -> np.ndarray:
        """Rows of `table` for integer `ids` of any shape, sent in wire dtype `dtype` (default
        ClientConfig.wire_dtype; the table's storage dtype costs the server no conversion).

        Returns float32 (*ids.shape, dim); with `raw`, the rows as they travel
        (wire.wire_numpy_dtype: bfloat16 as uint16 bits, float8_e4m3 as uint8 codes then scales,
        (*ids.shape, dim + dim / 32); wire.wire_to_float32 decodes them). `unique`: the caller
        knows the ids are distinct, so no sort looks for duplicates (duplicates are still
        answered right, only sent twice). The result is the caller's to write, unless `view`:
        then, where one request answered the lookup in the returned dtype, it is a read-only
        view of the received message (no copy).
        """
        if dtype is None:
            dtype = self.config.wire_dtype
        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype {dtype!r} is unknown; use one of {DTYPES}")
        ids = self._check_ids(ids)
        flat = ids.reshape(-1)
        uniq, inverse = flat, None
        if not unique:
            srt = np.sort(flat)
            if srt.shape[0] >= 2 and not bool(np.all(srt[1:] != srt[:-1])):
                uniq, inverse = np.unique(flat, return_inverse=True)
        chunk = self._split_rows(table, len(uniq), dtype)
        attempts = self._retry.start()
        while True:
            m = self._map
            parts = self._route(m, table, uniq, chunk)
            calls = [
                (
                    m.addresses[s],
                    "LookupRaw",
                    pb.LookupRequest(
                        table=table,
                        ids=wire.pack_ids(_take(uniq, pos)),
                        dtype=wire.DTYPE_TO_PB[dtype],
                        map_version=m.version,
                    ),
                )
                for s, pos in parts
            ]
            rows = _Rows(len(uniq), parts, dtype, raw)
            # one request: its answer stays as received; several: each is copied into place
            responses = self._fanout(
                calls, self.split_inflight if chunk else 0, rows.put if len(calls) > 1 else None
            )
            stale = [r for r in responses if stale_map(r)]
            if not stale:
                break
            if not attempts.can_retry():
                raise stale[0]
            self.refresh_map()
            attempts.backoff()
        out = rows.one(responses[0]) if len(calls) == 1 else rows.rows
        assert out is not None  # every request answered (put() filled rows)
        self._dims[table] = rows.dim
        if inverse is not None:
            out = out[inverse]
        elif not view and not out.flags.writeable:
            out = out.copy()  # callers own the result (a view would pin the response)
        return out.reshape(*ids.shape, out.shape[1])

    def _split_rows(self, table: str, n: int, dtype: str) -> int:
        """Rows per sub-request of an n-row lookup, or 0 to leave it whole (small, or a table
        whose dim this client does not know yet: the answer tells it)."""
        dim = self._dims.get(table)
        if not dim or not self.split_bytes:
            return 0
        if dtype == "float8_e4m3" and dim % FP8_BLOCK:
            return 0  # the shard refuses it with the reason
        size = n * row_bytes(dtype, dim)
        if size <= self.split_bytes:
            return 0
        parts = -(-size // self.split_bytes)
        return -(-n // parts)

    def _last_step(self, table: str) -> int:
        if table not in self._steps:
            self._steps[table] = self.table_info(table).step
        return self._steps[table]

    def _dim(self, table: str) -> int:
        if table not in self._dims:
            self._dims[table] = self.table_info(table).spec.dim
        return self._dims[table]

    def push(
        self, table: str, ids, grads, step: int = 0, request_id: str | None = None
    ) -> PushResult:
        """Apply gradients (summed over duplicate ids) with the table's optimizer, exactly once.

        `grads`: float (len(ids), dim) or (*ids.shape, dim). `step` (1-based, Adam bias
        correction) 0 = the table's step + 1; a push that spans several shards or chunks then
        uses the highest step this client has seen + 1, so every part gets the same step (with
        several clients pushing to one table, pass `step` explicitly). Returns when every shard
        has committed its part.
        """
        ids = self._check_ids(ids).reshape(-1)
        grads = np.asarray(grads)
        if not np.issubdtype(grads.dtype, np.floating):
            raise InvalidArgument(f"grads must be a float array, got dtype {grads.dtype}")
        dim = self._dim(table)
        if grads.size != len(ids) * dim or grads.shape[-1:] != (dim,):
            raise InvalidArgument(
                f"grads have shape {grads.shape}; table {table!r} needs "
                f"({len(ids)}, {dim}): one row of dim {dim} per id"
            )
        grads = grads.reshape(len(ids), dim).astype(np.float32, copy=False)
        ids, grads = _coalesce(ids, grads)
        rid = request_id or uuid.uuid4().hex
        total, all_dup, applied_step = 0, True, 0
        attempts = self._retry.start()
        while True:
            attempt, m = attempts.number, self._map
            parts = self._route(m, table, ids)
            if step == 0 and len(parts) > 1:
                # "table step + 1" would differ between shards and chunks; fix one step for all
                step = self._last_step(table) + 1
            per_shard: dict[int, int] = {}
            calls = []
            for s, pos in parts:
                # one id per sub-request, kept across transient retries; a new routing after a
                # stale-map refresh sends rows the old owner rejected, under a fresh id. `~n`
                # (parts of this push) lets a snapshot tell a half-applied push (snapshot.py)
                k = per_shard[s] = per_shard.get(s, -1) + 1
                sub = (
                    f"{rid}/{s}"
                    + (f".{k}" if k else "")
                    + (f"@{m.version}" if attempt else f"~{len(parts)}")
                )
                part = slice(None) if len(parts) == 1 else pos  # one part: no gather copy
                calls.append(
                    (
                        m.addresses[s],
                        "PushRaw",
                        wire.encode_push_request(
                            table,
                            ids[part],
                            grads[part],
                            self._grad_dtype,
                            sub,
                            step,
                            m.version,
                        ),
                    )
                )
            responses = self._fanout(calls)
            stale: list[np.ndarray] = []
            refused: list[WrongShard] = []
            for (_, pos), r in zip(parts, responses, strict=True):
                if stale_map(r):
                    stale.append(pos)
                    refused.append(r)
                    continue
                total += r.rows_updated
                all_dup &= r.duplicate
                applied_step = max(applied_step, r.step)
            self._steps[table] = max(self._steps.get(table, 0), applied_step)
            if not stale:
                return PushResult(rows_updated=total, duplicate=all_dup, step=applied_step)
            if not attempts.can_retry():
                raise refused[0]
            pos = np.concatenate(stale)
            ids, grads = ids[pos], grads[pos]
            self.refresh_map()
            attempts.backoff()

    def lookup_async(self, table: str, ids, dtype: str | None = None, **kw: bool) -> Future:
        """lookup() on a client thread (keywords as lookup's); the Future's result is the rows."""
        return self._pool.submit(self.lookup, table, ids, dtype, **kw)

    def push_async(
        self, table: str, ids, grads, step: int = 0, request_id: str | None = None
    ) -> Future:
        """push() on a client thread; the Future's result is the PushResult."""
        return self._pool.submit(self.push, table, ids, grads, step, request_id)

    # ---- tables (every shard holds every table's spec) ----

    def _all(self, method: str, request) -> list:
        responses = self._fanout([(a, method, request) for a in self._map.addresses])
        for r in responses:
            if stale_map(r):
                raise r
        return responses

    @staticmethod
    def _merge(infos: list[pb.TableInfo]) -> TableInfo:
        return TableInfo(
            spec=wire.spec_from_pb(infos[0].spec),
            stored_rows=sum(i.stored_rows for i in infos),
            stored_bytes=sum(i.stored_bytes for i in infos),
            step=max(i.step for i in infos),
            pushes=sum(i.pushes for i in infos),
        )

    def create_table(self, spec: TableConfig) -> TableInfo:
        """Create `spec` on every shard (idempotent for an identical spec; ALREADY_EXISTS if not)."""
        spec.validate()
        responses = self._all("CreateTable", pb.CreateTableRequest(spec=wire.spec_to_pb(spec)))
        self._dims[spec.name] = spec.dim
        return self._merge([r.table for r in responses])

    def drop_table(self, name: str) -> bool:
        """Drop a table on every shard; True if any shard held it."""
        self._dims.pop(name, None)
        self._steps.pop(name, None)
        return any(r.dropped for r in self._all("DropTable", pb.DropTableRequest(name=name)))

    def table_info(self, name: str) -> TableInfo:
        """The table's spec with stored rows/bytes and pushes summed over shards."""
        return self._merge(self._all("GetTable", pb.GetTableRequest(name=name)))

    def list_tables(self) -> list[TableInfo]:
        """Every table of the store (as table_info would describe it), by name."""
        by_name: dict[str, list[pb.TableInfo]] = {}
        for r in self._all("ListTables", pb.ListTablesRequest()):
            for t in r.tables:
                by_name.setdefault(t.spec.name, []).append(t)
        return [self._merge(v) for _, v in sorted(by_name.items())]

    def stats(self) -> list[dict]:
        """Each shard's Stats as a plain dict (JSON-friendly), in shard order."""
        responses = self._all("Stats", pb.StatsRequest())
        return [
            dict(stats_dict(r), address=a)
            for a, r in zip(self._map.addresses, responses, strict=True)
        ]

    def close(self) -> None:
        """Close channels and the futures pool."""
        self._pool.shutdown(wait=False)
        with self._lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stats_dict(r: pb.StatsResponse) -> dict:
    """A StatsResponse as a JSON-friendly dict (slot masks summarised as counts)."""
    st = r.shard
    owned = sum(st.owned) if st.owned else st.num_slots
    return {
        "stored_rows": r.stored_rows,
        "stored_bytes": r.stored_bytes,
        "map_size_bytes": r.map_size_bytes,
        "used_bytes": r.used_bytes,
        "cache_rows": r.cache_rows,
        "uptime_s": round(r.uptime_s, 3),
        "shard": {
            "shard_index": st.shard_index,
            "map_version": st.map_version,
            "num_slots": st.num_slots,
            "owned_slots": owned,
            "frozen_slots": sum(st.frozen),
            "layout": st.layout,
            "standalone": not st.owned,
        },
        "methods": [
            {
                "method": m.method,
                "requests": m.requests,
                "errors": m.errors,
                "rows": m.rows,
                "bytes": m.bytes,
                "p50_ms": round(m.p50_ms, 3),
                "p99_ms": round(m.p99_ms, 3),
            }
            for m in r.methods
        ],
        "tables": [
            {
                "name": t.spec.name,
                "num_rows": t.spec.num_rows,
                "dim": t.spec.dim,
                "stored_rows": t.stored_rows,
                "stored_bytes": t.stored_bytes,
                "step": t.step,
                "pushes": t.pushes,
            }
            for t in r.tables
        ],
    }


def probe_shard(
    address: str, config: ClientConfig = ClientConfig(), timeout_s: float = 3.0
) -> bool:
    """Whether a shard of this store answers at "host:port": one Stats call, no retries.

    True: a shard answered. False: something answered that is no shard (e.g. a Ray GCS, which
    does not implement engram.v1). Raises ShardUnavailable when nothing answers, and the shard's
    own error when it refuses us (Unauthenticated, ReadOnly): it is a shard that wants a token.
    """
    channel = open_channel(address, config)
    try:
        store_pb2_grpc.MemoryStoreStub(channel).Stats(pb.StatsRequest(), timeout=timeout_s)
    except grpc.RpcError as e:
        err = error_from_rpc(e, f"shard {address}")
        if isinstance(err, ShardUnavailable) or e.code() in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            raise err from None
        return False
    finally:
        channel.close()
    return True
