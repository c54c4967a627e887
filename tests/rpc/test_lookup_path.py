"""The lookup path through a real server: rows in every wire dtype as the engine holds them, the
new formats in table specs, unique ids, split sub-requests, views, and refusals that leave the
server serving."""

from __future__ import annotations

import dataclasses
import threading

import grpc
import numpy as np
import pytest

from engram_store.engine import errors
from engram_store.engine.config import DTYPES, OptimizerConfig, TableConfig, row_bytes
from engram_store.engine.routing import ShardMap
from engram_store.rpc import wire
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc
from engram_store.rpc.servicer import bytes_to_fill
from tests.servers import SMALL_BATCH

DIM = 64  # a multiple of 32: rows of every table can travel as float8_e4m3
ROWS = 3000
STORAGE = ["float32", "bfloat16", "float16", "float8_e4m3"]


def _spec(name: str, dtype: str, kind: str = "sgd") -> TableConfig:
    return TableConfig(
        name=name,
        num_rows=ROWS,
        dim=DIM,
        dtype=dtype,
        seed=7,
        optimizer=OptimizerConfig(kind=kind, lr=0.1),
    )


def _import_rows(client: StoreClient, address: str, spec: TableConfig, ids: np.ndarray) -> None:
    """Store distinct values for `ids` (fp8 tables are served, not trained: ImportRows)."""
    rng = np.random.default_rng(len(ids))
    record = spec.row_bytes + 4 * spec.state_floats
    if spec.dtype == "float8_e4m3":
        codes = rng.integers(0, 0x7F, (len(ids), DIM), np.uint8)  # finite codes, some negative
        codes |= rng.integers(0, 2, (len(ids), DIM), np.uint8) << 7
        scales = rng.integers(120, 130, (len(ids), DIM // 32), np.uint8)
        records = np.concatenate([codes, scales], axis=1)
    else:
        values = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        packed = np.frombuffer(wire.pack_rows(values, spec.dtype), np.uint8)
        records = packed.reshape(len(ids), spec.row_bytes)
    assert records.shape == (len(ids), record)  # sgd: no optimizer state
    batch = pb.RowBatch(
        table=spec.name, ids=wire.pack_ids(ids), records=records.tobytes(), record_bytes=record
    )
    assert client._stub(address).ImportRows(iter([batch])).rows == len(ids)


@pytest.fixture
def tables(shard, client):
    """One table per storage dtype, each with some rows stored and the rest never pushed."""
    stored = np.arange(0, ROWS, 3)
    for dtype in STORAGE:
        spec = _spec(f"t_{dtype}", dtype)
        client.create_table(spec)
        _import_rows(client, shard.address, spec, stored)
    return stored


@pytest.mark.parametrize("wire_dtype", DTYPES)
@pytest.mark.parametrize("storage", STORAGE)
def test_rows_arrive_as_the_engine_holds_them(shard, client, tables, storage, wire_dtype):
    ids = np.random.default_rng(3).permutation(ROWS)[:700]  # stored and never-stored rows
    got = client.lookup(f"t_{storage}", ids, wire_dtype, raw=True)
    held = shard.shard.lookup_into(f"t_{storage}", ids, wire_dtype)  # uint8 (n, row bytes)
    np_dtype = wire.wire_numpy_dtype(wire_dtype)
    assert got.dtype == np_dtype and got.shape == (700, wire.wire_width(wire_dtype, DIM))
    # byte for byte: fp32 exact, bf16 / fp16 bits exact, fp8 codes and scales exact
    assert got.tobytes() == held.tobytes()
    as_f32 = client.lookup(f"t_{storage}", ids, wire_dtype)
    assert as_f32.dtype == np.float32 and as_f32.shape == (700, DIM)
    np.testing.assert_array_equal(as_f32, wire.wire_to_float32(got, wire_dtype, DIM))


@pytest.mark.parametrize("storage", STORAGE)
def test_stored_rows_in_their_storage_dtype_are_the_imported_bytes(shard, client, storage):
    spec = _spec("s", storage)
    client.create_table(spec)
    ids = np.array([5, 0, 2999, 17])
    _import_rows(client, shard.address, spec, ids)
    got = client.lookup("s", ids, storage, raw=True, unique=True)
    rng = np.random.default_rng(len(ids))  # _import_rows' values again
    if storage == "float8_e4m3":
        codes = rng.integers(0, 0x7F, (4, DIM), np.uint8)
        codes |= rng.integers(0, 2, (4, DIM), np.uint8) << 7
        expect = np.concatenate([codes, rng.integers(120, 130, (4, 2), np.uint8)], axis=1)
    else:
        values = rng.standard_normal((4, DIM)).astype(np.float32)
        expect = np.frombuffer(wire.pack_rows(values, storage), wire.wire_numpy_dtype(storage))
    np.testing.assert_array_equal(got, expect.reshape(got.shape))


@pytest.mark.parametrize(
    ("dtype", "kind"),
    [("float8_e4m3", "sgd"), ("bfloat16", "rowwise_adagrad"), ("float32", "rowwise_adam")],
)
def test_new_formats_over_grpc(shard, client, dtype, kind):
    spec = _spec("n", dtype, kind)
    assert client.create_table(spec).spec == spec
    assert client.table_info("n").spec == spec
    info = client._stub(shard.address).GetTable(pb.GetTableRequest(name="n"))
    assert info.spec.storage_dtype == wire.DTYPE_TO_PB[dtype]
    assert pb.OptimizerKind.Name(info.spec.optimizer.kind) == kind.upper()
    assert [t.spec for t in client.list_tables()] == [spec]


def test_unique_ids_equal_the_deduplicated_path(client, tables):
    rng = np.random.default_rng(4)
    distinct = rng.permutation(ROWS)[:1000]
    for name in ("t_float32", "t_bfloat16"):
        plain = client.lookup(name, distinct)
        np.testing.assert_array_equal(client.lookup(name, distinct, unique=True), plain)
        with_dups = np.concatenate([distinct, distinct[:100]]).reshape(11, 100)
        dedup = client.lookup(name, with_dups)
        assert dedup.shape == (11, 100, DIM)
        np.testing.assert_array_equal(dedup.reshape(-1, DIM)[:1000], plain)
        # a caller that wrongly says unique still gets the right rows (duplicates sent twice)
        np.testing.assert_array_equal(client.lookup(name, with_dups, unique=True), dedup)


def test_split_sub_requests_equal_one_request(make_shard):
    shards = [make_shard("split") for _ in range(3)]
    one = make_shard("one")
    ids = np.random.default_rng(5).permutation(ROWS)[:2500]
    for dtype in ("float32", "bfloat16", "float8_e4m3"):
        spec = _spec(f"x_{dtype}", dtype)
        # 2500 rows of 64 in sub-requests of about 10 kB: tens of them, 3 in flight at once
        for target in (one.address, ShardMap.balanced([s.address for s in shards])):
            with (
                StoreClient(target, split_bytes=0) as whole,
                StoreClient(target, split_bytes=10_000, split_inflight=3) as split,
            ):
                whole.create_table(spec)
                split.create_table(spec)
                want = whole.lookup(spec.name, ids, dtype, raw=True)
                got = split.lookup(spec.name, ids, dtype, raw=True)
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(
                    split.lookup(spec.name, ids, dtype), whole.lookup(spec.name, ids, dtype)
                )
                assert got.flags.writeable  # assembled into one array of its own
    # the one-shard server saw the split: many Lookup requests for the same rows
    lookups = {m["method"]: m for m in StoreClient(one.address).stats()[0]["methods"]}["Lookup"]
    per_call = 2500 * row_bytes("float32", DIM)
    assert lookups["requests"] > 2 * per_call // 10_000


def test_views_and_ownership(client, tables):
    ids = np.arange(10)
    view = client.lookup("t_float32", ids, "float32", unique=True, raw=True, view=True)
    assert not view.flags.writeable and view.base is not None  # a view of the answer
    owned = client.lookup("t_float32", ids)
    assert owned.flags.writeable
    np.testing.assert_array_equal(view, owned)
    converted = client.lookup("t_bfloat16", ids, "bfloat16", view=True)  # float32: a new array
    assert converted.dtype == np.float32 and converted.flags.writeable
    fut = client.lookup_async("t_bfloat16", ids, "bfloat16", raw=True, unique=True)
    assert fut.result().dtype == np.uint16


def test_concurrent_lookups_get_their_own_rows(shard, client, tables):
    """Answers built at the same time in several server threads stay apart."""
    rng = np.random.default_rng(6)
    batches = [rng.permutation(ROWS)[: rng.integers(1, 2000)] for _ in range(24)]
    expect = [shard.shard.lookup_into("t_float32", b, "float32").tobytes() for b in batches]
    got: list[bytes | None] = [None] * len(batches)

    def work(k: int) -> None:
        for i in range(k, len(batches), 6):
            got[i] = client.lookup("t_float32", batches[i], "float32", raw=True).tobytes()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expect


def _raw_lookup(address: str, **fields) -> grpc.RpcError:
    with grpc.insecure_channel(address) as ch:
        stub = ch.unary_unary("/engram.v1.MemoryStore/Lookup")
        with pytest.raises(grpc.RpcError) as e:
            stub(pb.LookupRequest(**fields).SerializeToString(), timeout=10)
    return e.value


def test_refused_lookups_say_why_and_the_server_keeps_serving(shard, client, tables):
    ids = wire.pack_ids(np.arange(4))
    before = client.lookup("t_float32", np.arange(4))
    e = _raw_lookup(shard.address, table="t_float32", ids=ids, dtype=9)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "FLOAT8_E4M3 (4)" in e.details()
    e = _raw_lookup(shard.address, table="nope", ids=ids)
    assert e.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.details()
    e = _raw_lookup(shard.address, table="t_float32", ids=b"\1\2\3")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "multiple of 8" in e.details()
    e = _raw_lookup(shard.address, table="t_float32", ids=wire.pack_ids(np.array([ROWS])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many = wire.pack_ids(np.zeros(SMALL_BATCH + 1, np.int64))
    e = _raw_lookup(shard.address, table="t_float32", ids=too_many)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "split the batch" in e.details()
    with pytest.raises(errors.InvalidArgument, match="dtype 'int8' is unknown"):
        client.lookup("t_float32", [1], "int8")
    np.testing.assert_array_equal(client.lookup("t_float32", np.arange(4)), before)


def test_answers_over_the_message_limit_are_refused_before_the_gather(shard, client, tables):
    shard.servicer.max_response_bytes = 100 * row_bytes("float32", DIM)
    with pytest.raises(errors.BatchTooLarge, match=r"ask for fewer rows per request \(at most 99"):
        client.lookup("t_float32", np.arange(100), "float32")
    # the same rows as bfloat16 fit; so do fewer rows
    assert client.lookup("t_float32", np.arange(100), "bfloat16").shape == (100, DIM)
    assert client.lookup("t_float32", np.arange(99)).shape == (99, DIM)


def test_fp8_needs_a_dim_of_whole_blocks(shard, client):
    client.create_table(TableConfig(name="d40", num_rows=10, dim=40))
    with pytest.raises(errors.InvalidArgument, match="not a multiple of 32"):
        client.lookup("d40", [1, 2], "float8_e4m3")
    assert client.lookup("d40", [1, 2]).shape == (2, 40)


def test_gradients_travel_in_a_gradient_dtype_under_an_fp8_wire(shard):
    with StoreClient(shard.address, ClientConfig(wire_dtype="float8_e4m3")) as c:
        c.create_table(_spec("g", "float32"))
        before = c.lookup("g", [1, 2], "float32")
        assert c.push("g", [1, 2], np.ones((2, DIM))).rows_updated == 2  # sent as float32
        np.testing.assert_allclose(c.lookup("g", [1, 2], "float32"), before - 0.1, atol=1e-6)
        assert c.lookup("g", [1, 2], raw=True).shape == (2, DIM + DIM // 32)


def test_answers_are_built_in_bytes_of_their_own():
    pattern = (np.arange(5000) % 251).astype(np.uint8)
    first, view = bytes_to_fill(5000)
    view[:] = pattern
    del view
    second, view = bytes_to_fill(5000)
    view[:] = 7  # filling the next answer leaves the first one as it was
    assert type(first) is bytes and first == pattern.tobytes()
    assert second == bytes([7]) * 5000
    assert bytes_to_fill(0)[0] == b""


def test_split_lookup_through_a_stale_map_is_rerouted(make_shard):
    a, b, ref = make_shard(), make_shard(), make_shard("ref")
    current = ShardMap.balanced([a.address, b.address], num_slots=8, version=2)
    for i, s in enumerate((a, b)):
        s.shard.set_shard_state(
            dataclasses.replace(
                s.shard.shard_state(),
                shard_index=i,
                map_version=2,
                num_slots=8,
                owned=current.owned_mask(i),
                shard_map_json=current.to_json(),
            )
        )
    stale = dataclasses.replace(
        current, version=1, assignment=tuple(1 - x for x in current.assignment)
    )
    spec = _spec("r", "bfloat16")
    ids = np.random.default_rng(8).permutation(ROWS)[:2000]
    with (
        StoreClient(stale, ClientConfig(retries=4, backoff_s=0.01), split_bytes=4096) as c,
        StoreClient(ref.address) as r,
    ):
        c.create_table(spec)
        r.create_table(spec)
        np.testing.assert_array_equal(
            c.lookup("r", ids, "bfloat16", raw=True), r.lookup("r", ids, "bfloat16", raw=True)
        )
        assert c.shard_map == current


def test_a_plain_protobuf_client_reads_the_answer(shard, client, tables):
    """The hand-framed answer is a LookupResponse to any engram.v1 client (old ones too: no
    dtype asked means float32)."""
    ids = np.array([7, 1, 2998])
    with grpc.insecure_channel(shard.address) as ch:
        stub = store_pb2_grpc.MemoryStoreStub(ch)
        for storage in STORAGE:
            for dtype, pb_dtype in (("float32", pb.DTYPE_UNSPECIFIED), ("bfloat16", pb.BFLOAT16)):
                req = pb.LookupRequest(table=f"t_{storage}", ids=wire.pack_ids(ids), dtype=pb_dtype)
                resp = stub.Lookup(req, timeout=10)
                held = shard.shard.lookup_into(f"t_{storage}", ids, dtype)
                assert resp.rows == held.tobytes()
                assert (resp.num_rows, resp.dim) == (3, DIM)
                assert resp.dtype == wire.DTYPE_TO_PB[dtype]
