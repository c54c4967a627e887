"""dtypes: float32 <-> bfloat16 / float16 packing."""

import numpy as np
import pytest

from engram_store.engine import dtypes
from engram_store.engine.errors import InvalidArgument


def test_bf16_round_to_nearest_even_and_specials():
    x = np.array([1.0, -2.5, 0.0, -0.0, np.inf, -np.inf, 3.0e38, 1e-40], np.float32)
    back = dtypes.to_float32(dtypes.to_dtype(x, "bfloat16"), "bfloat16")
    np.testing.assert_array_equal(back[:6], x[:6])
    assert np.isfinite(back[6]) or back[6] == np.inf  # rounding may carry to inf at the top
    # ties go to the even mantissa: 1 + 2^-8 sits halfway between 1 and 1 + 2^-7
    tie = np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    np.testing.assert_array_equal(
        dtypes.bf16_to_f32(dtypes.f32_to_bf16(tie)), np.array([1.0, 1 + 2**-6], np.float32)
    )


def test_bf16_matches_torch_rounding():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    ours = dtypes.f32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, ref)


def test_nan_stays_nan():
    # a NaN whose payload lives only in the low 16 bits would truncate to Inf
    nan = np.array([0x7F800001, 0xFFC00000], np.uint32).view(np.float32)
    assert np.isnan(dtypes.to_float32(dtypes.to_dtype(nan, "bfloat16"), "bfloat16")).all()
    assert np.isnan(dtypes.to_float32(dtypes.to_dtype(nan, "float16"), "float16")).all()


@pytest.mark.parametrize("name,tol", [("float32", 0), ("bfloat16", 2**-8), ("float16", 2**-11)])
def test_bytes_round_trip(name, tol):
    x = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    buf = dtypes.to_bytes(x, name)
    assert len(buf) == x.size * dtypes.itemsize(name)
    y = dtypes.from_bytes(buf, name, 5)
    assert y.dtype == np.float32 and y.shape == (7, 5) and y.flags.writeable
    np.testing.assert_allclose(y, x, rtol=tol, atol=0)
    # packed bytes are little-endian
    assert (
        buf[: dtypes.itemsize(name)]
        == np.asarray(dtypes.to_dtype(x[:1, :1], name))
        .astype(dtypes.numpy_dtype(name).newbyteorder("<"))
        .tobytes()
    )


def test_from_bytes_rejects_partial_rows():
    with pytest.raises(InvalidArgument, match="whole rows"):
        dtypes.from_bytes(b"\0" * 10, "float32", 2)
    with pytest.raises(InvalidArgument, match="unknown"):
        dtypes.itemsize("int8")
    assert dtypes.from_bytes(b"", "bfloat16", 3).shape == (0, 3)


def test_from_bytes_without_copy():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    view = dtypes.from_bytes(x.tobytes(), "float32", 3, copy=False)
    np.testing.assert_array_equal(view, x)
    assert not view.flags.writeable
    assert dtypes.from_bytes(x.tobytes(), "float32", 3).flags.writeable


def test_float8_rows_through_kernels():
    """float8_e4m3 is row-wise (codes + one scale per 32 values): to_dtype / to_bytes encode
    rows with kernels.encode, from_bytes / to_float32 decode them; itemsize refuses and points
    to config.row_bytes."""
    from engram_store.engine import kernels

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    buf = dtypes.to_bytes(x, "float8_e4m3")
    assert len(buf) == 3 * (64 + 2) and buf == kernels.encode(x, "float8_e4m3").tobytes()
    y = dtypes.from_bytes(buf, "float8_e4m3", 64)
    assert y.shape == (3, 64) and y.dtype == np.float32 and y.flags.writeable
    np.testing.assert_array_equal(y, kernels.decode(buf, "float8_e4m3", 64))
    np.testing.assert_allclose(y, x, rtol=2**-4, atol=np.abs(x).max() * 2**-9)
    rows = dtypes.to_dtype(x, "float8_e4m3")
    assert rows.dtype == dtypes.numpy_dtype("float8_e4m3") == np.uint8 and rows.shape == (3, 66)
    np.testing.assert_array_equal(dtypes.to_float32(rows, "float8_e4m3"), y)
    with pytest.raises(InvalidArgument, match="row_bytes"):
        dtypes.itemsize("float8_e4m3")
    with pytest.raises(InvalidArgument, match="whole rows"):
        dtypes.from_bytes(buf[:-1], "float8_e4m3", 64)
    with pytest.raises(InvalidArgument, match="uint8 \\(n, dim \\+ dim / 32\\)"):
        dtypes.to_float32(rows[:, :65], "float8_e4m3")


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_numpy_packing_equals_kernels(name):
    """The numpy conversions here and the compiled ones in kernels round alike."""
    from engram_store.engine import kernels

    bits = np.random.default_rng(3).integers(0, 2**32, 100_000, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32).reshape(-1, 4)
    ours = np.asarray(dtypes.to_dtype(x, name)).view(np.uint16)
    theirs = kernels.encode(x, name).view(np.uint16)
    ok = ~np.isnan(x)
    np.testing.assert_array_equal(ours[ok], theirs[ok])
    np.testing.assert_array_equal(
        dtypes.to_float32(dtypes.to_dtype(x, name), name)[ok],
        kernels.decode(kernels.encode(x, name), name, 4)[ok],
    )
