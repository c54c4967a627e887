"""float32 <-> bfloat16 / float16 / float8_e4m3 packing, for the wire and for storage.

Arrays in a storage or wire dtype are numpy arrays: float32, float16, or uint16 holding bfloat16
bits (numpy has no bfloat16). float8_e4m3 is not element-wise (a row is dim e4m3 codes then one
e8m0 scale per 32 values): its arrays are uint8 rows (n, config.row_bytes(dtype, dim)), encoded
and decoded by engine.kernels. Byte buffers are little-endian.
"""

from __future__ import annotations

import numpy as np

from engram_store.engine import kernels
from engram_store.engine.config import DTYPES, FP8_BLOCK, row_bytes
from engram_store.engine.errors import InvalidArgument

FP8 = "float8_e4m3"

_NP: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
}


def _check(name: str) -> None:
    if name not in _NP and name != FP8:
        raise InvalidArgument(f"dtype {name!r} is unknown; use one of {DTYPES}")


def itemsize(name: str) -> int:
    """Bytes per element of dtype `name`; float8_e4m3 has none (its rows carry scales): ask
    config.row_bytes(name, dim) for the bytes of a row in any dtype."""
    _check(name)
    if name == FP8:
        raise InvalidArgument(
            f"{FP8} has no per-element size: a row is dim codes plus dim / {FP8_BLOCK} scale "
            "bytes; use engram_store.engine.config.row_bytes(dtype, dim)"
        )
    return _NP[name].itemsize


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype an array in `name` is held as (bfloat16: uint16 bits; float8_e4m3:
    uint8, whole encoded rows)."""
    _check(name)
    return _NP[name] if name != FP8 else np.dtype(np.uint8)


def _fp8_dim(arr: np.ndarray) -> int:
    """dim of float8_e4m3 rows held as uint8 (n, dim + dim / 32)."""
    width = arr.shape[-1] if arr.ndim else 0
    if arr.ndim != 2 or arr.dtype != np.uint8 or width % (FP8_BLOCK + 1):
        raise InvalidArgument(
            f"{FP8} rows are uint8 (n, dim + dim / {FP8_BLOCK}); got {arr.dtype} {arr.shape}"
        )
    return width // (FP8_BLOCK + 1) * FP8_BLOCK


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 `x`, rounded to nearest even; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate.
    # No overflow: the largest non-NaN pattern 0xFF7FFFFF + 0x8000 still fits in 32 bits.
    rounded = (
        (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    ).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        # truncation alone could clear every mantissa bit (NaN -> Inf); force the quiet bit.
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bits (uint16); exact."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_dtype(arr: np.ndarray, name: str) -> np.ndarray:
    """float32 `arr` converted to dtype `name` (bfloat16 as uint16 bits), same shape; for
    float8_e4m3 `arr` is rows (n, dim) and the result uint8 (n, row_bytes) (kernels.encode)."""
    _check(name)
    arr = np.asarray(arr, dtype=np.float32)
    if name == FP8:
        return kernels.encode(arr, FP8)
    if name == "float32":
        return arr
    if name == "float16":
        with np.errstate(over="ignore"):  # beyond 65504 rounds to inf, as intended
            return arr.astype(np.float16)
    return f32_to_bf16(arr)


def to_float32(arr: np.ndarray, name: str) -> np.ndarray:
    """float32 values of `arr` held in dtype `name` (bfloat16 as uint16 bits), same shape;
    float8_e4m3 rows (uint8 (n, row_bytes)) give float32 (n, dim)."""
    _check(name)
    if name == FP8:
        arr = np.asarray(arr)
        return kernels.decode(arr, FP8, _fp8_dim(arr))
    if name == "bfloat16":
        return bf16_to_f32(arr)
    return np.asarray(arr).astype(np.float32, copy=False)


def to_bytes(arr: np.ndarray, name: str) -> bytes:
    """Packed little-endian bytes of float32 `arr` in dtype `name` (float8_e4m3: rows (n, dim),
    each dim codes then dim / 32 scales)."""
    if name == FP8:
        return to_dtype(arr, name).tobytes()
    return np.ascontiguousarray(to_dtype(arr, name), dtype=_NP[name]).tobytes()


def from_bytes(
    buf: bytes | bytearray | memoryview, name: str, dim: int, copy: bool = True
) -> np.ndarray:
    """float32 (n, dim) rows decoded from packed little-endian bytes in dtype `name`.

    copy=False skips the copy of float32 data: the result may then be a read-only view of `buf`
    (fine for gradients handed to Shard.push, which never writes them).
    """
    _check(name)
    if dim <= 0:
        raise InvalidArgument(f"dim={dim} must be > 0")
    if name == FP8:
        return kernels.decode(buf, name, dim)
    width = row_bytes(name, dim)
    if len(buf) % width:
        raise InvalidArgument(
            f"{len(buf)} bytes of {name} are not whole rows of dim {dim} ({width} bytes each); "
            f"send n * {width} bytes, or fix the dtype or dim"
        )
    arr = np.frombuffer(buf, dtype=_NP[name]).reshape(-1, dim)
    out = to_float32(arr, name)
    # frombuffer of immutable bytes is read-only; callers may update rows in place
    return out if out.flags.writeable or not copy else out.copy()
