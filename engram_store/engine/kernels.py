"""Compiled loops of the shard engine: the fused optimizer step, row gather / scatter, the row
encodings (float32, bfloat16, float16, float8_e4m3) and the integrity checksum.

A table's rows live in one dense uint8 array `rows` (capacity, spec.row_bytes) in the storage
dtype and its optimizer state in one float32 array `state` (capacity, spec.state_floats); a row id
maps to an offset, its row index in both. These kernels work on those arrays in place, one pass per
row, with numba (`nogil`: the engine runs them from several threads on disjoint offsets; `cache`:
each process loads the compiled code instead of compiling it again). One compiled specialisation
per kernel: the Python wrappers check and normalise the arguments (dtype, layout), so every call
reaches the same machine code.

Arithmetic stays in float32 as in torch's CPU kernels: hyper-parameters arrive as float32 values
and every intermediate is float32 (see optimizers.py, the numpy reference, for the order of
operations each optimizer follows). Low-precision rows (bfloat16, float16) are read as float32,
updated, and written back with stochastic rounding whose random bits are a counter hash of
(table seed, row id, step, column), so a push gives the same rows whatever its batching, order or
threading. float8_e4m3 tables are read-only (see optimizer_step).

Byte order: rows and checksummed words are little-endian; numba runs only on little-endian hosts.
"""

from __future__ import annotations

import math
from typing import Any

import llvmlite.ir as ir
import numba
import numpy as np
from numba.core import cgutils, types
from numba.extending import intrinsic

from engram_store.engine.config import DTYPES, FP8_BLOCK, TableConfig, row_bytes
from engram_store.engine.errors import InvalidArgument

_U64 = np.uint64
# odd 64-bit constants (golden ratio, MurmurHash3's finaliser) as in init.py and routing.py
_G = _U64(0x9E3779B97F4A7C15)
_G2 = _U64(0xD1B54A32D192ED03)
_G3 = _U64(0x8CB92BA72F3D8DD7)
_C1 = _U64(0xFF51AFD7ED558CCD)
_C2 = _U64(0xC4CEB9FE1A85EC53)
#: domain separator: the stochastic-rounding stream of a seed differs from its init stream
_SR_DOMAIN = _U64(0x5352_5F62_6974_7321)

# 16-bit formats of the encode / decode kernels
_F32, _BF16, _F16 = 0, 1, 2
_MODES = {"float32": _F32, "bfloat16": _BF16, "float16": _F16}
# optimizer kinds of the step kernels
_KINDS = {"sgd": 0, "adagrad": 1, "adam": 2, "rowwise_adagrad": 3, "rowwise_adam": 4}

# error_model="numpy": float division by zero gives inf / NaN as in numpy and torch instead of
# raising, which also lets the division loops vectorise
_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_inline = numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")


# ---------------------------------------------------------------------------------------------
# counter hash and stochastic rounding


@_jit
def _fmix64(x: np.uint64) -> np.uint64:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit)."""
    x ^= x >> _U64(33)
    x *= _C1
    x ^= x >> _U64(33)
    x *= _C2
    x ^= x >> _U64(33)
    return x


@_jit
def _sr_bits(salt: np.uint64, row_id: np.int64, step: np.int64, words: np.ndarray) -> None:
    """Fill `words` (uint64, one per 4 columns) with the random bits of one row at one step:
    word k = fmix64(key + (k + 1) * G2), key = fmix64(fmix64(id * G ^ salt) + step * G3).
    Column c uses the 16 bits (c % 4) * 16 of word c // 4."""
    key = _fmix64(_fmix64(_U64(row_id) * _G ^ salt) + _U64(step) * _G3)
    for k in range(words.shape[0]):
        words[k] = _fmix64(key + _U64(k + 1) * _G2)


# ---------------------------------------------------------------------------------------------
# 16-bit rows <-> float32


@_inline
def _bf16_row_to_f32(src: np.ndarray, dst_bits: np.ndarray) -> None:
    """float32 bits of bfloat16 bits src (exact: the upper half of a float32)."""
    for j in range(src.shape[0]):
        dst_bits[j] = np.uint32(src[j]) << np.uint32(16)


@_inline
def _f16_row_to_f32(src: np.ndarray, dst_bits: np.ndarray, dst: np.ndarray) -> None:
    """float32 values (dst, whose bits dst_bits views) of float16 bits src, exact: normal
    values, inf and NaN by moving the exponent and mantissa fields, then subnormals (m 2^-24)
    by an exact int -> float conversion; two loops that vectorise (no branch in the first,
    a masked store in the second)."""
    for j in range(src.shape[0]):
        h = np.uint32(src[j])
        e = (h >> np.uint32(10)) & np.uint32(0x1F)
        sign = (h & np.uint32(0x8000)) << np.uint32(16)
        mant = (h & np.uint32(0x3FF)) << np.uint32(13)
        exp32 = np.uint32(0x7F800000) if e == np.uint32(31) else (e + np.uint32(112)) << 23
        dst_bits[j] = sign | exp32 | mant
    for j in range(src.shape[0]):
        h = np.uint32(src[j])
        if (h & np.uint32(0x7C00)) == np.uint32(0):
            v = np.float32(h & np.uint32(0x3FF)) * np.float32(2.0**-24)
            dst[j] = -v if (h & np.uint32(0x8000)) else v


@_jit
def _f32_to_bf16_rne(u: np.uint64) -> np.uint64:
    """bfloat16 bits of float32 bits `u`, round to nearest even; NaN stays a quiet NaN."""
    if (u & _U64(0x7FFFFFFF)) > _U64(0x7F800000):
        return (u >> _U64(16)) | _U64(0x0040)
    return (u + _U64(0x7FFF) + ((u >> _U64(16)) & _U64(1))) >> _U64(16)


@_jit
def _f32_to_f16_rne(u: np.uint64) -> np.uint64:
    """float16 bits of float32 bits `u`, round to nearest even (as numpy's and torch's casts):
    |x| >= 65520 gives inf, subnormal results are rounded in units of 2^-24, NaN a quiet NaN."""
    sign = (u >> _U64(16)) & _U64(0x8000)
    a = u & _U64(0x7FFFFFFF)
    if a > _U64(0x7F800000):
        return sign | _U64(0x7E00)
    if a >= _U64(0x477FF000):
        return sign | _U64(0x7C00)
    if a >= _U64(0x38800000):
        t = a >> _U64(13)
        rem = a & _U64(0x1FFF)
        if rem > _U64(0x1000) or (rem == _U64(0x1000) and (t & _U64(1)) == _U64(1)):
            t += _U64(1)
        return sign | (t - _U64(0x1C000))
    if a < _U64(0x00800000):
        return sign
    shift = 126 - np.int64(a >> _U64(23))
    if shift > 24:
        return sign
    mant = (a & _U64(0x7FFFFF)) | _U64(0x800000)
    k = mant >> _U64(shift)
    rem = mant & ((_U64(1) << _U64(shift)) - _U64(1))
    half = _U64(1) << _U64(shift - 1)
    if rem > half or (rem == half and (k & _U64(1)) == _U64(1)):
        k += _U64(1)
    return sign | k


@_jit
def _encode16(x_bits: np.ndarray, mode: int, out: np.ndarray) -> None:
    """float32 bits (n, dim) -> 16-bit bits (n, dim), round to nearest even."""
    for i in range(x_bits.shape[0]):
        for j in range(x_bits.shape[1]):
            u = _U64(x_bits[i, j])
            if mode == _BF16:
                out[i, j] = np.uint16(_f32_to_bf16_rne(u))
            else:
                out[i, j] = np.uint16(_f32_to_f16_rne(u))


@_jit
def _decode16(src: np.ndarray, mode: int, out: np.ndarray) -> None:
    """16-bit bits (n, dim) -> float32 (n, dim), exact."""
    out_bits = out.view(np.uint32)
    for i in range(src.shape[0]):
        if mode == _BF16:
            _bf16_row_to_f32(src[i], out_bits[i])
        else:
            _f16_row_to_f32(src[i], out_bits[i], out[i])


# ---------------------------------------------------------------------------------------------
# float8_e4m3 rows: dim e4m3fn codes, then dim / 32 e8m0 scale bytes


def _e4m3_table() -> np.ndarray:
    """float32 value of each e4m3fn code (1 sign, 4 exponent bits of bias 7, 3 mantissa bits,
    no infinities, 0x7F / 0xFF NaN)."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * np.exp2(e - 7.0))
    val = np.where(c & 0x80, -mag, mag)
    val[(c & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


def _e8m0_table() -> np.ndarray:
    """float32 value 2^(b - 127) of each e8m0 byte b (255: NaN)."""
    val = np.exp2(np.arange(256, dtype=np.float64) - 127)
    val[255] = np.nan
    return val.astype(np.float32)


_E4M3 = _e4m3_table()
_E8M0 = _e8m0_table()


@_inline
def _fp8_block_exponent(amax_bits):
    """e = ceil(log2(amax / 448)) clamped to [-127, 127], from the bits of finite amax >= 0:
    amax = m 2^p with m in [1, 2) needs 2^(p - 8) when m <= 1.75 (448 = 1.75 2^8), else
    2^(p - 7). Zero and float32 denormals (amax < 2^-126) get -127."""
    if amax_bits < 0x00800000:
        return -127
    p = np.int64(amax_bits >> 23) - 127
    e = p - 8 + (1 if (amax_bits & 0x7FFFFF) > 0x600000 else 0)
    return min(max(e, -127), 127)


@_inline
def _e4m3_rne(a):
    """e4m3fn magnitude code of the float32 bits `a` of v in [0, 448], round to nearest even.

    Normal codes (v >= 2^-6, float32 exponent field >= 121) keep 3 mantissa bits; subnormal
    codes count units of 2^-9 (8 carries into code 8 = 2^-6)."""
    e32 = a >> 23
    t = a >> 20
    rem = a & 0xFFFFF
    if rem > 0x80000 or (rem == 0x80000 and (t & 1) == 1):
        t += 1
    normal = t - 960  # 960 = (121 << 3) - (1 << 3): 2^-6 is code 8
    shift = 141 - e32 if e32 >= 117 else 24  # v 2^9 = mantissa / 2^shift
    mant = (a & 0x7FFFFF) | 0x800000
    k = mant >> shift
    rem2 = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem2 > half or (rem2 == half and (k & 1) == 1):
        k += 1
    sub = k if e32 >= 117 else 0
    code = normal if e32 >= 121 else sub
    return min(code, 0x7E)


@_jit
def _fp8_encode(x: np.ndarray, x_bits: np.ndarray, pow2: np.ndarray, out: np.ndarray) -> int:
    """float32 (n, dim) -> fp8 rows (n, dim + dim / 32); returns the flat index of the first
    non-finite value (nothing sensible encodes it), or -1.

    Per block: the exponent from amax's bits, v = |x| * 2^-e in float32 (exact wherever the
    code is not 0: 2^-e is a normal float32 for every finite amax), then the code from v's
    bits, all in integer arithmetic."""
    n, dim = x.shape
    for i in range(n):
        for j in range(dim):
            if (x_bits[i, j] & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000):
                return i * dim + j
    v = np.empty(32, np.float32)
    v_bits = v.view(np.uint32)
    for i in range(n):
        for blk in range(dim // 32):
            lo = blk * 32
            amax = np.int64(0)
            for j in range(32):
                amax = max(amax, np.int64(x_bits[i, lo + j] & np.uint32(0x7FFFFFFF)))
            e = _fp8_block_exponent(amax)
            out[i, dim + blk] = np.uint8(e + 127)
            f = pow2[127 - e]  # 2^-e
            for j in range(32):
                v[j] = abs(x[i, lo + j]) * f
            for j in range(32):
                code = _e4m3_rne(np.int64(v_bits[j]))
                sign = np.int64(x_bits[i, lo + j] >> np.uint32(31)) << 7
                out[i, lo + j] = np.uint8(code | sign)
    return -1


@_jit
def _fp8_decode(buf: np.ndarray, lut4: np.ndarray, lut8: np.ndarray, out: np.ndarray) -> None:
    n, dim = out.shape
    for i in range(n):
        for j in range(dim):
            out[i, j] = lut4[buf[i, j]] * lut8[buf[i, dim + j // 32]]


# ---------------------------------------------------------------------------------------------
# optimizer rows, inlined into the step kernels: w is the float32 row (updated in place), st its
# state row, g its gradient, h the step's float32 hyper-parameters (a tuple, see _hyper)


@_inline
def _sgd_row(w, st, g, h):
    """p += g * (-lr)."""
    for j in range(w.shape[0]):
        w[j] = w[j] + g[j] * h[0]


@_inline
def _adagrad_row(w, st, g, h):
    """torch's sparse Adagrad: s += g^2; p += (g / (sqrt(s) + eps)) * (-clr)."""
    for j in range(w.shape[0]):
        gj = g[j]
        sj = st[j] + gj * gj
        st[j] = sj
        w[j] = w[j] + (gj / (np.sqrt(sj) + h[1])) * h[0]


@_inline
def _adam_row(w, st, g, h):
    """torch's SparseAdam: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
    p += (m / (sqrt(v) + eps)) * (-step_size)."""
    dim = w.shape[0]
    for j in range(dim):
        gj = g[j]
        m = st[j]
        v = st[dim + j]
        m = m + (gj - m) * h[2]
        v = v + (gj * gj - v) * h[3]
        st[j] = m
        st[dim + j] = v
        w[j] = w[j] + (m / (np.sqrt(v) + h[1])) * h[0]


@_inline
def _mean_sq(g) -> np.float32:
    """mean(g^2) over a row, summed in column order in float32 (FBGEMM's CPU loop)."""
    acc = np.float32(0.0)
    for j in range(g.shape[0]):
        acc += g[j] * g[j]
    return acc / np.float32(g.shape[0])


@_inline
def _rowwise_adagrad_row(w, st, g, h):
    """EXACT_ROWWISE_ADAGRAD: a += mean(g^2); p -= g * (clr / (sqrt(a) + eps))."""
    a = st[0] + _mean_sq(g)
    st[0] = a
    mult = h[0] / (np.sqrt(a) + h[1])
    for j in range(w.shape[0]):
        w[j] = w[j] - g[j] * mult


@_inline
def _rowwise_adam_row(w, st, g, h):
    """PARTIAL_ROWWISE_ADAM: v = v b2 + mean(g^2)(1 - b2); m = m b1 + g (1 - b1);
    p -= lr (m / bc1 / (sqrt(v / bc2) + eps))."""
    dim = w.shape[0]
    v = st[dim] * h[5] + _mean_sq(g) * h[3]
    st[dim] = v
    den = np.sqrt(v / h[7]) + h[1]
    for j in range(dim):
        m = st[j] * h[4] + g[j] * h[2]
        st[j] = m
        w[j] = w[j] - h[0] * (m / h[6] / den)


@_inline
def _bf16_store_sr(src_bits, r16, dst):
    """dst = bfloat16 bits of float32 bits src_bits, stochastically rounded with 16 random bits
    per column: adding them below the kept mantissa and truncating rounds the magnitude up with
    probability equal to the distance to the lower neighbour (a carry moves into the exponent as
    it should; above the largest finite bfloat16 the upper neighbour is inf). Inf stays inf, NaN
    a quiet NaN."""
    for j in range(dst.shape[0]):
        u = np.uint32(src_bits[j])
        nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        quiet = (u >> np.uint32(16)) | np.uint32(0x0040)
        dst[j] = np.uint16(quiet if nan else (u + np.uint32(r16[j])) >> np.uint32(16))


@_inline
def _f16_store_sr(src_bits, r16, dst):
    """dst = float16 bits of float32 bits src_bits, rounded to the lower or upper neighbouring
    float16 with probability by distance, 16 random bits per column (selects, not branches, so
    the loop vectorises).

    Normal range: the 13 float32 mantissa bits below float16's are dropped after adding 13
    random bits (exact probabilities; a carry into the exponent is the upper neighbour, and the
    upper neighbour of 65504 is inf, as in IEEE arithmetic); |x| >= 65536 and inf give inf.
    Subnormal range (|x| < 2^-14): the value in units of 2^-24 is rounded up with probability
    equal to its fraction, to 16 random bits (float32 denormals round to zero). NaN stays NaN."""
    for j in range(dst.shape[0]):
        u = np.int64(src_bits[j])
        r = np.int64(r16[j])
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        norm = ((a + (r & 0x1FFF)) >> 13) - 0x1C000
        e = 126 - (a >> 23)
        shift = 0 if e < 0 else (40 if e > 40 else e)
        mant = (a & 0x7FFFFF) | 0x800000
        sub = (mant + ((r << 24) >> (40 - shift))) >> shift
        res = sub if shift < 40 and a >= 0x00800000 else 0
        res = norm if a >= 0x38800000 else res
        res = 0x7C00 if a >= 0x47800000 else res
        res = 0x7E00 if a > 0x7F800000 else res
        dst[j] = np.uint16(sign | res)


@intrinsic
def _prefetch_intrinsic(typingctx, arr, row, byte):
    """Prefetch (for writing, into all cache levels) the cache line at byte `byte` of row `row`
    of a 2-D array: the next rows' loads overlap this row's arithmetic."""
    sig = types.void(arr, row, byte)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        r = context.cast(builder, args[1], signature.args[1], types.intp)
        b = context.cast(builder, args[2], signature.args[2], types.intp)
        stride = builder.extract_value(ary.strides, 0)
        addr = builder.add(builder.ptrtoint(ary.data, intp), builder.add(builder.mul(r, stride), b))
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.inttoptr(addr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


_prefetch: Any = _prefetch_intrinsic  # called as _prefetch(arr, row, byte) in compiled code

#: rows ahead of the current one whose lines are prefetched
_PREFETCH_ROWS = 8


@_jit
def _first_bad(offs: np.ndarray, cap: int) -> int:
    for i in range(offs.shape[0]):
        if offs[i] < 0 or offs[i] >= cap:
            return i
    return -1


@_jit
def _step_f32(kind, rows, state, offs, grads, hp) -> int:
    """One optimizer step on float32 rows offs[i] (in place) with gradient grads[i]; returns the
    index of the first offset out of range (nothing changed), or -1.

    One row loop per optimizer, each prefetching the row and state lines _PREFETCH_ROWS rows
    ahead, written out in full: measured, a branch on the optimizer inside the loop, or the
    prefetch in a helper function (inlined or not), makes a cached Adam row 2-3x slower."""
    n = offs.shape[0]
    bad = _first_bad(offs, rows.shape[0])
    if bad >= 0:
        return bad
    h = (hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7])
    rb, sb, ahead = 4 * rows.shape[1], 4 * state.shape[1], _PREFETCH_ROWS
    if kind == 0:
        for i in range(n):
            if i + ahead < n:
                for b in range(0, rb, 64):
                    _prefetch(rows, offs[i + ahead], b)
            _sgd_row(rows[offs[i]], state[offs[i]], grads[i], h)
    elif kind == 1:
        for i in range(n):
            if i + ahead < n:
                for b in range(0, rb, 64):
                    _prefetch(rows, offs[i + ahead], b)
                for b in range(0, sb, 64):
                    _prefetch(state, offs[i + ahead], b)
            _adagrad_row(rows[offs[i]], state[offs[i]], grads[i], h)
    elif kind == 2:
        for i in range(n):
            if i + ahead < n:
                for b in range(0, rb, 64):
                    _prefetch(rows, offs[i + ahead], b)
                for b in range(0, sb, 64):
                    _prefetch(state, offs[i + ahead], b)
            _adam_row(rows[offs[i]], state[offs[i]], grads[i], h)
    elif kind == 3:
        for i in range(n):
            if i + ahead < n:
                for b in range(0, rb, 64):
                    _prefetch(rows, offs[i + ahead], b)
                _prefetch(state, offs[i + ahead], 0)
            _rowwise_adagrad_row(rows[offs[i]], state[offs[i]], grads[i], h)
    else:
        for i in range(n):
            if i + ahead < n:
                for b in range(0, rb, 64):
                    _prefetch(rows, offs[i + ahead], b)
                for b in range(0, sb, 64):
                    _prefetch(state, offs[i + ahead], b)
            _rowwise_adam_row(rows[offs[i]], state[offs[i]], grads[i], h)
    return -1


@_inline
def _step_row(kind, w, st, g, h):
    """Dispatch one row to its optimizer (inside a 16-bit row loop the branch costs little
    next to decoding, hashing and rounding the row)."""
    if kind == 0:
        _sgd_row(w, st, g, h)
    elif kind == 1:
        _adagrad_row(w, st, g, h)
    elif kind == 2:
        _adam_row(w, st, g, h)
    elif kind == 3:
        _rowwise_adagrad_row(w, st, g, h)
    else:
        _rowwise_adam_row(w, st, g, h)


@_jit
def _step_bf16(kind, rows, state, offs, ids, grads, hp, salt, step) -> int:
    """One optimizer step on bfloat16 rows (uint16 bits) offs[i]: decoded to float32, stepped
    as float32 rows are, written back with stochastic rounding whose bits are the counter hash
    of (seed salt, ids[i], step, column). Returns as _step_f32. bfloat16 and float16 have a
    kernel each: a branch on the format inside the row loop doubles its cost."""
    n = offs.shape[0]
    bad = _first_bad(offs, rows.shape[0])
    if bad >= 0:
        return bad
    h = (hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7])
    rb, sb, ahead = 2 * rows.shape[1], 4 * state.shape[1], _PREFETCH_ROWS
    w = np.empty(grads.shape[1], np.float32)
    w_bits = w.view(np.uint32)
    words = np.empty((grads.shape[1] + 3) // 4, np.uint64)
    r16 = words.view(np.uint16)  # column c's 16 random bits: bits (c % 4) * 16 of word c // 4
    for i in range(n):
        if i + ahead < n:
            for b in range(0, rb, 64):
                _prefetch(rows, offs[i + ahead], b)
            for b in range(0, sb, 64):
                _prefetch(state, offs[i + ahead], b)
        o = offs[i]
        _bf16_row_to_f32(rows[o], w_bits)
        _step_row(kind, w, state[o], grads[i], h)
        _sr_bits(salt, ids[i], step, words)
        _bf16_store_sr(w_bits, r16, rows[o])
    return -1


@_jit
def _step_f16(kind, rows, state, offs, ids, grads, hp, salt, step) -> int:
    """_step_bf16 for float16 rows."""
    n = offs.shape[0]
    bad = _first_bad(offs, rows.shape[0])
    if bad >= 0:
        return bad
    h = (hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7])
    rb, sb, ahead = 2 * rows.shape[1], 4 * state.shape[1], _PREFETCH_ROWS
    w = np.empty(grads.shape[1], np.float32)
    w_bits = w.view(np.uint32)
    words = np.empty((grads.shape[1] + 3) // 4, np.uint64)
    r16 = words.view(np.uint16)
    for i in range(n):
        if i + ahead < n:
            for b in range(0, rb, 64):
                _prefetch(rows, offs[i + ahead], b)
            for b in range(0, sb, 64):
                _prefetch(state, offs[i + ahead], b)
        o = offs[i]
        _f16_row_to_f32(rows[o], w_bits, w)
        _step_row(kind, w, state[o], grads[i], h)
        _sr_bits(salt, ids[i], step, words)
        _f16_store_sr(w_bits, r16, rows[o])
    return -1


# ---------------------------------------------------------------------------------------------
# gather / scatter


@_jit
def _gather(rows: np.ndarray, offs: np.ndarray, out: np.ndarray) -> int:
    """out[i] = rows[offs[i]] (uint8 rows), prefetching _PREFETCH_ROWS rows ahead; returns the
    index of the first offset out of range (nothing written), or -1."""
    n = offs.shape[0]
    bad = _first_bad(offs, rows.shape[0])
    if bad >= 0:
        return bad
    width, ahead = rows.shape[1], _PREFETCH_ROWS
    for i in range(n):
        if i + ahead < n:
            for b in range(0, width, 64):
                _prefetch(rows, offs[i + ahead], b)
        src = rows[offs[i]]
        dst = out[i]
        for j in range(width):
            dst[j] = src[j]
    return -1


@_jit
def _scatter(rows: np.ndarray, offs: np.ndarray, src: np.ndarray) -> int:
    """rows[offs[i]] = src[i], as _gather; all offsets are checked before the first write."""
    n = offs.shape[0]
    bad = _first_bad(offs, rows.shape[0])
    if bad >= 0:
        return bad
    width, ahead = rows.shape[1], _PREFETCH_ROWS
    for i in range(n):
        if i + ahead < n:
            for b in range(0, width, 64):
                _prefetch(rows, offs[i + ahead], b)
        dst = rows[offs[i]]
        s = src[i]
        for j in range(width):
            dst[j] = s[j]
    return -1


# ---------------------------------------------------------------------------------------------
# checksum


@_jit
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << _U64(r)) | (x >> _U64(64 - r))


@_jit
def _word(b: np.ndarray, p: int) -> np.uint64:
    """The little-endian uint64 at byte p of b."""
    return (
        _U64(b[p])
        | (_U64(b[p + 1]) << _U64(8))
        | (_U64(b[p + 2]) << _U64(16))
        | (_U64(b[p + 3]) << _U64(24))
        | (_U64(b[p + 4]) << _U64(32))
        | (_U64(b[p + 5]) << _U64(40))
        | (_U64(b[p + 6]) << _U64(48))
        | (_U64(b[p + 7]) << _U64(56))
    )


@_jit
def _lane(v: np.uint64, w: np.uint64) -> np.uint64:
    """One lane round; a bijection of v for fixed w and of w for fixed v, so a lane's final
    value changes whenever exactly one of its words does."""
    return _rotl(v + w * _C1, 29) * _G


@_jit
def _checksum(b: np.ndarray) -> np.uint64:
    n = b.shape[0]
    v0, v1, v2, v3 = _G2, _C2, _G3, _SR_DOMAIN
    p = 0
    while p + 32 <= n:
        v0 = _lane(v0, _word(b, p))
        v1 = _lane(v1, _word(b, p + 8))
        v2 = _lane(v2, _word(b, p + 16))
        v3 = _lane(v3, _word(b, p + 24))
        p += 32
    # merge: a bijection of each lane for fixed others, then the length
    h = _rotl(v0, 1) + _rotl(v1, 17) + _rotl(v2, 31) + _rotl(v3, 47)
    h = h * _G2 + _U64(n)
    while p + 8 <= n:
        h = _lane(h ^ _C2, _word(b, p))
        p += 8
    if p < n:
        w = _U64(0)
        for k in range(n - p):
            w |= _U64(b[p + k]) << _U64(8 * k)
        h = _lane(h ^ _G3, w)
    return _fmix64(h)


# ---------------------------------------------------------------------------------------------
# public API


def _as_rows(buf, width: int, what: str) -> np.ndarray:
    """uint8 (n, width) view of a uint8 array or bytes-like object of whole rows."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8:
            raise InvalidArgument(f"{what} must be uint8, got {buf.dtype}")
        if buf.ndim == 2:
            if buf.shape[1] != width:
                raise InvalidArgument(
                    f"{what} has rows of {buf.shape[1]} bytes; this dtype and dim need {width}"
                )
            return np.ascontiguousarray(buf)
        arr = np.ascontiguousarray(buf.reshape(-1))
    else:
        arr = np.frombuffer(buf, np.uint8)
    if arr.shape[0] % width:
        raise InvalidArgument(
            f"{what}: {arr.shape[0]} bytes are not whole rows of {width} bytes; "
            "fix the dtype or dim, or send whole rows"
        )
    return arr.reshape(-1, width)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype {dtype!r} is unknown; use one of {DTYPES}")


def _check_dim(dtype: str, dim: int) -> None:
    if dim <= 0:
        raise InvalidArgument(f"dim={dim} must be > 0")
    if dtype == "float8_e4m3" and dim % FP8_BLOCK:
        raise InvalidArgument(
            f"float8_e4m3 rows carry one scale per {FP8_BLOCK} values: dim={dim} must be a "
            f"multiple of {FP8_BLOCK}"
        )


def _out_rows(out, shape: tuple[int, int], dtype, what: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape:
        raise InvalidArgument(f"{what}: out must be a {np.dtype(dtype)} array of shape {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidArgument(f"{what}: out must be a writeable C-contiguous array")
    return out


def encode(x: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Rows in storage dtype `dtype`, uint8 (n, row_bytes(dtype, dim)), of float32 (n, dim) `x`.

    bfloat16 / float16: round to nearest even (inf and NaN kept, float16 overflow to inf).
    float8_e4m3: per block of 32 values, amax, e = ceil(log2(amax / 448)) clamped to [-127, 127]
    (an all-zero block gets e = -127, the byte 0, the smallest scale e8m0 holds; a block with
    amax below 448 * 2^-127 gets it too and underflows towards zero), scale byte e + 127 after
    the dim codes, codes the e4m3fn values of x / 2^e rounded to nearest even and saturated to
    +-448. Non-finite values have no float8_e4m3 encoding: InvalidArgument.
    """
    _check_dtype(dtype)
    x = np.asarray(x)
    if x.ndim != 2:
        raise InvalidArgument(f"encode takes float32 rows (n, dim), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, dim = x.shape
    _check_dim(dtype, dim)
    out = _out_rows(out, (n, row_bytes(dtype, dim)), np.uint8, "encode")
    if dtype == "float32":
        out.view(np.float32)[...] = x
    elif dtype == "float8_e4m3":
        bad = _fp8_encode(x, x.view(np.uint32), _E8M0, out)
        if bad >= 0:
            raise InvalidArgument(
                f"row {bad // dim} column {bad % dim} is {x.flat[bad]}: float8_e4m3 holds only "
                "finite values; fix the rows before exporting them to float8_e4m3"
            )
    else:
        _encode16(x.view(np.uint32), _MODES[dtype], out.view(np.uint16))
    return out


def decode(buf, dtype: str, dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, dim) values of rows in dtype `dtype` (uint8 (n, row_bytes), a flat uint8
    array or a bytes-like object of whole rows); exact (a float8 scale byte 255 decodes to NaN,
    a scale too large for a code may overflow float32 to inf)."""
    _check_dtype(dtype)
    _check_dim(dtype, dim)
    rows = _as_rows(buf, row_bytes(dtype, dim), "decode")
    out = _out_rows(out, (rows.shape[0], dim), np.float32, "decode")
    if dtype == "float32":
        out[...] = rows.view(np.float32)
    elif dtype == "float8_e4m3":
        _fp8_decode(rows, _E4M3, _E8M0, out)
    else:
        _decode16(rows.view(np.uint16), _MODES[dtype], out)
    return out


_CONVERT_CHUNK = 4096


def convert(buf, src: str, dst: str, dim: int, out: np.ndarray) -> np.ndarray:
    """Rows in dtype `src` as rows in dtype `dst`, written into uint8 `out` (n,
    row_bytes(dst, dim)): exact where `dst` holds the values, else rounded as encode() rounds.
    src == dst copies."""
    _check_dtype(src)
    _check_dtype(dst)
    _check_dim(src, dim)
    _check_dim(dst, dim)
    rows = _as_rows(buf, row_bytes(src, dim), "convert")
    n = rows.shape[0]
    out = _out_rows(out, (n, row_bytes(dst, dim)), np.uint8, "convert")
    if src == dst:
        out[...] = rows
    elif dst == "float32":
        decode(rows, src, dim, out.view(np.float32))
    elif src == "float32":
        encode(rows.view(np.float32), dst, out)
    else:
        tmp = np.empty((min(n, _CONVERT_CHUNK), dim), np.float32)
        for lo in range(0, n, _CONVERT_CHUNK):
            hi = min(n, lo + _CONVERT_CHUNK)
            t = tmp[: hi - lo]
            decode(rows[lo:hi], src, dim, t)
            encode(t, dst, out[lo:hi])
    return out


def _byte_rows(a: np.ndarray, what: str) -> np.ndarray:
    """uint8 (n, width in bytes) view of a 2-D C-contiguous array of any dtype."""
    if not isinstance(a, np.ndarray) or a.ndim != 2:
        raise InvalidArgument(f"{what} must be a 2-D array")
    if not a.flags.c_contiguous:
        raise InvalidArgument(f"{what} must be C-contiguous")
    return a.view(np.uint8)


def _offsets(offs: np.ndarray, what: str = "offs") -> np.ndarray:
    offs = np.asarray(offs)
    if offs.ndim != 1 or offs.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be a 1-D integer array, got {offs.dtype} {offs.shape}")
    return np.ascontiguousarray(offs, dtype=np.int64)


def _bad_offset(offs: np.ndarray, i: int, cap: int) -> InvalidArgument:
    return InvalidArgument(f"offset {offs[i]} (position {i}) is outside the {cap} rows")


def gather(rows: np.ndarray, offs: np.ndarray, out: np.ndarray) -> None:
    """out[i] = rows[offs[i]] for 2-D C-contiguous arrays of one dtype (any row width)."""
    offs = _offsets(offs)
    if not isinstance(out, np.ndarray) or not isinstance(rows, np.ndarray):
        raise InvalidArgument("gather takes numpy arrays")
    if out.dtype != rows.dtype or out.shape != (offs.shape[0],) + rows.shape[1:]:
        raise InvalidArgument(
            f"gather out is {out.dtype} {out.shape}; {rows.dtype} "
            f"{(offs.shape[0],) + rows.shape[1:]} needed"
        )
    if not out.flags.writeable:
        raise InvalidArgument("gather out must be writeable")
    bad = _gather(_byte_rows(rows, "rows"), offs, _byte_rows(out, "out"))
    if bad >= 0:
        raise _bad_offset(offs, bad, rows.shape[0])


def scatter(rows: np.ndarray, offs: np.ndarray, src: np.ndarray) -> None:
    """rows[offs[i]] = src[i] for 2-D C-contiguous arrays of one dtype; all offsets are checked
    before any row is written."""
    offs = _offsets(offs)
    if not isinstance(src, np.ndarray) or not isinstance(rows, np.ndarray):
        raise InvalidArgument("scatter takes numpy arrays")
    if src.dtype != rows.dtype or src.shape != (offs.shape[0],) + rows.shape[1:]:
        raise InvalidArgument(
            f"scatter src is {src.dtype} {src.shape}; {rows.dtype} "
            f"{(offs.shape[0],) + rows.shape[1:]} needed"
        )
    if not rows.flags.writeable:
        raise InvalidArgument("scatter rows must be writeable")
    src = np.ascontiguousarray(src)
    bad = _scatter(_byte_rows(rows, "rows"), offs, _byte_rows(src, "src"))
    if bad >= 0:
        raise _bad_offset(offs, bad, rows.shape[0])


def checksum(buf) -> int:
    """64-bit integrity checksum of a bytes-like object or C-contiguous array (its bytes).

    Four lanes each take every fourth little-endian 64-bit word of the 32-byte stripes through
    v <- rotl(v + w * C1, 29) * G; the lanes merge by rotations and a sum, the length is added,
    the remaining words and bytes go through the same round, and MurmurHash3's finaliser
    avalanches the result. Every round is a bijection of the state for a fixed word and of the
    word for a fixed state, so a change confined to one 64-bit word (any single flipped bit)
    always changes the checksum; other damage, truncation included, escapes with probability
    ~2^-64. Integer-only and byte-order explicit: the same value on every platform.
    """
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise InvalidArgument("checksum of an array needs a C-contiguous array")
        b = buf.reshape(-1).view(np.uint8)
    else:
        try:
            b = np.frombuffer(buf, np.uint8)
        except (TypeError, ValueError, BufferError) as e:
            raise InvalidArgument(f"checksum needs contiguous bytes: {e}") from None
    return int(_checksum(b))


def _hyper(spec: TableConfig, step: int) -> np.ndarray:
    """The float32 hyper-parameters of one step, in the slots the row functions read: sgd
    (-lr); adagrad (-clr, eps); adam (-step_size, eps, 1 - b1, 1 - b2); rowwise_adagrad (clr,
    eps); rowwise_adam (lr, eps, 1 - b1, 1 - b2, b1, b2, 1 - b1^t, 1 - b2^t)."""
    opt = spec.optimizer
    hp = np.zeros(8, np.float32)
    eps = opt.resolved_eps
    b1, b2 = opt.beta1, opt.beta2
    if opt.kind == "sgd":
        hp[0] = -opt.lr
    elif opt.kind in ("adagrad", "rowwise_adagrad"):
        clr = opt.lr / (1 + (step - 1) * opt.lr_decay)
        hp[0] = -clr if opt.kind == "adagrad" else clr
        hp[1] = eps
    elif opt.kind == "adam":
        hp[0] = -(opt.lr * math.sqrt(1 - b2**step) / (1 - b1**step))
        hp[1], hp[2], hp[3] = eps, 1 - b1, 1 - b2
    else:  # rowwise_adam
        hp[0], hp[1], hp[2], hp[3] = opt.lr, eps, 1 - b1, 1 - b2
        hp[4], hp[5], hp[6], hp[7] = b1, b2, 1 - b1**step, 1 - b2**step
    return hp


def _salt(seed: int) -> np.uint64:
    return _U64(int(_fmix64(_U64(seed & 0xFFFFFFFFFFFFFFFF) ^ _SR_DOMAIN)))


def optimizer_step(
    spec: TableConfig,
    rows: np.ndarray,
    state: np.ndarray,
    offs: np.ndarray,
    ids: np.ndarray,
    grads: np.ndarray,
    step: int,
) -> None:
    """In place: one step of spec.optimizer on rows[offs[i]] and state[offs[i]] with gradient
    grads[i].

    rows: uint8 (cap, spec.row_bytes) C-contiguous in storage dtype spec.dtype; state: float32
    (cap, spec.state_floats) C-contiguous (cap x 0 for sgd); offs: int64 (m,) distinct (not
    checked: a repeated offset is stepped twice, in order); ids: int64 (m,) the global row ids,
    which seed the stochastic rounding of bfloat16 / float16 rows; grads: float32 (m, dim);
    step >= 1, the push's 1-based step. Releases the GIL: threads may run it on disjoint offsets.
    Bad arguments raise InvalidArgument and change nothing.

    float8_e4m3 tables are read-only: their rows are imported dequantized to bfloat16 / float32
    to train and quantized again on export, because an 8-bit row with a per-32 scale cannot hold
    the small steps of training (most updates would round away; stochastic rounding would make
    them noise as large as the row's quantisation step).
    """
    if spec.dtype == "float8_e4m3":
        raise InvalidArgument(
            f"table {spec.name!r} is stored as float8_e4m3, which is read-only: import it as "
            "bfloat16 or float32 to train it, and export it to float8_e4m3 afterwards"
        )
    if spec.dtype not in _MODES:
        raise InvalidArgument(f"storage dtype {spec.dtype!r} is unknown; use one of {DTYPES}")
    if spec.optimizer.kind not in _KINDS:
        raise InvalidArgument(f"optimizer {spec.optimizer.kind!r} is unknown")
    if step < 1:
        raise InvalidArgument(f"optimizer step {step} must be >= 1")
    dim = spec.dim
    for name, a, dt, width in (
        ("rows", rows, np.uint8, spec.row_bytes),
        ("state", state, np.float32, spec.state_floats),
        ("grads", grads, np.float32, dim),
    ):
        if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != 2 or a.shape[1] != width:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise InvalidArgument(f"{name} must be {np.dtype(dt)} (n, {width}), got {got}")
        if not a.flags.c_contiguous:
            raise InvalidArgument(f"{name} must be C-contiguous")
    if not rows.flags.writeable or not state.flags.writeable:
        raise InvalidArgument("rows and state must be writeable")
    if state.shape[0] != rows.shape[0]:
        raise InvalidArgument(f"state has {state.shape[0]} rows, rows {rows.shape[0]}")
    offs = _offsets(offs)
    ids = _offsets(ids, "ids")
    m = offs.shape[0]
    if ids.shape[0] != m or grads.shape[0] != m:
        raise InvalidArgument(
            f"offs, ids and grads must have one entry per row: {m}, {ids.shape[0]}, "
            f"{grads.shape[0]}"
        )
    kind = _KINDS[spec.optimizer.kind]
    hp = _hyper(spec, step)
    if spec.dtype == "float32":
        bad = _step_f32(kind, rows.view(np.float32), state, offs, grads, hp)
    else:
        step16 = _step_bf16 if spec.dtype == "bfloat16" else _step_f16
        bad = step16(
            kind, rows.view(np.uint16), state, offs, ids, grads, hp, _salt(spec.seed), step
        )
    if bad >= 0:
        raise _bad_offset(offs, bad, rows.shape[0])
