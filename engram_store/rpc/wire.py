"""Conversions between the core's dataclasses / numpy arrays and the engram.v1 wire messages.

Shared by the service, the client and the CLI so that both ends pack bytes the same way. Every
decoder checks byte lengths and enum values and raises errors.InvalidArgument with a message that
says what to change.

Rows on the wire, per dtype (`wire_numpy_dtype`: how a client holds them without converting):
float32 as float32, float16 as float16, bfloat16 as uint16 bits, float8_e4m3 as uint8 rows of
dim e4m3 codes followed by dim / 32 e8m0 scale bytes (engine.config.row_bytes).
"""

from __future__ import annotations

import numpy as np

from engram_store.engine import dtypes, kernels
from engram_store.engine.config import FP8_BLOCK, OptimizerConfig, TableConfig, row_bytes
from engram_store.engine.errors import InvalidArgument
from engram_store.engine.types import ShardStateInfo
from engram_store.rpc.proto import store_pb2 as pb

DTYPE_TO_PB = {
    "float32": pb.FLOAT32,
    "bfloat16": pb.BFLOAT16,
    "float16": pb.FLOAT16,
    "float8_e4m3": pb.FLOAT8_E4M3,
}
PB_TO_DTYPE: dict[int, str] = {
    pb.DTYPE_UNSPECIFIED: "float32",
    **{v: k for k, v in DTYPE_TO_PB.items()},
}
OPT_TO_PB = {
    "sgd": pb.SGD,
    "adagrad": pb.ADAGRAD,
    "adam": pb.ADAM,
    "rowwise_adagrad": pb.ROWWISE_ADAGRAD,
    "rowwise_adam": pb.ROWWISE_ADAM,
}
PB_TO_OPT = {v: k for k, v in OPT_TO_PB.items()}
INIT_TO_PB = {"normal": pb.NORMAL, "zeros": pb.ZEROS}
PB_TO_INIT = {pb.INIT_UNSPECIFIED: "normal", pb.NORMAL: "normal", pb.ZEROS: "zeros"}
#: dtypes a gradient may travel in (an fp8 gradient would lose too much to be of use)
GRAD_DTYPES = ("float32", "bfloat16", "float16")
_OPT_NAMES = ", ".join(pb.OptimizerKind.Name(v) for v in PB_TO_OPT)


def dtype_name(value: int, what: str = "dtype") -> str:
    """The dtype name of a wire DType enum value (UNSPECIFIED = float32)."""
    try:
        return PB_TO_DTYPE[value]
    except KeyError:
        known = ", ".join(f"{pb.DType.Name(v)} ({v})" for v in DTYPE_TO_PB.values())
        raise InvalidArgument(
            f"{what}={value} is not a known engram.v1.DType; use one of {known}"
        ) from None


def wire_numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype rows in wire dtype `dtype` are held as without conversion (bfloat16:
    uint16 bits; float8_e4m3: uint8 codes and scales)."""
    if dtype == "float8_e4m3":
        return np.dtype(np.uint8)
    return dtypes.numpy_dtype(dtype)


def wire_width(dtype: str, dim: int) -> int:
    """Elements per row of `wire_numpy_dtype(dtype)`: dim, or dim + dim / 32 for float8_e4m3."""
    return row_bytes(dtype, dim) // wire_numpy_dtype(dtype).itemsize


def wire_to_float32(rows: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """float32 (n, dim) values of rows held as `wire_numpy_dtype(dtype)` (a decoded answer),
    decoded by the engine's kernels (exact; float8_e4m3: each code times the e8m0 scale of its
    block of 32); float32 rows are returned as they are (no copy)."""
    if dtype == "float32":
        return rows
    width = row_bytes(dtype, dim)
    if rows.dtype != wire_numpy_dtype(dtype) or rows.ndim != 2 or rows.nbytes != len(rows) * width:
        raise InvalidArgument(
            f"rows of {rows.dtype} {rows.shape} are not {dtype} rows of dim {dim}; pass "
            f"(n, {wire_width(dtype, dim)}) {wire_numpy_dtype(dtype)} as lookup(raw=True) gives"
        )
    return kernels.decode(rows.view(np.uint8).reshape(len(rows), width), dtype, dim)


def pack_ids(ids: np.ndarray) -> bytes:
    """Packed little-endian int64 bytes of a 1-D id array."""
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def unpack_ids(buf: bytes, what: str = "ids") -> np.ndarray:
    """int64 ids from packed little-endian bytes (a read-only view, no copy)."""
    if len(buf) % 8:
        raise InvalidArgument(
            f"{what} is {len(buf)} bytes, not a multiple of 8; send packed little-endian int64"
        )
    return np.frombuffer(buf, dtype="<i8")


def pack_rows(rows: np.ndarray, dtype: str) -> bytes:
    """Packed little-endian bytes of float32 rows (n, dim) converted to `dtype`."""
    if dtype == "float32":
        return np.ascontiguousarray(rows, dtype="<f4").tobytes()
    return dtypes.to_bytes(np.asarray(rows, dtype=np.float32), dtype)


def _grad_dtype(dtype: str, what: str) -> None:
    if dtype not in GRAD_DTYPES:
        raise InvalidArgument(
            f"{what} cannot travel as {dtype}; send them as one of {', '.join(GRAD_DTYPES)}"
        )


def unpack_rows(buf: bytes, dtype: str, dim: int, what: str = "rows") -> np.ndarray:
    """float32 rows (n, dim) from packed bytes in `dtype` (a read-only view for float32); fp8
    is refused (gradients and imported values travel in GRAD_DTYPES)."""
    _grad_dtype(dtype, what)
    size = dtypes.itemsize(dtype)
    if len(buf) % (dim * size):
        raise InvalidArgument(
            f"{what} is {len(buf)} bytes, not a multiple of the row size {dim * size} "
            f"(dim {dim} x {size}-byte {dtype}); send (n, {dim}) packed {dtype}"
        )
    if dtype == "float32":  # a view: the float32 path copies nothing
        return np.frombuffer(buf, dtype="<f4").reshape(-1, dim)
    return dtypes.from_bytes(buf, dtype, dim)


def spec_to_pb(spec: TableConfig) -> pb.TableSpec:
    """The wire TableSpec of a table config."""
    o = spec.optimizer
    return pb.TableSpec(
        name=spec.name,
        head_rows=list(spec.head_rows),
        num_rows=spec.num_rows,
        dim=spec.dim,
        storage_dtype=DTYPE_TO_PB[spec.dtype],
        init=pb.InitSpec(kind=INIT_TO_PB[spec.init], std=spec.init_std, seed=spec.seed),
        optimizer=pb.OptimizerSpec(
            kind=OPT_TO_PB[o.kind],
            lr=o.lr,
            beta1=o.beta1,
            beta2=o.beta2,
            eps=o.eps or 0.0,
            initial_accumulator_value=o.initial_accumulator_value,
            lr_decay=o.lr_decay,
        ),
    )


def spec_from_pb(m: pb.TableSpec) -> TableConfig:
    """The table config of a wire TableSpec, with the proto's documented defaults; validated."""
    o = m.optimizer
    if o.kind == pb.OPTIMIZER_UNSPECIFIED:
        raise InvalidArgument(
            f"table {m.name!r}: optimizer kind is unspecified; set it to one of {_OPT_NAMES}"
        )
    if o.kind not in PB_TO_OPT:
        raise InvalidArgument(
            f"table {m.name!r}: optimizer kind {o.kind} is unknown; use one of {_OPT_NAMES}"
        )
    if m.init.kind not in PB_TO_INIT:
        raise InvalidArgument(
            f"table {m.name!r}: init kind {m.init.kind} is unknown; use NORMAL or ZEROS"
        )
    init = PB_TO_INIT[m.init.kind]
    spec = TableConfig(
        name=m.name,
        num_rows=int(m.num_rows),
        dim=int(m.dim),
        head_rows=tuple(m.head_rows),
        dtype=dtype_name(m.storage_dtype, "storage_dtype"),
        init=init,
        init_std=(m.init.std or 1.0) if init == "normal" else m.init.std,
        seed=int(m.init.seed),
        optimizer=OptimizerConfig(
            kind=PB_TO_OPT[o.kind],
            lr=o.lr,
            beta1=o.beta1 or 0.9,
            beta2=o.beta2 or 0.999,
            eps=o.eps or None,
            initial_accumulator_value=o.initial_accumulator_value,
            lr_decay=o.lr_decay,
        ),
    )
    spec.validate()
    return spec


def info_to_pb(stats) -> pb.TableInfo:
    """The wire TableInfo of a storage.TableStats."""
    return pb.TableInfo(
        spec=spec_to_pb(stats.spec),
        stored_rows=stats.stored_rows,
        stored_bytes=stats.stored_bytes,
        step=stats.step,
        pushes=stats.pushes,
    )


_STATE_FIELDS = (
    "shard_index",
    "map_version",
    "num_slots",
    "owned",
    "frozen",
    "layout",
    "shard_map_json",
)


def state_to_pb(state: ShardStateInfo) -> pb.ShardState:
    """The wire ShardState of a storage.ShardStateInfo."""
    return pb.ShardState(**{f: getattr(state, f) for f in _STATE_FIELDS})


def state_from_pb(m: pb.ShardState) -> ShardStateInfo:
    """The storage.ShardStateInfo of a wire ShardState (the Shard validates it)."""
    return ShardStateInfo(**{f: getattr(m, f) for f in _STATE_FIELDS})


# ---- the two large messages without the protobuf runtime ----
# A lookup answer and a push request are one large bytes field and a few small ones. protobuf's
# serializer copies a large field several times (about 10 ms for 16 MiB), and its parser once
# more; these encode the same wire bytes with one copy, and decode a lookup answer with none.
# Tests check them against protobuf.


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 travel as 10-byte two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidArgument("LookupResponse is truncated or corrupt")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _raw(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    return arr.reshape(-1).view(np.uint8).data


def _len_field(number: int, data: str | bytes | memoryview) -> list:
    data = data.encode() if isinstance(data, str) else data
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    return [_varint(number << 3 | 2), _varint(size), data] if size else []


def _int_field(number: int, value: int) -> list:
    return [_varint(number << 3), _varint(value)] if value else []


def encode_push_request(
    table: str,
    ids: np.ndarray,
    grads: np.ndarray,
    dtype: str,
    request_id: str,
    step: int,
    map_version: int,
) -> bytes:
    """The serialized PushGradientsRequest of int64 ids (n,) and float32 grads (n, dim) sent in
    `dtype`; byte-identical to PushGradientsRequest(...).SerializeToString()."""
    _grad_dtype(dtype, "grads")
    ids = np.ascontiguousarray(ids, dtype="<i8")
    data = (
        np.ascontiguousarray(grads, dtype="<f4")
        if dtype == "float32"
        else np.ascontiguousarray(dtypes.to_dtype(grads, dtype), dtypes.numpy_dtype(dtype))
    )
    parts = [
        *_len_field(1, table),
        *_len_field(2, _raw(ids)),
        *_len_field(3, _raw(data)),
        *_int_field(4, DTYPE_TO_PB[dtype]),
        *_len_field(5, request_id),
        *_int_field(6, step),
        *_int_field(7, map_version),
    ]
    return b"".join(parts)


def lookup_response_frame(num_rows: int, dim: int, dtype: str) -> tuple[bytes, bytes]:
    """The bytes of a serialized LookupResponse of `num_rows` rows of `dim` in `dtype` that come
    before and after the packed rows: prefix + rows + suffix is byte-identical to
    LookupResponse(rows=..., num_rows=..., dim=..., dtype=...).SerializeToString(), so a server
    can gather the rows straight into a buffer that already holds the prefix."""
    size = num_rows * row_bytes(dtype, dim)
    prefix = b"\x0a" + _varint(size) if size else b""
    suffix = b"".join(
        tag + _varint(v)
        for tag, v in ((b"\x10", num_rows), (b"\x18", dim), (b"\x20", DTYPE_TO_PB[dtype]))
        if v
    )
    return prefix, suffix


def decode_lookup_response(buf: bytes) -> tuple[np.ndarray, int, str]:
    """(rows, dim, dtype) of a serialized LookupResponse. `rows` is a read-only view of `buf`
    (no copy) of shape (num_rows, wire_width(dtype, dim)) in wire_numpy_dtype(dtype)."""
    pos, span, num_rows, dim, dtype = 0, (0, 0), 0, 0, 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = _read_varint(buf, pos)
            if value >= 1 << 63:
                value -= 1 << 64
            if field == 2:
                num_rows = value
            elif field == 3:
                dim = value
            elif field == 4:
                dtype = value
        elif kind == 2:
            size, pos = _read_varint(buf, pos)
            if field == 1:
                span = (pos, size)
            pos += size
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise InvalidArgument(f"LookupResponse has an unsupported wire type {kind}")
    if pos != len(buf) or dim <= 0 or num_rows < 0:
        raise InvalidArgument("LookupResponse is truncated or corrupt")
    name = dtype_name(dtype)
    start, size = span
    if name == "float8_e4m3" and dim % FP8_BLOCK:
        raise InvalidArgument(f"LookupResponse holds float8_e4m3 rows of dim {dim}, not 32k")
    if size != num_rows * row_bytes(name, dim):
        raise InvalidArgument(f"LookupResponse holds {size} bytes for {num_rows} rows of {dim}")
    np_dtype = wire_numpy_dtype(name)
    rows = np.frombuffer(buf, dtype=np_dtype, count=size // np_dtype.itemsize, offset=start)
    return rows.reshape(num_rows, wire_width(name, dim)), dim, name


class PushView:
    """A PushGradientsRequest parsed without copying its two large fields: `ids` and `grads`
    are memoryviews of the received bytes (protobuf's parse, then each read of a bytes field,
    would copy ~17 MB twice for a 65,536 x 64 push). Field semantics are protobuf's: unknown
    fields are skipped, the last occurrence of a field wins, missing fields are defaults."""

    __slots__ = ("table", "ids", "grads", "grad_dtype", "request_id", "step", "map_version")

    def __init__(self) -> None:
        self.table, self.request_id = "", ""
        self.ids = self.grads = memoryview(b"")
        self.grad_dtype = self.step = self.map_version = 0


def parse_push_request(data: bytes) -> PushView:
    """PushView of serialized PushGradientsRequest bytes; ValueError (InvalidArgument for a
    broken varint) when they are not one."""
    buf = memoryview(data)
    out = PushView()
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, kind = key >> 3, key & 7
        if kind == 0:
            value, pos = _read_varint(buf, pos)
            if field == 4:
                out.grad_dtype = value if value < 1 << 31 else value - (1 << 64)
            elif field == 6:
                out.step = value - (1 << 64) if value >= 1 << 63 else value
            elif field == 7:
                out.map_version = value
        elif kind == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise ValueError(f"field {field} runs past the end of the message")
            chunk = buf[pos : pos + n]
            pos += n
            if field == 1:
                out.table = str(chunk, "utf-8")
            elif field == 2:
                out.ids = chunk
            elif field == 3:
                out.grads = chunk
            elif field == 5:
                out.request_id = str(chunk, "utf-8")
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {kind} of field {field} is not valid here")
        if pos > end:
            raise ValueError("truncated message")
        if kind != 2 and field in (1, 2, 3, 5) or kind != 0 and field in (4, 6, 7):
            raise ValueError(f"field {field} has the wrong wire type {kind}")
    return out
