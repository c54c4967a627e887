"""float32 <-> bfloat16 / float16 packing, for the wire and for storage.

Arrays in a storage or wire dtype are numpy arrays: float32, float16, or uint16 holding bfloat16
bits (numpy has no bfloat16). Byte buffers are little-endian.
"""

from __future__ import annotations

import numpy as np

from engram_store.engine.config import DTYPES
from engram_store.engine.errors import InvalidArgument

_NP: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
}


def _check(name: str) -> None:
    if name not in _NP:
        raise InvalidArgument(f"dtype {name!r} is unknown; use one of {DTYPES}")


def itemsize(name: str) -> int:
    """Bytes per element of dtype `name`."""
    _check(name)
    return _NP[name].itemsize


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype an array in `name` is held as (bfloat16: uint16 bits)."""
    _check(name)
    return _NP[name]


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
    """float32 `arr` converted to dtype `name` (bfloat16 as uint16 bits), same shape."""
    _check(name)
    arr = np.asarray(arr, dtype=np.float32)
    if name == "float32":
        return arr
    if name == "float16":
        return arr.astype(np.float16)
    return f32_to_bf16(arr)


def to_float32(arr: np.ndarray, name: str) -> np.ndarray:
    """float32 values of `arr` held in dtype `name` (bfloat16 as uint16 bits), same shape."""
    _check(name)
    if name == "bfloat16":
        return bf16_to_f32(arr)
    return np.asarray(arr).astype(np.float32, copy=False)


def to_bytes(arr: np.ndarray, name: str) -> bytes:
    """Packed little-endian bytes of float32 `arr` in dtype `name`."""
    return np.ascontiguousarray(to_dtype(arr, name), dtype=_NP[name]).tobytes()


def from_bytes(
    buf: bytes | bytearray | memoryview, name: str, dim: int, copy: bool = True
) -> np.ndarray:
    """float32 (n, dim) rows decoded from packed little-endian bytes in dtype `name`.

    copy=False skips the copy of float32 data: the result may then be a read-only view of `buf`
    (fine for gradients handed to Shard.push, which never writes them).
    """
    _check(name)
    row_bytes = dim * _NP[name].itemsize
    if row_bytes <= 0:
        raise InvalidArgument(f"dim={dim} must be > 0")
    if len(buf) % row_bytes:
        raise InvalidArgument(
            f"{len(buf)} bytes of {name} are not whole rows of dim {dim} ({row_bytes} bytes each); "
            f"send n * {row_bytes} bytes, or fix the dtype or dim"
        )
    arr = np.frombuffer(buf, dtype=_NP[name]).reshape(-1, dim)
    out = to_float32(arr, name)
    # frombuffer of immutable bytes is read-only; callers may update rows in place
    return out if out.flags.writeable or not copy else out.copy()
