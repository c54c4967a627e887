"""Fuzzing every RPC of a live server: random bytes and well-formed messages with random fields.

Every answer must be OK or a proper status (never INTERNAL / UNKNOWN), the server must keep
serving, and a request that is refused must not change the table (rows, optimizer state, step).
"""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_store.engine.config import OptimizerConfig
from engram_store.rpc.client import StoreClient
from engram_store.rpc.proto import store_pb2 as pb
from tests.servers import LocalShard, table_spec

TABLE = "fz"
ROWS, DIM = 64, 4
BAD = (
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
METHODS = [
    (f"/{s.full_name}/{m.name}", m)
    for s in pb.DESCRIPTOR.services_by_name.values()
    for m in s.methods
]
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


class Target:
    """A live shard with table `fz` (Adam, some rows pushed) and a raw channel to it."""

    def __init__(self, tmp_path_factory):
        self.shard = LocalShard(tmp_path_factory.mktemp("fuzz"), metrics_port=0)
        self.channel = grpc.insecure_channel(self.shard.address)
        with StoreClient(self.shard.address) as c:
            c.create_table(
                table_spec(TABLE, ROWS, DIM, optimizer=OptimizerConfig(kind="adam", lr=0.1))
            )
            c.push(TABLE, np.arange(0, ROWS, 3), np.ones((22, DIM)), step=1)
        self.requests = 0
        self.refused = 0
        self.baseline = self.checksum()

    def call(self, method: str, m, body) -> tuple[grpc.StatusCode, object]:
        """Send one request (bytes, or a list of bytes for a client stream); (code, response)."""
        self.requests += 1
        try:
            if m.client_streaming:
                rpc = self.channel.stream_unary(method)
                return grpc.StatusCode.OK, rpc(iter(body), timeout=20)
            if m.server_streaming:
                return grpc.StatusCode.OK, list(self.channel.unary_stream(method)(body, timeout=20))
            return grpc.StatusCode.OK, self.channel.unary_unary(method)(body, timeout=20)
        except grpc.RpcError as e:
            assert e.code() not in BAD, f"{method}: {e.code().name}: {e.details()}"
            return e.code(), None

    def checksum(self) -> str:
        """Rows, stored records (rows + optimizer state) and counters of `fz`."""
        h = hashlib.sha256()
        ids = np.arange(ROWS, dtype="<i8").tobytes()
        h.update(
            pb.LookupResponse.FromString(
                self.channel.unary_unary("/engram.v1.MemoryStore/Lookup")(
                    pb.LookupRequest(table=TABLE, ids=ids).SerializeToString(), timeout=20
                )
            ).rows
        )
        for b in self.channel.unary_stream("/engram.v1.MemoryStore/ExportRows")(
            pb.ExportRowsRequest(table=TABLE, slots=b"\1").SerializeToString(), timeout=20
        ):
            h.update(pb.RowBatch.FromString(b).SerializeToString(deterministic=True))
        info = pb.TableInfo.FromString(
            self.channel.unary_unary("/engram.v1.MemoryStore/GetTable")(
                pb.GetTableRequest(name=TABLE).SerializeToString(), timeout=20
            )
        )
        h.update(info.SerializeToString(deterministic=True))
        return h.hexdigest()

    def after(self, method: str, code: grpc.StatusCode, request: object = None) -> None:
        """Check the table after one request; undo shard-wide side effects of accepted ones."""
        if code != grpc.StatusCode.OK:
            self.refused += 1
            assert self.checksum() == self.baseline, f"refused {method} changed the table"
            return
        if method.endswith("/SetShardState"):  # back to a standalone shard owning every slot
            self.channel.unary_unary(method)(pb.SetShardStateRequest().SerializeToString())
        if method.endswith("/Snapshot") and request is not None:
            self.channel.unary_unary(method)(
                pb.SnapshotRequest(
                    phase=pb.SNAPSHOT_THAW, snapshot_id=request.snapshot_id
                ).SerializeToString()
            )
        self.baseline = self.checksum()  # an accepted write may change the table

    def close(self) -> None:
        self.channel.close()
        self.shard.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    t = Target(tmp_path_factory)
    yield t
    t.close()


# ---- random bytes as request bodies ----


@pytest.mark.parametrize("method,m", METHODS, ids=[x[0].rsplit("/", 1)[-1] for x in METHODS])
@FUZZ
@given(
    body=st.one_of(st.binary(max_size=64), st.binary(min_size=200, max_size=2000)),
    chunks=st.integers(1, 3),
)
def test_random_bytes(target, method, m, body, chunks):
    code, _ = target.call(method, m, [body] * chunks if m.client_streaming else body)
    target.after(method, code)


# ---- well-formed messages with random fields ----

_INTS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
}


def _bytes_field() -> st.SearchStrategy[bytes]:
    small_ids = st.lists(st.integers(-5, ROWS + 5), max_size=40).map(
        lambda v: np.asarray(v, "<i8").tobytes()
    )
    floats = st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=160).map(
        lambda v: np.asarray(v, "<f4").tobytes()
    )
    return st.one_of(
        st.binary(max_size=64), small_ids, floats, st.just(b"\1"), st.just(b"\1" * 1024)
    )


def _value(f) -> st.SearchStrategy:
    if f.type == FD.TYPE_MESSAGE:
        return _message(f.message_type, depth=1)
    if f.type in _INTS:
        lo, hi = _INTS[f.type]
        return st.one_of(
            st.integers(max(lo, -3), 70), st.integers(lo, hi), st.sampled_from([lo, hi])
        )
    if f.type == FD.TYPE_ENUM:
        return st.one_of(
            st.sampled_from([v.number for v in f.enum_type.values]),
            st.integers(-(2**31), 2**31 - 1),
        )
    if f.type == FD.TYPE_DOUBLE:
        return st.one_of(st.floats(allow_nan=True), st.sampled_from([0.0, 1e-3, 1.0, -1.0]))
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type == FD.TYPE_STRING:
        return st.one_of(st.sampled_from([TABLE, "", "other", "a/b"]), st.text(max_size=20))
    if f.type == FD.TYPE_BYTES:
        return _bytes_field()
    raise AssertionError(f"no strategy for field type {f.type}")


def _message(desc, depth: int = 0) -> st.SearchStrategy:
    fields = {}
    for f in desc.fields:
        v = _value(f) if depth < 3 else st.nothing()
        if f.is_repeated:
            v = st.lists(v, max_size=4)
        fields[f.name] = v
    cls = getattr(pb, desc.name)
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: _build(cls, kw))


def _build(cls, kw: dict):
    msg = cls()
    for k, v in kw.items():
        f = cls.DESCRIPTOR.fields_by_name[k]
        if f.is_repeated:
            if f.type == FD.TYPE_MESSAGE:
                for x in v:
                    getattr(msg, k).add().CopyFrom(x)
            else:
                getattr(msg, k).extend(v)
        elif f.type == FD.TYPE_MESSAGE:
            getattr(msg, k).CopyFrom(v)
        else:
            setattr(msg, k, v)
    return msg


def _safe(method: str, req) -> bool:
    """Requests the harness keeps away from: dropping the fuzzed table itself, and a COPY that
    would write outside a temp directory."""
    if method.endswith("/DropTable") and req.name == TABLE:
        return False
    return not (method.endswith("/Snapshot") and req.path and not req.path.startswith("/tmp/"))


@pytest.mark.parametrize("method,m", METHODS, ids=[x[0].rsplit("/", 1)[-1] for x in METHODS])
@FUZZ
@given(data=st.data())
def test_well_formed_random_fields(target, method, m, data):
    req = data.draw(_message(m.input_type))
    if not _safe(method, req):
        return
    body = req.SerializeToString()
    if m.client_streaming:
        more = data.draw(st.lists(_message(m.input_type), max_size=2))
        code, _ = target.call(method, m, [body, *(r.SerializeToString() for r in more)])
    else:
        code, _ = target.call(method, m, body)
    target.after(method, code, req)


def test_server_still_serves_after_fuzzing(target):
    """Runs last in this module: the same server answers and counted no internal errors."""
    with StoreClient(target.shard.address) as c:
        assert c.lookup(TABLE, np.arange(ROWS)).shape == (ROWS, DIM)
        methods = {s["method"]: s for s in c.stats()[0]["methods"]}
    assert target.requests > 3000 and target.refused > 1000, (target.requests, target.refused)
    assert sum(s["requests"] for s in methods.values()) >= target.requests
