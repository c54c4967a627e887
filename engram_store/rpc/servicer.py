"""MemoryStoreServicer: the gRPC face of one shard. Each method decodes its request, makes one
call on the engine's Shard and encodes the answer; errors travel as their gRPC status and class
name (status.py)."""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from engram_store.engine.config import FP8_BLOCK, ShardConfig, row_bytes
from engram_store.engine.errors import BatchTooLarge, InvalidArgument, ReadOnly
from engram_store.engine.shard import Shard
from engram_store.rpc import wire
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.status import abort

log = logging.getLogger(__name__)

SERVICE = "engram.v1.MemoryStore"
_LATENCY_RING = 4096  # recent latencies kept per method for p50/p99
MAX_RESPONSE_BYTES = 512 << 20  # ServerConfig.max_message_bytes' default
MAX_IMPORT_BYTES = 1 << 30  # ServerConfig.max_import_bytes' default
_MAX_STEP = 1 << 62  # the engine's bound on steps (Shard refuses [2**62, ...) and negatives)

# A Lookup answer is built in a bytes object of its own, filled in place before anyone else sees
# it: PyBytes_FromStringAndSize(NULL, n) is CPython's way to make a bytes object to be filled.
# grpc sends only `bytes` and copies them once into its own buffer; building the answer in a
# reused per-thread buffer and copying that into bytes costs one more pass over the answer (16 MiB
# for 65,536 rows x 64 float32; measured in bench_lookup's setting: 13-15 against 16-17.5 ms of
# server CPU per lookup, and more memory). Freed answers are reused by malloc, not faulted in anew.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)


def bytes_to_fill(size: int) -> tuple[bytes, np.ndarray]:
    """A new bytes object of `size` uninitialised bytes and a writable uint8 view of them.

    Fill the view, drop it, then hand out the bytes; never write after that (bytes are
    immutable to everyone else)."""
    out = _new_bytes(None, size)
    address = ctypes.cast(ctypes.c_char_p(out), ctypes.c_void_p).value
    assert address is not None  # the buffer of a bytes object, never NULL
    view = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address))
    return out, view


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the servicer can say so."""

    def __init__(self, cls: type[Message], err: Exception):
        self.message = (
            f"request is not a valid {cls.DESCRIPTOR.full_name} ({err}); send a "
            "serialized message of that type"
        )


class _MethodStats:
    """Counters and a bounded ring of recent latencies (seconds) of one RPC method."""

    def __init__(self) -> None:
        self.requests = self.errors = self.rows = self.bytes = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_RING)


def _rpc(fn: Callable) -> Callable:
    """Wrap a servicer method: reject malformed requests, map errors to statuses, record stats.

    The wrapped method returns (response, rows, bytes) so that stats need no second pass.
    """
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: MemoryStoreServicer, request, context: grpc.ServicerContext):
        t0 = time.perf_counter()
        response, rows, nbytes = None, 0, 0
        failed: Exception | None = None
        try:
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.message)
            response, rows, nbytes = fn(self, request, context)
        except grpc.RpcError:  # the call was cancelled (by its caller or CallLimits)
            self._record(name, t0, rows, nbytes, True)
            raise
        except Exception as e:  # every failure becomes a status; the server keeps serving
            failed = e
        self._record(name, t0, rows, nbytes, failed is not None)
        if failed is not None:
            abort(context, failed)
        return response

    return wrapper


class MemoryStoreServicer:
    """engram.v1.MemoryStore over one storage.Shard: decode, one Shard call, encode."""

    def __init__(
        self,
        shard: Shard,
        config: ShardConfig,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_import_bytes: int = MAX_IMPORT_BYTES,
    ):
        """`max_response_bytes`: the largest Lookup answer built (the server's message limit:
        a larger one is refused before its rows are gathered). `max_import_bytes`: the most
        record bytes one ImportRows stream may stage."""
        self.shard = shard
        self.config = config
        self.max_response_bytes = max_response_bytes
        self.max_import_bytes = max_import_bytes
        self.started = time.time()
        self._stats: dict[str, _MethodStats] = collections.defaultdict(_MethodStats)
        self._lock = threading.Lock()

    # ---- helpers ----

    def _record(self, name: str, t0: float, rows: int, nbytes: int, error: bool) -> None:
        with self._lock:
            s = self._stats[name]
            s.requests += 1
            s.errors += int(error)
            s.rows += rows
            s.bytes += nbytes
            s.latencies.append(time.perf_counter() - t0)

    def _writable(self) -> None:
        if self.config.read_only:
            raise ReadOnly(
                "this shard was started with --read-only; send writes to a writable "
                "shard or restart it without --read-only"
            )

    def _ids(self, buf: bytes) -> np.ndarray:
        if len(buf) // 8 > self.config.max_batch_rows:
            raise BatchTooLarge(
                f"{len(buf) // 8} ids exceed this shard's limit of {self.config.max_batch_rows} "
                "per request; split the batch (ClientConfig.max_batch_rows) or raise "
                "--max-batch-rows"
            )
        return wire.unpack_ids(buf)

    def method_stats(self) -> list[pb.MethodStats]:
        """Per-method counters with p50/p99 latency over the recent ring."""
        out = []
        with self._lock:
            for name, s in sorted(self._stats.items()):
                lat = np.asarray(s.latencies) * 1e3
                p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (0.0, 0.0)
                out.append(
                    pb.MethodStats(
                        method=name,
                        requests=s.requests,
                        errors=s.errors,
                        rows=s.rows,
                        bytes=s.bytes,
                        p50_ms=p50,
                        p99_ms=p99,
                    )
                )
        return out

    # ---- tables ----

    @_rpc
    def CreateTable(self, request: pb.CreateTableRequest, context):
        self._writable()
        stats, created = self.shard.create_table(wire.spec_from_pb(request.spec))
        return pb.CreateTableResponse(table=wire.info_to_pb(stats), created=created), 0, 0

    @_rpc
    def GetTable(self, request: pb.GetTableRequest, context):
        return wire.info_to_pb(self.shard.table_stats(request.name)), 0, 0

    @_rpc
    def ListTables(self, request: pb.ListTablesRequest, context):
        infos = [wire.info_to_pb(self.shard.table_stats(t.name)) for t in self.shard.tables()]
        return pb.ListTablesResponse(tables=infos), 0, 0

    @_rpc
    def DropTable(self, request: pb.DropTableRequest, context):
        self._writable()
        return pb.DropTableResponse(dropped=self.shard.drop_table(request.name)), 0, 0

    # ---- rows ----

    @_rpc
    def Lookup(self, request: pb.LookupRequest, context):
        """Gather the rows straight into the serialized LookupResponse that grpc sends (no
        protobuf message, no per-row objects, no copy of the answer): frame prefix, the rows
        from one Shard.lookup_into, frame suffix."""
        dtype = wire.dtype_name(request.dtype)
        ids = self._ids(request.ids)
        n, dim = len(ids), self.shard.table(request.table).dim
        rb = row_bytes(dtype, dim)
        if dtype == "float8_e4m3" and dim % FP8_BLOCK:
            raise InvalidArgument(
                f"table {request.table!r} has dim {dim}, not a multiple of {FP8_BLOCK}: its rows "
                f"cannot travel as FLOAT8_E4M3 (one scale per {FP8_BLOCK} values); ask for FLOAT32 "
                "or BFLOAT16"
            )
        prefix, suffix = wire.lookup_response_frame(n, dim, dtype)
        total = len(prefix) + n * rb + len(suffix)
        if total > self.max_response_bytes:
            raise BatchTooLarge(
                f"{n} rows of {rb} bytes ({dtype}) make a {total}-byte answer, over this "
                f"server's {self.max_response_bytes}-byte message limit; ask for fewer rows per "
                f"request (at most {self.max_response_bytes // rb - 1})"
            )
        answer, buf = bytes_to_fill(total)
        p, e = len(prefix), total - len(suffix)
        buf[:p] = np.frombuffer(prefix, np.uint8)
        self.shard.lookup_into(request.table, ids, dtype, buf[p:e])
        buf[e:] = np.frombuffer(suffix, np.uint8)
        return answer, n, n * rb

    @_rpc
    def PushGradients(self, request: pb.PushGradientsRequest, context):
        self._writable()
        dtype = wire.dtype_name(request.grad_dtype, "grad_dtype")
        ids = self._ids(request.ids)
        buf = request.grads  # a memoryview of the received bytes (wire.PushView)
        grads = wire.unpack_rows(
            buf, dtype, self.shard.table(request.table).dim, "grads"
        )  # (n, dim) float32
        if len(grads) != len(ids):
            raise InvalidArgument(
                f"grads hold {len(grads)} rows of {dtype} for {len(ids)} ids; send one gradient "
                "row per id, packed in grad_dtype"
            )
        res = self.shard.push(request.table, ids, grads, request.request_id, request.step)
        resp = pb.PushGradientsResponse(
            rows_updated=res.rows_updated, duplicate=res.duplicate, step=res.step
        )
        return resp, len(ids), len(buf)

    @_rpc
    def Stats(self, request: pb.StatsRequest, context):
        s = self.shard.stats()
        tables = [wire.info_to_pb(self.shard.table_stats(t.name)) for t in self.shard.tables()]
        resp = pb.StatsResponse(
            stored_rows=s["stored_rows"],
            stored_bytes=s["stored_bytes"],
            map_size_bytes=s["map_size_bytes"],
            used_bytes=s["used_bytes"],
            cache_rows=s["cache_rows"],
            methods=self.method_stats(),
            uptime_s=time.time() - self.started,
            shard=wire.state_to_pb(self.shard.shard_state()),
            tables=tables,
        )
        return resp, 0, 0

    # ---- shard ownership and resharding ----

    @_rpc
    def SetShardState(self, request: pb.SetShardStateRequest, context):
        st = request.state
        if st.num_slots < 0 or st.shard_index < 0:
            raise InvalidArgument(
                f"shard state with shard_index={st.shard_index}, num_slots={st.num_slots}: both "
                "must be >= 0; nothing changed"
            )
        self.shard.set_shard_state(wire.state_from_pb(st))
        return pb.SetShardStateResponse(state=wire.state_to_pb(self.shard.shard_state())), 0, 0

    def ExportRows(self, request: pb.ExportRowsRequest, context) -> Iterator[pb.RowBatch]:
        """Stream the stored rows (with optimizer state) of the requested slots."""
        t0, rows, nbytes = time.perf_counter(), 0, 0
        try:
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.message)
            mask = np.frombuffer(request.slots, dtype=np.uint8).astype(bool)
            rb = self.shard.record_bytes(request.table)
            for ids, records, step in self.shard.export_rows(
                request.table, mask, request.batch_rows or 65536
            ):
                rows, nbytes = rows + len(ids), nbytes + records.nbytes
                yield pb.RowBatch(
                    table=request.table,
                    ids=wire.pack_ids(ids),
                    records=records.tobytes(),
                    record_bytes=rb,
                    step=step,
                )
        except Exception as e:
            self._record("ExportRows", t0, rows, nbytes, True)
            abort(context, e)
        self._record("ExportRows", t0, rows, nbytes, False)

    @_rpc
    def ImportRows(self, request_iterator: Iterator[pb.RowBatch], context):
        """Store a stream of row batches all or nothing: every batch is checked as it arrives
        and staged in memory (at most max_import_bytes of records), and the whole stream is
        stored by one Shard.import_rows once it has ended. A stream that breaks off or holds a
        bad batch stores nothing, and a retry re-sends it whole. Staging (rather than storing
        batch by batch and deleting on failure) is what makes that exact: an import overwrites
        rows, and deleting them would lose the values they held before."""
        self._writable()
        table = ""
        step = nbytes = 0
        ids_parts: list[np.ndarray] = []
        rec_parts: list[np.ndarray] = []
        for batch in request_iterator:
            if isinstance(batch, _Malformed):
                raise InvalidArgument(batch.message)
            if not ids_parts:
                table = batch.table
                self.shard.table(table)  # TableNotFound before anything is staged
            elif batch.table != table:
                raise InvalidArgument(
                    f"batch for table {batch.table!r} in an ImportRows stream of table "
                    f"{table!r}; send one stream per table"
                )
            if not 0 <= batch.step < _MAX_STEP:
                raise InvalidArgument(f"step={batch.step} must be in [0, 2**62)")
            ids = self._ids(batch.ids)
            if batch.record_bytes <= 0 or len(batch.records) != len(ids) * batch.record_bytes:
                raise InvalidArgument(
                    f"records are {len(batch.records)} bytes for {len(ids)} ids of "
                    f"{batch.record_bytes} bytes each; send len(ids) * record_bytes bytes"
                )
            nbytes += len(batch.records)
            if nbytes > self.max_import_bytes:
                raise BatchTooLarge(
                    f"this ImportRows stream holds more than {self.max_import_bytes} bytes of "
                    "records, the most a shard stages before storing them (all or nothing); "
                    "send the rows in several streams or raise ServerConfig.max_import_bytes"
                )
            ids_parts.append(ids)
            rec_parts.append(
                np.frombuffer(batch.records, np.uint8).reshape(len(ids), batch.record_bytes)
            )
            step = max(step, batch.step)
        if not ids_parts:
            return pb.ImportRowsResponse(rows=0), 0, 0
        widths = {r.shape[1] for r in rec_parts}
        if len(widths) > 1:
            raise InvalidArgument(
                f"batches of one stream give record_bytes {sorted(widths)}; send one record size"
            )
        all_ids = np.concatenate(ids_parts)
        records = np.concatenate(rec_parts)
        del ids_parts, rec_parts
        total = self.shard.import_rows(table, all_ids, records, step)
        return pb.ImportRowsResponse(rows=total), total, nbytes

    @_rpc
    def DeleteRows(self, request: pb.DeleteRowsRequest, context):
        self._writable()
        mask = np.frombuffer(request.slots, dtype=np.uint8).astype(bool)
        n = self.shard.delete_rows(request.table, mask)
        return pb.DeleteRowsResponse(rows=n), n, 0


def _parser(cls: type[Message]) -> Callable[[bytes], object]:
    """A request deserializer that turns unparsable bytes into a _Malformed marker.

    grpc's own deserializer failure ends the call with INTERNAL "Exception deserializing request!",
    which tells the caller nothing; this lets the servicer answer INVALID_ARGUMENT instead.
    """

    def parse(buf: bytes) -> object:
        try:
            return cls.FromString(buf)
        except (DecodeError, ValueError, RuntimeError) as e:
            return _Malformed(cls, e)

    return parse


def _parse_push(buf: bytes) -> object:
    """PushGradients' requests, parsed without copying ids and gradients (wire.PushView)."""
    try:
        return wire.parse_push_request(buf)
    except (ValueError, InvalidArgument) as e:
        return _Malformed(pb.PushGradientsRequest, e)


def _serializer(cls: type[Message]) -> Callable[[object], bytes]:
    """Serialize a response message; bytes are an already serialized one (see Lookup)."""

    def serialize(response: Message | bytes) -> bytes:
        return response if isinstance(response, bytes) else cls.SerializeToString(response)

    return serialize


def add_servicer(servicer: MemoryStoreServicer, server: grpc.Server) -> None:
    """Register the servicer for every method of engram.v1.MemoryStore, with tolerant parsing."""
    desc = pb.DESCRIPTOR.services_by_name["MemoryStore"]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for m in desc.methods:
        req_cls = getattr(pb, m.input_type.name)
        resp_cls = getattr(pb, m.output_type.name)
        make = kinds[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=_parse_push if m.name == "PushGradients" else _parser(req_cls),
            response_serializer=_serializer(resp_cls),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
