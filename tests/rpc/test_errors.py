"""Every bad input gets its status code and a message that says what to change; nothing changes
and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from engram_store.engine import errors
from engram_store.engine.config import TableConfig
from engram_store.rpc import wire
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from tests.servers import SMALL_BATCH, table_spec

C = grpc.StatusCode
ONES = np.ones((2, 8), np.float32)


def _push(ids=(1, 2), grads=ONES, table="t", dtype=pb.FLOAT32, raw_grads=None, **kw):
    buf = raw_grads if raw_grads is not None else wire.pack_rows(np.asarray(grads), "float32")
    return pb.PushGradientsRequest(
        table=table, ids=wire.pack_ids(np.asarray(ids)), grads=buf, grad_dtype=dtype, **kw
    )


def _lookup(ids=(1, 2), table="t", **kw):
    return pb.LookupRequest(table=table, ids=wire.pack_ids(np.asarray(ids)), **kw)


def _nan(value):
    g = ONES.copy()
    g[1, 3] = value
    return g


OTHER_SPEC = wire.spec_to_pb(table_spec(dim=16))
NO_OPTIMIZER = pb.TableSpec(name="u", num_rows=10, dim=4)

# (method, request, status code, words the message must contain)
CASES = {
    "lookup unknown table": ("Lookup", _lookup(table="nope"), C.NOT_FOUND, ["nope"]),
    "push unknown table": ("PushGradients", _push(table="nope"), C.NOT_FOUND, ["nope"]),
    "lookup id out of range": ("Lookup", _lookup(ids=(1, 1000)), C.INVALID_ARGUMENT, ["1000"]),
    "lookup negative id": ("Lookup", _lookup(ids=(-1, 2)), C.INVALID_ARGUMENT, ["-1"]),
    "push id out of range": ("PushGradients", _push(ids=(5, 1000)), C.INVALID_ARGUMENT, ["1000"]),
    "push negative id": ("PushGradients", _push(ids=(-3, 2)), C.INVALID_ARGUMENT, ["-3"]),
    "ids not int64 bytes": (
        "Lookup",
        pb.LookupRequest(table="t", ids=b"\0" * 12),
        C.INVALID_ARGUMENT,
        ["multiple of 8", "int64"],
    ),
    "grads not whole rows": (
        "PushGradients",
        _push(raw_grads=b"\0" * (2 * 32 + 4)),
        C.INVALID_ARGUMENT,
        ["multiple of the row size", "(n, 8)"],
    ),
    "grads rows != ids": (
        "PushGradients",
        _push(ids=(1, 2, 3)),
        C.INVALID_ARGUMENT,
        ["one gradient row per id"],
    ),
    "grads NaN": ("PushGradients", _push(grads=_nan(np.nan)), C.INVALID_ARGUMENT, ["nan"]),
    "grads Inf": ("PushGradients", _push(grads=_nan(np.inf)), C.INVALID_ARGUMENT, ["inf"]),
    "grad dtype unknown": (
        "PushGradients",
        _push(dtype=7),
        C.INVALID_ARGUMENT,
        ["grad_dtype=7", "FLOAT32"],
    ),
    "grads in another dtype": (
        "PushGradients",
        _push(dtype=pb.FLOAT16, ids=(1,)),
        C.INVALID_ARGUMENT,
        ["float16"],
    ),
    "lookup dtype unknown": ("Lookup", _lookup(dtype=9), C.INVALID_ARGUMENT, ["dtype=9"]),
    "lookup over batch limit": (
        "Lookup",
        _lookup(ids=np.arange(SMALL_BATCH + 1) % 100),
        C.RESOURCE_EXHAUSTED,
        ["split the batch", "--max-batch-rows"],
    ),
    "push over batch limit": (
        "PushGradients",
        _push(ids=np.arange(SMALL_BATCH + 1) % 100, grads=np.ones((SMALL_BATCH + 1, 8))),
        C.RESOURCE_EXHAUSTED,
        ["split the batch"],
    ),
    "table exists with another spec": (
        "CreateTable",
        pb.CreateTableRequest(spec=OTHER_SPEC),
        C.ALREADY_EXISTS,
        ["'t'"],
    ),
    "optimizer unspecified": (
        "CreateTable",
        pb.CreateTableRequest(spec=NO_OPTIMIZER),
        C.INVALID_ARGUMENT,
        ["optimizer", "ADAM"],
    ),
    "bad table name": (
        "CreateTable",
        pb.CreateTableRequest(spec=wire.spec_to_pb(TableConfig(name="a b", num_rows=5, dim=2))),
        C.INVALID_ARGUMENT,
        ["a b"],
    ),
}

# raw bytes that do not parse as the request message (a truncated varint field)
MALFORMED = ["Lookup", "PushGradients", "CreateTable", "GetTable", "Stats"]


@pytest.fixture
def table(client):
    client.create_table(table_spec())
    client.push("t", np.array([1, 2, 5]), np.ones((3, 8)))  # stored rows as well as initial ones
    return client


def _rows(client: StoreClient) -> np.ndarray:
    return client.lookup("t", np.arange(1000))


def _check_still_serving(client: StoreClient, before: np.ndarray) -> None:
    np.testing.assert_array_equal(_rows(client), before)  # unchanged, and answered
    assert client.table_info("t").pushes == 1


@pytest.mark.parametrize("case", CASES)
def test_bad_request(table, shard, case):
    method, request, code, words = CASES[case]
    before = _rows(table)
    with pytest.raises(grpc.RpcError) as e:
        getattr(table._stub(shard.address), method)(request, timeout=10)
    assert e.value.code() == code, e.value.details()
    for w in words:
        assert w.lower() in e.value.details().lower(), (w, e.value.details())
    _check_still_serving(table, before)


@pytest.mark.parametrize("method", MALFORMED)
def test_malformed_bytes(table, shard, method):
    before = _rows(table)
    channel = grpc.insecure_channel(shard.address)
    call = channel.unary_unary(f"/engram.v1.MemoryStore/{method}")
    with pytest.raises(grpc.RpcError) as e:
        call(b"\x0a\xff\xff\xff", timeout=10)  # field 1, length-delimited, truncated length
    channel.close()
    assert e.value.code() == C.INVALID_ARGUMENT
    assert "not a valid engram.v1." in e.value.details()
    _check_still_serving(table, before)


def test_client_raises_project_errors(table):
    before = _rows(table)
    with pytest.raises(errors.TableNotFound, match="nope"):
        table.lookup("nope", [1])
    with pytest.raises(errors.InvalidArgument, match="1000"):
        table.push("t", [1000], np.ones((1, 8)))
    with pytest.raises(errors.TableExists):
        table.create_table(table_spec(dim=16))
    table.create_table(table_spec(name="big", num_rows=3 * SMALL_BATCH))
    ids = np.arange(SMALL_BATCH + 1)
    with pytest.raises(errors.BatchTooLarge, match="split"):
        table.lookup("big", ids)
    # a client told the limit splits batches instead
    with StoreClient(table.shard_map, ClientConfig(max_batch_rows=SMALL_BATCH)) as c:
        assert c.lookup("big", ids).shape == (SMALL_BATCH + 1, 8)
        c.push("big", ids, np.ones((SMALL_BATCH + 1, 8)))
        assert c.table_info("big").stored_rows == SMALL_BATCH + 1
    _check_still_serving(table, before)


def test_unexpected_exception_is_internal(table, shard, monkeypatch):
    before = _rows(table)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(shard.shard, "lookup_into", boom)
    with pytest.raises(errors.EngramError, match="disk on fire"):
        table.lookup("t", [1])
    monkeypatch.undo()
    _check_still_serving(table, before)
    stats = {m["method"]: m for m in table.stats()[0]["methods"]}
    assert stats["Lookup"]["errors"] >= 1


def test_read_only(make_shard):
    rw = make_shard("rw")
    with StoreClient(rw.address) as c:
        c.create_table(table_spec())
        c.push("t", [1], np.ones((1, 8)))
        before = _rows(c)
    rw.stop()
    ro = make_shard(data_dir=rw.config.shard.data_dir, read_only=True)
    with StoreClient(ro.address) as c:
        np.testing.assert_array_equal(_rows(c), before)
        for call in (
            lambda: c.push("t", [1], np.ones((1, 8))),
            lambda: c.create_table(table_spec(name="u")),
            lambda: c.drop_table("t"),
        ):
            with pytest.raises(errors.ReadOnly, match="read-only"):
                call()
        np.testing.assert_array_equal(_rows(c), before)
