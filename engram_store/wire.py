"""Conversions between the core's dataclasses / numpy arrays and the engram.v1 wire messages.

Shared by the service, the client and the CLI so that both ends pack bytes the same way. Every
decoder checks byte lengths and enum values and raises errors.InvalidArgument with a message that
says what to change.
"""

from __future__ import annotations

import numpy as np

from . import dtypes
from .config import OptimizerConfig, TableConfig
from .errors import InvalidArgument
from .proto import store_pb2 as pb
from .storage import ShardStateInfo

DTYPE_TO_PB = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16}
PB_TO_DTYPE = {pb.DTYPE_UNSPECIFIED: "float32", **{v: k for k, v in DTYPE_TO_PB.items()}}
OPT_TO_PB = {"sgd": pb.SGD, "adagrad": pb.ADAGRAD, "adam": pb.ADAM}
PB_TO_OPT = {v: k for k, v in OPT_TO_PB.items()}
INIT_TO_PB = {"normal": pb.NORMAL, "zeros": pb.ZEROS}
PB_TO_INIT = {pb.INIT_UNSPECIFIED: "normal", pb.NORMAL: "normal", pb.ZEROS: "zeros"}


def dtype_name(value: int, what: str = "dtype") -> str:
    """The dtype name of a wire DType enum value (UNSPECIFIED = float32)."""
    try:
        return PB_TO_DTYPE[value]
    except KeyError:
        raise InvalidArgument(
            f"{what}={value} is not a known engram.v1.DType; use FLOAT32 (1), BFLOAT16 (2) "
            "or FLOAT16 (3)") from None


def pack_ids(ids: np.ndarray) -> bytes:
    """Packed little-endian int64 bytes of a 1-D id array."""
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def unpack_ids(buf: bytes, what: str = "ids") -> np.ndarray:
    """int64 ids from packed little-endian bytes (a read-only view, no copy)."""
    if len(buf) % 8:
        raise InvalidArgument(
            f"{what} is {len(buf)} bytes, not a multiple of 8; send packed little-endian int64")
    return np.frombuffer(buf, dtype="<i8")


def pack_rows(rows: np.ndarray, dtype: str) -> bytes:
    """Packed little-endian bytes of float32 rows (n, dim) converted to `dtype`."""
    if dtype == "float32":
        return np.ascontiguousarray(rows, dtype="<f4").tobytes()
    return dtypes.to_bytes(np.asarray(rows, dtype=np.float32), dtype)


def unpack_rows(buf: bytes, dtype: str, dim: int, what: str = "rows") -> np.ndarray:
    """float32 rows (n, dim) from packed bytes in `dtype` (a read-only view for float32)."""
    size = dtypes.itemsize(dtype)
    if len(buf) % (dim * size):
        raise InvalidArgument(
            f"{what} is {len(buf)} bytes, not a multiple of the row size {dim * size} "
            f"(dim {dim} x {size}-byte {dtype}); send (n, {dim}) packed {dtype}")
    if dtype == "float32":  # a view: the float32 path copies nothing
        return np.frombuffer(buf, dtype="<f4").reshape(-1, dim)
    return dtypes.from_bytes(buf, dtype, dim)


def spec_to_pb(spec: TableConfig) -> pb.TableSpec:
    """The wire TableSpec of a table config."""
    o = spec.optimizer
    return pb.TableSpec(
        name=spec.name, head_rows=list(spec.head_rows), num_rows=spec.num_rows, dim=spec.dim,
        storage_dtype=DTYPE_TO_PB[spec.dtype],
        init=pb.InitSpec(kind=INIT_TO_PB[spec.init], std=spec.init_std, seed=spec.seed),
        optimizer=pb.OptimizerSpec(
            kind=OPT_TO_PB[o.kind], lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps or 0.0,
            initial_accumulator_value=o.initial_accumulator_value, lr_decay=o.lr_decay))


def spec_from_pb(m: pb.TableSpec) -> TableConfig:
    """The table config of a wire TableSpec, with the proto's documented defaults; validated."""
    o = m.optimizer
    if o.kind == pb.OPTIMIZER_UNSPECIFIED:
        raise InvalidArgument(
            f"table {m.name!r}: optimizer kind is unspecified; set it to SGD, ADAGRAD or ADAM")
    if o.kind not in PB_TO_OPT:
        raise InvalidArgument(f"table {m.name!r}: optimizer kind {o.kind} is unknown; use SGD, "
                              "ADAGRAD or ADAM")
    if m.init.kind not in PB_TO_INIT:
        raise InvalidArgument(f"table {m.name!r}: init kind {m.init.kind} is unknown; use NORMAL "
                              "or ZEROS")
    init = PB_TO_INIT[m.init.kind]
    spec = TableConfig(
        name=m.name, num_rows=int(m.num_rows), dim=int(m.dim), head_rows=tuple(m.head_rows),
        dtype=dtype_name(m.storage_dtype, "storage_dtype"), init=init,
        init_std=(m.init.std or 1.0) if init == "normal" else m.init.std, seed=int(m.init.seed),
        optimizer=OptimizerConfig(
            kind=PB_TO_OPT[o.kind], lr=o.lr, beta1=o.beta1 or 0.9, beta2=o.beta2 or 0.999,
            eps=o.eps or None, initial_accumulator_value=o.initial_accumulator_value,
            lr_decay=o.lr_decay))
    spec.validate()
    return spec


def info_to_pb(stats) -> pb.TableInfo:
    """The wire TableInfo of a storage.TableStats."""
    return pb.TableInfo(spec=spec_to_pb(stats.spec), stored_rows=stats.stored_rows,
                        stored_bytes=stats.stored_bytes, step=stats.step, pushes=stats.pushes)


_STATE_FIELDS = ("shard_index", "map_version", "num_slots", "owned", "frozen", "layout",
                 "shard_map_json")


def state_to_pb(state: ShardStateInfo) -> pb.ShardState:
    """The wire ShardState of a storage.ShardStateInfo."""
    return pb.ShardState(**{f: getattr(state, f) for f in _STATE_FIELDS})


def state_from_pb(m: pb.ShardState) -> ShardStateInfo:
    """The storage.ShardStateInfo of a wire ShardState (the Shard validates it)."""
    return ShardStateInfo(**{f: getattr(m, f) for f in _STATE_FIELDS})
