"""engine.kernels: the fused optimizer step against optimizers.py and torch.optim, stochastic
rounding of bfloat16 / float16 rows, the row encodings, gather / scatter and the checksum."""

import os
import threading

import numpy as np
import pytest
import torch

from engram_store.engine import kernels, optimizers
from engram_store.engine.config import OptimizerConfig, TableConfig, row_bytes
from engram_store.engine.errors import InvalidArgument
from tests.engine.torch_ref import torch_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

CAP, ROWS, DIM, STEPS = 500, 300, 8, 6


def _table(kind: str, dtype: str = "float32", dim: int = DIM, **opt) -> TableConfig:
    return TableConfig(
        "t", num_rows=10**6, dim=dim, dtype=dtype, seed=7, optimizer=OptimizerConfig(kind, **opt)
    )


def _arrays(spec: TableConfig, rng, cap: int = CAP):
    """rows (storage dtype, uint8) and state filled with plausible values (accumulators >= 0)."""
    x = rng.standard_normal((cap, spec.dim)).astype(np.float32)
    rows = kernels.encode(x, spec.dtype)
    state = np.abs(rng.standard_normal((cap, spec.state_floats))).astype(np.float32) * 0.1
    return rows, state


def _torch_state(opt: OptimizerConfig, topt, weight) -> np.ndarray:
    if opt.kind == "sgd":
        return np.zeros((ROWS, 0), np.float32)
    st = topt.state[weight]
    if opt.kind == "adagrad":
        return st["sum"].numpy()
    return np.concatenate([st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()], axis=1)


@pytest.mark.parametrize(
    "opt",
    [
        OptimizerConfig(kind="sgd", lr=0.1),
        OptimizerConfig(kind="adagrad", lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
        OptimizerConfig(kind="adagrad", lr=0.5),
        OptimizerConfig(kind="adam", lr=0.01),
        OptimizerConfig(kind="adam", lr=0.003, beta1=0.8, beta2=0.99, eps=1e-6),
    ],
    ids=["sgd", "adagrad-decay", "adagrad", "adam", "adam-betas"],
)
def test_float32_step_matches_reference_and_torch(opt):
    """Rows scattered at random offsets of larger arrays, several steps of distinct ids: the
    kernel equals optimizers.apply bit for bit and torch.optim to 1e-6, rows and state."""
    spec = TableConfig("t", num_rows=ROWS, dim=DIM, optimizer=opt)
    rng = np.random.default_rng(0)
    where = rng.permutation(CAP)[:ROWS]  # row id r lives at offset where[r]
    init = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    rows = np.zeros((CAP, spec.row_bytes), np.uint8)
    rows.view(np.float32)[where] = init
    state = np.zeros((CAP, spec.state_floats), np.float32)
    if opt.kind == "adagrad":
        state[where] = opt.initial_accumulator_value
    ref_rows, ref_state = init.copy(), state[where].copy()
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(init))
    topt = torch_optimizer(opt, emb.parameters())
    for step in range(1, STEPS + 1):
        ids = rng.permutation(ROWS)[: 100 + 30 * step].astype(np.int64)
        grads = rng.standard_normal((ids.shape[0], DIM)).astype(np.float32)
        topt.zero_grad()
        (emb(torch.from_numpy(ids)) * torch.from_numpy(grads)).sum().backward()
        topt.step()
        kernels.optimizer_step(spec, rows, state, where[ids], ids, grads, step)
        ref_rows[ids], ref_state[ids] = optimizers.apply(
            opt, ref_rows[ids], ref_state[ids], grads, step
        )
        ours = rows.view(np.float32)[where]
        np.testing.assert_array_equal(ours, ref_rows)
        np.testing.assert_array_equal(state[where], ref_state)
        np.testing.assert_allclose(ours, emb.weight.detach().numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            state[where], _torch_state(opt, topt, emb.weight), rtol=0, atol=1e-6
        )
    untouched = np.setdiff1d(np.arange(CAP), where)
    assert not rows[untouched].any() and not state[untouched].any()


def _rowwise_adagrad_f64(opt, rows, acc, g, step):
    """EXACT_ROWWISE_ADAGRAD in float64, straight from the formula."""
    lr = opt.lr / (1 + (step - 1) * opt.lr_decay)
    acc = acc + (g.astype(np.float64) ** 2).mean(axis=1, keepdims=True)
    return rows - lr * g / (np.sqrt(acc) + opt.resolved_eps), acc


def _rowwise_adam_f64(opt, rows, state, g, step):
    """PARTIAL_ROWWISE_ADAM in float64, straight from the formula."""
    dim = rows.shape[1]
    b1, b2 = opt.beta1, opt.beta2
    m = b1 * state[:, :dim] + (1 - b1) * g
    v = b2 * state[:, dim:] + (1 - b2) * (g.astype(np.float64) ** 2).mean(axis=1, keepdims=True)
    mhat, vhat = m / (1 - b1**step), v / (1 - b2**step)
    return rows - opt.lr * mhat / (np.sqrt(vhat) + opt.resolved_eps), np.hstack([m, v])


@pytest.mark.parametrize(
    "opt",
    [
        OptimizerConfig(kind="rowwise_adagrad", lr=0.05, initial_accumulator_value=0.1),
        OptimizerConfig(kind="rowwise_adagrad", lr=0.3, lr_decay=0.05),
        OptimizerConfig(kind="rowwise_adam", lr=0.01),
        OptimizerConfig(kind="rowwise_adam", lr=0.003, beta1=0.8, beta2=0.99, eps=1e-6),
    ],
    ids=["rowwise_adagrad", "rowwise_adagrad-decay", "rowwise_adam", "rowwise_adam-betas"],
)
def test_rowwise_optimizers(opt):
    """Row-wise Adagrad / Adam: the kernel equals the numpy reference bit for bit and the
    float64 formula to float32 rounding, over several lazy steps; state is 1 / dim + 1 floats."""
    dim = 24
    spec = TableConfig("t", num_rows=ROWS, dim=dim, optimizer=opt)
    assert spec.state_floats == (1 if opt.kind == "rowwise_adagrad" else dim + 1)
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((ROWS, dim)).astype(np.float32)
    state = np.zeros((ROWS, spec.state_floats), np.float32)
    state[:] = opt.initial_accumulator_value if opt.kind == "rowwise_adagrad" else 0
    buf = rows.view(np.uint8).copy()
    kstate = state.copy()
    f64_rows, f64_state = rows.astype(np.float64), state.astype(np.float64)
    for step in range(1, STEPS + 1):
        ids = rng.permutation(ROWS)[:150].astype(np.int64)
        g = rng.standard_normal((150, dim)).astype(np.float32)
        kernels.optimizer_step(spec, buf, kstate, ids, ids, g, step)
        rows[ids], state[ids] = optimizers.apply(opt, rows[ids], state[ids], g, step)
        f = _rowwise_adagrad_f64 if opt.kind == "rowwise_adagrad" else _rowwise_adam_f64
        f64_rows[ids], f64_state[ids] = f(opt, f64_rows[ids], f64_state[ids], g, step)
        np.testing.assert_array_equal(buf.view(np.float32), rows)
        np.testing.assert_array_equal(kstate, state)
        np.testing.assert_allclose(rows, f64_rows, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state, f64_state, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam", "rowwise_adagrad", "rowwise_adam"])
def test_low_precision_step_is_float32_step_then_one_rounding(dtype, kind):
    """A 16-bit row is decoded, stepped in float32 exactly like a float32 row (state equal bit
    for bit), and written back as one of the two neighbours of the float32 result."""
    spec = _table(kind, dtype, dim=36, lr=0.05)
    rng = np.random.default_rng(2)
    rows, state = _arrays(spec, rng, cap=200)
    offs = rng.permutation(200)[:120].astype(np.int64)
    ids = offs * 1000 + 3
    g = rng.standard_normal((120, 36)).astype(np.float32)
    before = kernels.decode(rows[offs], dtype, 36)
    ref_rows, ref_state = optimizers.apply(spec.optimizer, before, state[offs], g, 4)
    kernels.optimizer_step(spec, rows, state, offs, ids, g, 4)
    np.testing.assert_array_equal(state[offs], ref_state)
    got = kernels.decode(rows[offs], dtype, 36)
    lo, hi = _neighbours(ref_rows, dtype)
    assert np.all((got == lo) | (got == hi))


def _neighbours(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The largest `dtype` value <= x and the smallest >= x (float32, finite x)."""
    if dtype == "bfloat16":
        t = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # towards zero
        up = (t.view(np.uint32) + np.uint32(0x10000)).view(np.float32)  # away from zero
        exact = t == x
        away = np.where(exact, t, up)
        return np.where(x >= 0, t, away), np.where(x >= 0, away, t)
    h = x.astype(np.float16)  # nearest; step to the other side where needed
    below = np.where(h.astype(np.float32) > x, np.nextafter(h, np.float16(-np.inf)), h)
    above = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    return below.astype(np.float32), above.astype(np.float32)


def _set_rows(spec: TableConfig, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Storage rows holding exactly the float32 values x after one SGD step from zero rows with
    lr 1 (rows = -grads): what stochastic rounding makes of x."""
    rows = np.zeros((x.shape[0], spec.row_bytes), np.uint8)
    state = np.zeros((x.shape[0], 0), np.float32)
    kernels.optimizer_step(
        spec, rows, state, np.arange(x.shape[0]), ids, np.ascontiguousarray(-x), 1
    )
    return kernels.decode(rows, spec.dtype, spec.dim)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stochastic_rounding_is_unbiased(dtype):
    """Over many rows the rounding error averages to zero (5 sigma bound) and each value rounds
    up with probability equal to its distance from the lower neighbour."""
    spec = _table("sgd", dtype, dim=32, lr=1.0)
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 4, 32).astype(np.float32)
    n = 4000
    x = np.tile(base, (n, 1))
    lo, hi = _neighbours(x, dtype)
    got = _set_rows(spec, x, np.arange(n, dtype=np.int64) * 7919)
    assert np.all((got == lo) | (got == hi))
    ulp = (hi - lo)[0]
    frac = ((x - lo) / (hi - lo))[0]  # exact probability of rounding up, per column
    up = (got == hi).mean(axis=0)
    sigma = np.sqrt(frac * (1 - frac) / n)
    assert np.all(np.abs(up - frac) <= 5 * sigma + 1e-12)
    err = ((got - x) / ulp).mean()  # in ulps; each error is within one ulp
    assert abs(err) < 5 / np.sqrt(n * 32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_small_steps_accumulate_in_expectation(dtype):
    """SGD steps of a quarter ulp: nearest rounding would never move the rows; stochastic
    rounding moves them by the float32 total on average."""
    spec = _table("sgd", dtype, dim=16, lr=1.0)
    n, steps = 2000, 40
    rows = kernels.encode(np.full((n, 16), 1.5, np.float32), dtype)
    state = np.zeros((n, 0), np.float32)
    ulp = 2.0**-7 if dtype == "bfloat16" else 2.0**-10  # spacing in [1, 2)
    g = np.full((n, 16), ulp / 4, np.float32)
    ids = np.arange(n, dtype=np.int64)
    for step in range(1, steps + 1):
        kernels.optimizer_step(spec, rows, state, ids, ids, g, step)
    got = kernels.decode(rows, dtype, 16).astype(np.float64)
    expect = 1.5 - steps * ulp / 4
    # each step adds an independent error of at most one ulp: sd <= ulp * sqrt(steps) per value
    assert abs(got.mean() - expect) < 5 * ulp * np.sqrt(steps / (n * 16))
    assert got.std() > 0


def test_stochastic_rounding_is_reproducible_under_any_batching():
    """The random bits depend on (seed, row id, step, column) only: one call, reversed order,
    two threads on halves and other offsets give the same rows; another seed or step differs."""
    spec = _table("adam", "bfloat16", dim=40, lr=0.01)
    rng = np.random.default_rng(4)
    rows0, state0 = _arrays(spec, rng, cap=1000)
    ids = rng.choice(10**6, 1000, replace=False).astype(np.int64)
    g = rng.standard_normal((1000, 40)).astype(np.float32)
    offs = np.arange(1000, dtype=np.int64)

    def run(order, threads=1, spec=spec, step=3):
        rows, state = rows0.copy(), state0.copy()
        parts = np.array_split(order, threads)
        ts = [
            threading.Thread(
                target=kernels.optimizer_step,
                args=(spec, rows, state, offs[p], ids[p], g[p], step),
            )
            for p in parts
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return rows, state

    one = run(offs)
    for other in (run(offs[::-1]), run(rng.permutation(1000)), run(offs, threads=2)):
        np.testing.assert_array_equal(other[0], one[0])
        np.testing.assert_array_equal(other[1], one[1])
    # moved to other offsets, the same ids give the same rows
    perm = rng.permutation(1000)
    rows, state = np.empty_like(rows0), np.empty_like(state0)
    rows[perm], state[perm] = rows0, state0
    kernels.optimizer_step(spec, rows, state, perm, ids, g, 3)
    np.testing.assert_array_equal(rows[perm], one[0])
    reseeded = TableConfig("t", num_rows=10**6, dim=40, dtype="bfloat16", seed=8,
                           optimizer=spec.optimizer)  # fmt: skip
    values = one[0].view(np.uint16)
    assert (run(offs, spec=reseeded)[0].view(np.uint16) != values).mean() > 0.2
    assert (run(offs, step=4)[0].view(np.uint16) != values).mean() > 0.2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stochastic_rounding_specials(dtype):
    """NaN stays NaN, inf stays inf, signs are kept, float16 subnormals round by distance in
    units of 2^-24 and values past 65504 go to 65504 or inf."""
    spec = _table("sgd", dtype, dim=8, lr=1.0)
    special = np.array([np.nan, np.inf, -np.inf, -1.25, 0.0, -3.0, 1e-30, -1e-30], np.float32)
    got = _set_rows(spec, special[None, :], np.array([5], np.int64))[0]
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf
    assert got[3] == -1.25 and got[4] == 0 and got[5] == -3.0
    assert abs(got[6]) <= 2.0**-24 and abs(got[7]) <= 2.0**-24 and got[7] <= 0
    if dtype == "bfloat16":
        return
    n = 3000
    sub = np.array([2.5 * 2.0**-24, 700.25 * 2.0**-24, 65510.0, 70000.0], np.float32)
    got = _set_rows(_table("sgd", dtype, dim=4, lr=1.0), np.tile(sub, (n, 1)), np.arange(n))
    units = got[:, :2] / np.float32(2.0**-24)
    assert set(np.unique(units[:, 0])) <= {2.0, 3.0} and set(np.unique(units[:, 1])) <= {700, 701}
    for col, frac in ((0, 0.5), (1, 0.25)):
        up = (units[:, col] == units[:, col].max()).mean()
        assert abs(up - frac) < 5 * np.sqrt(frac * (1 - frac) / n)
    assert set(np.unique(got[:, 2])) == {65504.0, np.inf}  # 6 / 32 of the way to inf
    assert np.all(got[:, 3] == np.inf)


def test_fp8_tables_are_read_only():
    spec = TableConfig("emb", num_rows=100, dim=32, dtype="float8_e4m3")
    rows = np.zeros((4, spec.row_bytes), np.uint8)
    with pytest.raises(InvalidArgument, match="float8_e4m3.*read-only"):
        kernels.optimizer_step(
            spec, rows, np.zeros((4, 2 * 32), np.float32), np.arange(2), np.arange(2),
            np.zeros((2, 32), np.float32), 1,
        )  # fmt: skip
    assert not rows.any()


def test_bad_arguments_change_nothing():
    spec = _table("adam")
    rng = np.random.default_rng(5)
    rows, state = _arrays(spec, rng, cap=10)
    r0, s0 = rows.copy(), state.copy()
    g = np.ones((2, DIM), np.float32)
    ids = np.array([1, 2], np.int64)
    with pytest.raises(InvalidArgument, match="offset 10 .*outside the 10 rows"):
        kernels.optimizer_step(spec, rows, state, np.array([3, 10]), ids, g, 1)
    with pytest.raises(InvalidArgument, match="offset -1"):
        kernels.optimizer_step(spec, rows, state, np.array([-1, 0]), ids, g, 1)
    with pytest.raises(InvalidArgument, match="step 0"):
        kernels.optimizer_step(spec, rows, state, ids, ids, g, 0)
    with pytest.raises(InvalidArgument, match="grads must be float32"):
        kernels.optimizer_step(spec, rows, state, ids, ids, g[:, :4], 1)
    with pytest.raises(InvalidArgument, match="state must be float32"):
        kernels.optimizer_step(spec, rows, state[:, :DIM], ids, ids, g, 1)
    with pytest.raises(InvalidArgument, match="C-contiguous"):
        kernels.optimizer_step(spec, rows, state, ids, ids, np.asfortranarray(np.ones((2, DIM),
                               np.float32)), 1)  # fmt: skip
    with pytest.raises(InvalidArgument, match="one entry per row"):
        kernels.optimizer_step(spec, rows, state, ids, ids[:1], g, 1)
    np.testing.assert_array_equal(rows, r0)
    np.testing.assert_array_equal(state, s0)


# ---------------------------------------------------------------------------------------------
# encodings


def _all_kinds_of_float32(n: int, seed: int = 0) -> np.ndarray:
    """Random bit patterns (every exponent, subnormals, inf, NaN) plus hand-picked edges."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    edges = np.array(
        [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0**-14, 2.0**-24,
         2.0**-25, 3 * 2.0**-26, 2.0**-26, 1e-45, 3.3895314e38, 3.4028235e38, np.inf, -np.inf,
         1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11],
        np.float32,
    )  # fmt: skip
    return np.concatenate([bits.view(np.float32), edges])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_encode_is_torch_round_to_nearest_even(dtype):
    x = _all_kinds_of_float32(200_000)
    x = x.reshape(-1, 2)
    ours = kernels.encode(x, dtype).view(np.uint16).reshape(-1)
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    ref = torch.from_numpy(x.reshape(-1)).to(tdt).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x.reshape(-1))
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    back = kernels.decode(kernels.encode(x, dtype), dtype, 2).reshape(-1)
    assert np.isnan(back[nan]).all()
    np.testing.assert_array_equal(back[~nan], torch.from_numpy(ref.view(np.int16)).view(tdt)
                                  .float().numpy()[~nan])  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_decode_is_exact_for_every_pattern(dtype):
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    got = kernels.decode(bits.view(np.uint8), dtype, 1).reshape(-1)
    if dtype == "bfloat16":
        ref = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def _fp8_reference(x: np.ndarray) -> np.ndarray:
    """float8_e4m3 rows of x from torch's float8 dtypes: per 32 values, scale = 2^ceil(log2(
    amax / 448)) (e8m0, clamped to [2^-127, 2^127]), codes = float8_e4m3fn(x / scale)."""
    t = torch.from_numpy(x).double()
    n, dim = x.shape
    blocks = t.reshape(n, dim // 32, 32)
    amax = blocks.abs().amax(dim=-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 448)), torch.full_like(amax, -127))
    scale = torch.exp2(e.clamp(-127, 127))
    codes = (blocks / scale[..., None]).reshape(n, dim).float().to(torch.float8_e4m3fn)
    sbytes = scale.float().to(torch.float8_e8m0fnu)
    return np.concatenate(
        [codes.view(torch.uint8).numpy(), sbytes.view(torch.uint8).numpy()], axis=1
    )


def _fp8_decode_reference(buf: np.ndarray, dim: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(buf))
    codes = t[:, :dim].view(torch.float8_e4m3fn).float()
    scales = t[:, dim:].contiguous().view(torch.float8_e8m0fnu).float()
    return (codes.reshape(-1, dim // 32, 32) * scales[..., None]).reshape(-1, dim).numpy()


def test_fp8_encode_decode_match_torch_formula():
    rng = np.random.default_rng(6)
    dim = 256
    x = rng.standard_normal((300, dim)).astype(np.float32)
    x[1] *= 1e-3  # other exponent ranges
    x[2] *= 3e4
    x[3, :32] = 0.0  # an all-zero block
    x[4, 32:64] = 448.0 * 2.0**-3  # amax an exact power of two times 448: no rounding up
    x[5, 64:96] = 7 * 2.0**-30  # e4m3 subnormals relative to their block
    x[5, 64] = 1.0
    x[6] = np.float32(2.0**-140) * rng.standard_normal(dim).astype(np.float32)  # below 2^-127
    buf = kernels.encode(x, "float8_e4m3")
    assert buf.shape == (300, 264) and row_bytes("float8_e4m3", dim) == 264
    ref = _fp8_reference(x)
    np.testing.assert_array_equal(buf[:6], ref[:6])  # torch's e8m0 cast cannot go below 2^-127
    np.testing.assert_array_equal(buf[7:], ref[7:])
    assert buf[3, 256] == 0 and not buf[3, :32].any()
    assert buf[4, 257] == 127 - 3 + 0 + 0 and buf[4, 32] == 0x7E  # 448 itself, scale 2^-3
    assert buf[6, 256:].tolist() == [0] * 8  # the smallest scale, 2^-127
    codes6 = (torch.from_numpy(x[6]).double() * 2.0**127).float().to(torch.float8_e4m3fn)
    np.testing.assert_array_equal(buf[6, :256], codes6.view(torch.uint8).numpy())
    got = kernels.decode(buf, "float8_e4m3", dim)
    np.testing.assert_array_equal(got, _fp8_decode_reference(buf, dim))
    # relative error of a quantised value is at most half an e4m3 ulp of its block's range
    err = np.abs(got - x).reshape(300, 8, 32).max(axis=-1)
    amax = np.abs(x).reshape(300, 8, 32).max(axis=-1)
    assert np.all(err[7:] <= amax[7:] * 2.0**-3)
    # decoded rows encode again without loss (a block whose largest code rounded down to 224
    # takes the next smaller scale, and holds every value at twice its code)
    again = kernels.decode(kernels.encode(got, "float8_e4m3"), "float8_e4m3", dim)
    np.testing.assert_array_equal(again, got)


def test_fp8_refuses_non_finite_and_odd_dims():
    x = np.ones((2, 32), np.float32)
    x[1, 5] = np.nan
    with pytest.raises(InvalidArgument, match="row 1 column 5 .*finite"):
        kernels.encode(x, "float8_e4m3")
    with pytest.raises(InvalidArgument, match="multiple of 32"):
        kernels.encode(np.ones((2, 48), np.float32), "float8_e4m3")
    with pytest.raises(InvalidArgument, match="whole rows"):
        kernels.decode(b"\0" * 30, "float8_e4m3", 32)


def test_encode_decode_shapes_and_buffers():
    x = np.arange(24, dtype=np.float32).reshape(4, 6) - 10
    for dtype in ("float32", "bfloat16", "float16"):
        buf = kernels.encode(x, dtype)
        assert buf.dtype == np.uint8 and buf.shape == (4, row_bytes(dtype, 6))
        np.testing.assert_array_equal(kernels.decode(buf, dtype, 6), x)  # small ints: exact
        np.testing.assert_array_equal(kernels.decode(buf.tobytes(), dtype, 6), x)
        np.testing.assert_array_equal(kernels.decode(buf.reshape(-1), dtype, 6), x)
        out = np.empty((4, 6), np.float32)
        assert kernels.decode(buf, dtype, 6, out) is out
        enc = np.empty_like(buf)
        assert kernels.encode(x, dtype, enc) is enc
    with pytest.raises(InvalidArgument, match="unknown"):
        kernels.encode(x, "int8")
    with pytest.raises(InvalidArgument, match="shape"):
        kernels.encode(x, "float16", np.empty((4, 6), np.uint8))
    with pytest.raises(InvalidArgument, match="rows of 12 bytes"):
        kernels.decode(np.zeros((4, 12), np.uint8), "float32", 6)


@pytest.mark.parametrize("src", ["float32", "bfloat16", "float16", "float8_e4m3"])
@pytest.mark.parametrize("dst", ["float32", "bfloat16", "float16", "float8_e4m3"])
def test_convert_is_decode_then_encode(src, dst):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((5000, 64)) * 3).astype(np.float32)
    buf = kernels.encode(x, src)
    out = np.empty((5000, row_bytes(dst, 64)), np.uint8)
    assert kernels.convert(buf, src, dst, 64, out) is out
    if src == dst:
        np.testing.assert_array_equal(out, buf)
    else:
        np.testing.assert_array_equal(out, kernels.encode(kernels.decode(buf, src, 64), dst))


# ---------------------------------------------------------------------------------------------
# gather / scatter


@pytest.mark.parametrize("width", [1, 7, 256, 264])
def test_gather_scatter_match_numpy(width):
    rng = np.random.default_rng(8)
    rows = rng.integers(0, 256, (1000, width), dtype=np.uint8)
    offs = rng.choice(1000, 300, replace=False)
    out = np.empty((300, width), np.uint8)
    kernels.gather(rows, offs, out)
    np.testing.assert_array_equal(out, rows[offs])
    new = rng.integers(0, 256, (300, width), dtype=np.uint8)
    expect = rows.copy()
    expect[offs] = new
    kernels.scatter(rows, offs, new)
    np.testing.assert_array_equal(rows, expect)


def test_gather_scatter_other_dtypes_and_errors():
    state = np.arange(40, dtype=np.float32).reshape(10, 4)
    out = np.empty((3, 4), np.float32)
    kernels.gather(state, np.array([9, 0, 4]), out)
    np.testing.assert_array_equal(out, state[[9, 0, 4]])
    kernels.scatter(state, np.array([1, 2, 3]), out)
    np.testing.assert_array_equal(state[1:4], out)
    before = state.copy()
    with pytest.raises(InvalidArgument, match="offset 10 \\(position 1\\)"):
        kernels.scatter(state, np.array([0, 10, 1]), out)
    np.testing.assert_array_equal(state, before)  # checked before any write
    with pytest.raises(InvalidArgument, match="float32 \\(3, 4\\) needed"):
        kernels.gather(state, np.array([0, 1, 2]), np.empty((3, 4), np.float64))
    kernels.gather(state, np.array([], np.int64), np.empty((0, 4), np.float32))


# ---------------------------------------------------------------------------------------------
# checksum


def test_checksum_is_pinned_and_type_independent():
    """Fixed values (the same on every platform: integer arithmetic on little-endian words) and
    one value for the same bytes whatever object holds them."""
    data = bytes(range(256)) * 5 + b"tail!"
    pinned = kernels.checksum(data)
    assert kernels.checksum(bytearray(data)) == pinned
    assert kernels.checksum(memoryview(data)) == pinned
    assert kernels.checksum(np.frombuffer(data, np.uint8)) == pinned
    assert kernels.checksum(np.frombuffer(data[:1280], np.float32).reshape(20, 16)) == (
        kernels.checksum(data[:1280])
    )
    assert (kernels.checksum(b""), kernels.checksum(b"a"), pinned) == (
        CHECKSUM_EMPTY,
        CHECKSUM_A,
        CHECKSUM_DATA,
    )
    with pytest.raises(InvalidArgument, match="C-contiguous"):
        kernels.checksum(np.zeros((4, 4), np.uint8)[:, ::2])


CHECKSUM_EMPTY = 0xB84765CD8FCE38FC
CHECKSUM_A = 0xFB64070DF0EDC476
CHECKSUM_DATA = 0xD3C7613F5663F5BC


def test_checksum_detects_every_bit_flip_and_truncation():
    data = bytearray(os.urandom(173))
    ref = kernels.checksum(data)
    seen = {ref}
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            c = kernels.checksum(data)
            assert c != ref
            seen.add(c)
            data[i] ^= 1 << bit
    assert len(seen) == 1 + 8 * len(data)
    cuts = {kernels.checksum(data[:k]) for k in range(len(data) + 1)}
    assert len(cuts) == len(data) + 1
    # zero bytes appended change it too (the length is mixed in)
    assert kernels.checksum(bytes(data) + b"\0") != ref
    assert kernels.checksum(b"\0" * 64) != kernels.checksum(b"\0" * 65)
