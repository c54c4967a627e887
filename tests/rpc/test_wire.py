"""wire.py: spec and LookupResponse encodings agree with protobuf."""

from __future__ import annotations

import numpy as np
import pytest

from engram_store.engine import dtypes
from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import InvalidArgument
from engram_store.rpc import wire
from engram_store.rpc.proto import store_pb2 as pb


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (3, 8), (1000, 64)])
def test_lookup_response_matches_protobuf(dtype, shape):
    rows = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours = wire.encode_lookup_response(rows, dtype)
    theirs = pb.LookupResponse(
        rows=dtypes.to_bytes(rows, dtype),
        num_rows=shape[0],
        dim=shape[1],
        dtype=wire.DTYPE_TO_PB[dtype],
    )
    assert ours == theirs.SerializeToString()
    decoded, dim = wire.decode_lookup_response(theirs.SerializeToString())
    assert dim == shape[1] and decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, dtypes.from_bytes(theirs.rows, dtype, shape[1]))
    # fields in another order and unknown fields parse the same
    odd = (
        pb.LookupResponse(dim=shape[1], dtype=theirs.dtype).SerializeToString()
        + b"\x78\x05"
        + b"\x82\x01\x02ab"  # unknown varint field 15, bytes field 16
        + pb.LookupResponse(rows=theirs.rows, num_rows=shape[0]).SerializeToString()
    )
    np.testing.assert_array_equal(wire.decode_lookup_response(odd)[0], decoded)


def test_corrupt_lookup_response_is_rejected():
    good = wire.encode_lookup_response(np.ones((4, 8), np.float32), "float32")
    for bad in (good[:-1], good[:10], b"\x0a\xff", good + b"\x07"):
        with pytest.raises(InvalidArgument):
            wire.decode_lookup_response(bad)


def test_spec_round_trip():
    spec = TableConfig(
        name="x",
        head_rows=(7, 11),
        dim=4,
        dtype="bfloat16",
        init="zeros",
        init_std=0.0,
        seed=3,
        optimizer=OptimizerConfig(
            kind="adagrad", lr=0.1, eps=1e-9, initial_accumulator_value=0.5, lr_decay=0.01
        ),
    )
    assert wire.spec_from_pb(wire.spec_to_pb(spec)) == spec
    default = TableConfig(name="y", num_rows=5)
    assert wire.spec_from_pb(wire.spec_to_pb(default)) == default
