"""wire.py: spec and LookupResponse encodings agree with protobuf; fp8 rows decode as torch's
float8_e4m3fn times their e8m0 block scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_store.engine import dtypes
from engram_store.engine.config import DTYPES, OPTIMIZERS, OptimizerConfig, TableConfig, row_bytes
from engram_store.engine.errors import InvalidArgument
from engram_store.rpc import wire
from engram_store.rpc.proto import store_pb2 as pb


def _random_rows(n: int, dim: int, dtype: str) -> bytes:
    """n packed rows of dim in `dtype`, any bit patterns (the frame does not look at them)."""
    return np.random.default_rng(n).integers(0, 256, n * row_bytes(dtype, dim), np.uint8).tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 32), (1, 32), (3, 64), (1000, 64)])
def test_lookup_response_frame_matches_protobuf(dtype, shape):
    n, dim = shape
    data = _random_rows(n, dim, dtype)
    prefix, suffix = wire.lookup_response_frame(n, dim, dtype)
    theirs = pb.LookupResponse(
        rows=data, num_rows=n, dim=dim, dtype=wire.DTYPE_TO_PB[dtype]
    ).SerializeToString()
    assert prefix + data + suffix == theirs
    rows, got_dim, got_dtype = wire.decode_lookup_response(theirs)
    assert (got_dim, got_dtype) == (dim, dtype)
    assert rows.shape == (n, wire.wire_width(dtype, dim))
    assert rows.dtype == wire.wire_numpy_dtype(dtype) and not rows.flags.writeable
    assert rows.tobytes() == data  # a view of the message: the bytes as sent
    # fields in another order and unknown fields parse the same
    odd = (
        pb.LookupResponse(dim=dim, dtype=wire.DTYPE_TO_PB[dtype]).SerializeToString()
        + b"\x78\x05"
        + b"\x82\x01\x02ab"  # unknown varint field 15, bytes field 16
        + pb.LookupResponse(rows=data, num_rows=n).SerializeToString()
    )
    np.testing.assert_array_equal(wire.decode_lookup_response(odd)[0], rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_wire_rows_decode_to_float32(dtype):
    values = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    data = dtypes.to_bytes(values, dtype)
    prefix, suffix = wire.lookup_response_frame(5, 8, dtype)
    rows, dim, _ = wire.decode_lookup_response(prefix + data + suffix)
    np.testing.assert_array_equal(
        wire.wire_to_float32(rows, dtype, dim), dtypes.from_bytes(data, dtype, 8)
    )


def test_fp8_rows_decode_like_torch():
    dim, n = 64, 300
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (n, dim), np.uint8)
    codes[0, :3] = [0x7F, 0xFF, 0x00]  # NaN, -NaN, +0
    scales = rng.integers(100, 150, (n, dim // 32), np.uint8)
    scales[1, 0] = 255  # a NaN scale
    rows = np.concatenate([codes, scales], axis=1)
    got = wire.wire_to_float32(rows, "float8_e4m3", dim)
    value = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    scale = np.where(scales == 255, np.nan, np.exp2(scales.astype(np.float64) - 127))
    scale = scale.astype(np.float32)
    expect = (value.reshape(n, 2, 32) * scale[:, :, None]).reshape(n, dim)
    np.testing.assert_array_equal(got, expect)  # NaNs in the same places
    assert np.isnan(got[0, :2]).all() and np.isnan(got[1, :32]).all() and got[0, 2] == 0
    with pytest.raises(InvalidArgument, match="multiple of 32"):
        wire.wire_to_float32(rows[:, :41], "float8_e4m3", 40)
    with pytest.raises(InvalidArgument, match=r"not float8_e4m3 rows of dim 64; pass \(n, 66\)"):
        wire.wire_to_float32(rows[:, :60], "float8_e4m3", dim)


def test_corrupt_lookup_response_is_rejected():
    prefix, suffix = wire.lookup_response_frame(4, 8, "float32")
    good = prefix + bytes(128) + suffix
    for bad in (
        good[:-1],
        good[:10],
        b"\x0a\xff",
        good + b"\x07",
        pb.LookupResponse(rows=bytes(12), num_rows=1, dim=4).SerializeToString(),  # 12 != 16
        pb.LookupResponse(rows=bytes(8), num_rows=1, dim=8, dtype=4).SerializeToString(),
        pb.LookupResponse(num_rows=1, dim=8, dtype=9).SerializeToString(),  # unknown dtype
    ):
        with pytest.raises(InvalidArgument):
            wire.decode_lookup_response(bad)


def test_unknown_dtype_names_every_known_one():
    with pytest.raises(InvalidArgument, match=r"FLOAT8_E4M3 \(4\)"):
        wire.dtype_name(17)


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_round_trip(kind, dtype):
    spec = TableConfig(
        name="x",
        head_rows=(7, 11),
        dim=64,
        dtype=dtype,
        init="zeros",
        init_std=0.0,
        seed=3,
        optimizer=OptimizerConfig(
            kind=kind, lr=0.1, eps=1e-9, initial_accumulator_value=0.5, lr_decay=0.01
        ),
    )
    m = wire.spec_to_pb(spec)
    assert pb.OptimizerKind.Name(m.optimizer.kind) == kind.upper()
    assert m.storage_dtype == wire.DTYPE_TO_PB[dtype]
    assert wire.spec_from_pb(pb.TableSpec.FromString(m.SerializeToString())) == spec
    default = TableConfig(name="y", num_rows=5)
    assert wire.spec_from_pb(wire.spec_to_pb(default)) == default


def test_unknown_optimizer_kind_names_the_known_ones():
    m = wire.spec_to_pb(TableConfig(name="x", num_rows=5))
    m.optimizer.kind = 9
    with pytest.raises(InvalidArgument, match="ROWWISE_ADAGRAD, ROWWISE_ADAM"):
        wire.spec_from_pb(m)


def test_gradients_do_not_travel_as_fp8():
    with pytest.raises(InvalidArgument, match="float32, bfloat16, float16"):
        wire.unpack_rows(bytes(72), "float8_e4m3", 64, "grads")
    with pytest.raises(InvalidArgument, match="grads cannot travel as float8_e4m3"):
        wire.encode_push_request(
            "t", np.arange(2), np.zeros((2, 64), np.float32), "float8_e4m3", "", 1, 0
        )


def test_the_copy_free_push_parser_reads_what_protobuf_reads():
    """wire.parse_push_request against protobuf's own parse: every field, negative steps,
    unknown fields skipped, the last occurrence winning; broken bytes refused."""

    rng = np.random.default_rng(0)
    for step in (0, 7, -3, 2**62):
        ids = rng.integers(0, 1 << 40, 9).astype(np.int64)
        g = rng.standard_normal((9, 4)).astype(np.float32)
        raw = wire.encode_push_request("t", ids, g, "float32", "run/3/0~2", step, 11)
        raw += pb.PushGradientsRequest(table="t2").SerializeToString()  # a later table wins
        raw += b"\xf8\x07\x01"  # unknown varint field 127
        v, m = wire.parse_push_request(raw), pb.PushGradientsRequest.FromString(raw)
        got = (v.table, bytes(v.ids), bytes(v.grads), v.grad_dtype, v.request_id, v.step)
        assert got == (m.table, m.ids, m.grads, m.grad_dtype, m.request_id, m.step)
        assert v.map_version == m.map_version == 11
    for bad in (b"\x0a\xff", b"\x12\x05ab", b"\x0b"):
        with pytest.raises((ValueError, InvalidArgument)):
            wire.parse_push_request(bad)
