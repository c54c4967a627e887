"""Initial table rows and optimizer state: pure functions of (seed, global row id, column).

A row that was never pushed is not stored; it is recomputed here on demand. Because the value
depends only on (seed, row id, column), any shard count, any batch and any order of requests give
the same initial table.

Normal init: columns (2k, 2k+1) of a row share one 64-bit counter hash
h = fmix64(fmix64(id * G ^ salt(seed)) + (k + 1) * G2); its two 32-bit halves feed Box-Muller,
giving r cos(phi) for column 2k and r sin(phi) for column 2k+1. The transcendentals run in
float64 and are rounded once to float32, so an ulp of difference between CPU math libraries
almost never changes the float32 result.
"""

from __future__ import annotations

import math

import numpy as np

from engram_store.engine.config import TableConfig
from engram_store.engine.routing import fmix64

_G = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio odd constants spread consecutive counters
_G2 = np.uint64(0xD1B54A32D192ED03)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S32 = np.uint64(32)
_S20 = np.uint64(20)
_S12 = np.uint64(12)
_ONE = np.uint64(0x3FF0000000000000)  # exponent bits of 1.0
_CHUNK = 1 << 16


def _fmix64_inplace(x: np.ndarray, tmp: np.ndarray) -> None:
    """routing.fmix64 without temporaries (same result); x and tmp are uint64 of one shape."""
    np.right_shift(x, _S33, out=tmp)
    x ^= tmp
    x *= _C1
    np.right_shift(x, _S33, out=tmp)
    x ^= tmp
    x *= _C2
    np.right_shift(x, _S33, out=tmp)
    x ^= tmp


def _seed_salt(seed: int) -> np.uint64:
    return fmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]


def initial_rows(spec: TableConfig, ids: np.ndarray) -> np.ndarray:
    """float32 (n, spec.dim) initial values of global rows `ids` (N(0, init_std^2) or zeros)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n, dim = ids.shape[0], spec.dim
    if spec.init == "zeros" or n == 0 or spec.init_std == 0:
        return np.zeros((n, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    # chunks of ~64k values keep the float64 temporaries in cache instead of faulting in new pages
    step = max(1, _CHUNK // ((dim + 1) // 2))
    for lo in range(0, n, step):
        out[lo : lo + step] = _normal_rows(spec, ids[lo : lo + step])
    return out


def _normal_rows(spec: TableConfig, ids: np.ndarray) -> np.ndarray:
    n, dim = ids.shape[0], spec.dim
    pairs = (dim + 1) // 2
    base = ids.astype(np.uint64)
    base *= _G
    base ^= _seed_salt(spec.seed)
    _fmix64_inplace(base, np.empty_like(base))
    h = np.empty((n, pairs), dtype=np.uint64)
    np.add(base[:, None], np.arange(1, pairs + 1, dtype=np.uint64) * _G2, out=h)
    tmp = np.empty_like(h)
    _fmix64_inplace(h, tmp)

    # Two doubles in [1, 2) from the hash halves by bit placement (exact, no int->float convert):
    # the high 32 bits give u1 = 2 - x in (0, 1] (log finite), the low 32 the angle phi.
    np.right_shift(h, _S32, out=tmp)
    tmp <<= _S20
    tmp |= _ONE
    r = tmp.view(np.float64)
    np.subtract(2.0, r, out=r)
    np.log(r, out=r)
    r *= -2.0
    np.sqrt(r, out=r)
    r *= spec.init_std
    h <<= _S32
    h >>= _S12
    h |= _ONE
    phi = h.view(np.float64)
    phi -= 1.5
    phi *= 2.0 * math.pi  # uniform in [-pi, pi)
    out = np.empty((n, 2 * pairs), dtype=np.float32)
    c = np.cos(phi)
    out[:, 0::2] = r * c
    # sin(phi) = sign(phi) sqrt(1 - cos^2): sqrt is exactly rounded everywhere, so only cos could
    # differ between CPU math libraries (and rarely survives the float32 rounding).
    np.multiply(c, c, out=c)
    np.subtract(1.0, c, out=c)
    np.maximum(c, 0.0, out=c)
    np.sqrt(c, out=c)
    np.copysign(c, phi, out=c)
    c *= r
    out[:, 1::2] = c
    return out[:, :dim] if dim % 2 else out


def initial_state(spec: TableConfig, n: int) -> np.ndarray:
    """float32 (n, spec.state_floats) optimizer state of never-pushed rows."""
    width = spec.state_floats
    if spec.optimizer.kind in ("adagrad", "rowwise_adagrad"):
        return np.full((n, width), spec.optimizer.initial_accumulator_value, dtype=np.float32)
    return np.zeros((n, width), dtype=np.float32)
