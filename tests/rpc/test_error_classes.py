"""Errors keep their class across the wire: every EngramError subclass a server raises arrives at
StoreClient as that class with its message; a raw gRPC caller sees its status code and the class
name in trailing metadata; a peer that sends only a status code is mapped by code."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

import cluster.api  # noqa: F401  (registers the cluster's error classes, so they are covered)
from engram_store.engine import errors
from engram_store.engine.errors import EngramError, error_classes
from engram_store.engine.routing import ShardMap
from engram_store.rpc.auth import open_channel
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import AuthConfig, ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from engram_store.rpc.retry import retryable
from engram_store.rpc.status import ERROR_KEY
from tests.servers import table_spec

NO_RETRY = ClientConfig(retries=0, backoff_s=0.0, timeout_s=10)
CLASSES = sorted(error_classes().values(), key=lambda c: c.__name__)


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        if not sub.__module__.startswith("ray."):  # Ray's per-raise RayTaskError(X) wrappers
            out |= {sub} | _all_subclasses(sub)
    return out


def _arrives_as(cls: type[EngramError], message: str, address: str) -> str:
    """The message StoreClient raises for `message`: retryable errors name the shard and the
    retries spent (after none here)."""
    if retryable(cls(message)):
        return f"shard {address} failed after 0 retries: {cls.code}: {message}"
    return message


def test_grpc_code_names_are_grpcs():
    assert errors.GRPC_CODES == {c.name for c in grpc.StatusCode}


def test_registry_holds_every_class_once():
    assert {"SnapshotInProgress", "ClusterNotFound", "RayUnreachable"} <= set(error_classes())
    assert set(error_classes().values()) == _all_subclasses(EngramError) | {EngramError}
    for name, cls in error_classes().items():
        assert name == cls.__name__ and errors.error_class(name) is cls
        assert cls.code in errors.GRPC_CODES and cls.code != "OK"
        assert cls.hint and cls.hint != EngramError.hint or cls is EngramError, name
    assert errors.error_class("NoSuchError") is EngramError
    # the code map is derived from the classes: one default class per code, of that code
    for code in errors.GRPC_CODES:
        cls = errors.code_class(code)
        assert cls is EngramError or cls.code == code
        assert type(errors.error_for_code(code, "m")) is cls
    assert errors.code_class("FAILED_PRECONDITION") is errors.WrongShard
    assert errors.code_class("RESOURCE_EXHAUSTED") is errors.BatchTooLarge


def test_a_clash_is_refused_where_the_class_is_defined():
    with pytest.raises(TypeError, match="already the default class of NOT_FOUND"):
        type("AnotherNotFound", (EngramError,), {"code": "NOT_FOUND"}, default_for_code=True)
    with pytest.raises(TypeError, match="not a gRPC status code"):
        type("Typo", (EngramError,), {"code": "NOT_FUOND"})
    with pytest.raises(TypeError, match="two error classes are called TableNotFound"):
        type("TableNotFound", (EngramError,), {"code": "NOT_FOUND"})
    assert "AnotherNotFound" not in error_classes() and "Typo" not in error_classes()
    assert errors.error_class("TableNotFound").__module__ == "engram_store.engine.errors"
    assert errors.code_class("NOT_FOUND") is errors.TableNotFound


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_round_trips(make_shard, monkeypatch, cls):
    s = make_shard()
    message = f"{cls.__name__} raised in the shard: see what to change"

    def fail(*_a, **_k):
        raise cls(message)

    with StoreClient(s.address, NO_RETRY) as c:  # discovers the map before Stats fails
        monkeypatch.setattr(s.servicer.shard, "stats", fail)
        with pytest.raises(EngramError) as got:
            c.stats()
    assert type(got.value) is cls
    assert str(got.value) == _arrives_as(cls, message, s.address)

    # without our client: the class's status code, the message, the class name as metadata
    channel = grpc.insecure_channel(s.address)
    try:
        with pytest.raises(grpc.RpcError) as raw:
            pb_grpc.MemoryStoreStub(channel).Stats(pb.StatsRequest(), timeout=10)
    finally:
        channel.close()
    assert raw.value.code() == grpc.StatusCode[cls.code]
    assert raw.value.details() == message
    assert (ERROR_KEY, cls.__name__) in [tuple(m) for m in raw.value.trailing_metadata()]


def test_unexpected_exception_is_internal_without_a_class(make_shard, monkeypatch):
    s = make_shard()

    def boom(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(s.servicer.shard, "stats", boom)
    channel = grpc.insecure_channel(s.address)
    try:
        with pytest.raises(grpc.RpcError) as raw:
            pb_grpc.MemoryStoreStub(channel).Stats(pb.StatsRequest(), timeout=10)
    finally:
        channel.close()
    assert raw.value.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError: disk on fire" in raw.value.details()
    assert ERROR_KEY not in dict(raw.value.trailing_metadata() or ())


def test_snapshot_and_auth_errors_keep_their_class(make_shard):
    s = make_shard(auth=AuthConfig(read_tokens=("r",), write_tokens=("w",)))
    with pytest.raises(errors.Unauthenticated, match="requires a token"):
        StoreClient(s.address, NO_RETRY)
    with StoreClient(s.address, ClientConfig(token="r", retries=0)) as c:
        with pytest.raises(errors.ReadOnly, match="may only read"):
            c.create_table(table_spec())
    stub = pb_grpc.StoreAdminStub(open_channel(s.address, ClientConfig(token="w")))
    with pytest.raises(grpc.RpcError) as raw:
        stub.Snapshot(pb.SnapshotRequest(phase=pb.SNAPSHOT_THAW + 10, snapshot_id="x"), timeout=10)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (ERROR_KEY, "InvalidArgument") in [tuple(m) for m in raw.value.trailing_metadata()]
    stub.Snapshot(pb.SnapshotRequest(phase=pb.SNAPSHOT_FREEZE, snapshot_id="a", lease_s=5))
    try:
        with pytest.raises(grpc.RpcError) as raw:
            stub.Snapshot(pb.SnapshotRequest(phase=pb.SNAPSHOT_FREEZE, snapshot_id="b"), timeout=10)
        assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (ERROR_KEY, "SnapshotConflict") in [tuple(m) for m in raw.value.trailing_metadata()]
        with StoreClient(s.address, ClientConfig(token="w", retries=0)) as c:
            with pytest.raises(errors.SnapshotInProgress):
                c.create_table(table_spec())
    finally:
        stub.Snapshot(pb.SnapshotRequest(phase=pb.SNAPSHOT_THAW, snapshot_id="a"))


class _Peer:
    """A gRPC server that is not ours: its Stats fails with a status code and, if told, some
    trailing metadata of its own choosing."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.INTERNAL
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(
            self._stats,
            request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.StatsResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("engram.v1.MemoryStore", {"Stats": handler}),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _stats(self, request, context):
        if self.metadata:
            context.set_trailing_metadata(self.metadata)
        context.abort(self.code, f"peer says {self.code.name}")


@pytest.fixture
def peer():
    p = _Peer()
    yield p
    p.server.stop(grace=None)


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_a_peer_sending_only_a_code_maps_by_code(peer, code):
    peer.code = code
    with StoreClient(ShardMap.single(peer.address), NO_RETRY) as c:
        with pytest.raises(EngramError) as got:
            c.stats()
    assert type(got.value) is errors.code_class(code.name)
    assert f"peer says {code.name}" in str(got.value)


def test_a_class_name_that_disagrees_with_the_code_is_not_trusted(peer):
    peer.code = grpc.StatusCode.NOT_FOUND
    with StoreClient(ShardMap.single(peer.address), NO_RETRY) as c:
        peer.metadata = ((ERROR_KEY, "ReadOnly"),)  # ReadOnly travels as PERMISSION_DENIED
        with pytest.raises(EngramError) as got:
            c.stats()
        assert type(got.value) is errors.TableNotFound
        peer.metadata = ((ERROR_KEY, "SomeoneElsesError"),)  # no class of that name here
        with pytest.raises(EngramError) as got:
            c.stats()
        assert type(got.value) is errors.TableNotFound
        peer.metadata = ((ERROR_KEY, "ClusterNotFound"),)
        with pytest.raises(cluster.api.ClusterNotFound, match="peer says NOT_FOUND"):
            c.stats()


def test_stale_map_is_told_by_class_not_by_text(make_shard, monkeypatch):
    s = make_shard()
    asked: list[int] = []

    def provider() -> ShardMap:
        asked.append(1)
        return ShardMap.single(s.address)

    with StoreClient(s.address, ClientConfig(retries=2, backoff_s=0.0)) as c:
        c.create_table(table_spec())
    real = s.servicer.shard.lookup_into
    fails: list[EngramError] = [
        errors.WrongShard("the map moved on")
    ]  # no "stale shard map" in the text

    def lookup(*a, **k):
        if fails:
            raise fails.pop()
        return real(*a, **k)

    monkeypatch.setattr(s.servicer.shard, "lookup_into", lookup)
    with StoreClient(s.address, ClientConfig(retries=2, backoff_s=0.0), map_provider=provider) as c:
        assert c.lookup("t", np.arange(3)).shape == (3, 8)
        assert asked == [1]  # refreshed once, then re-routed
        # the same code and the old marker text, but another class: final, no refresh
        fails.append(errors.LayoutMismatch("stale shard map? no: this directory is another layout"))
        with pytest.raises(errors.LayoutMismatch, match="another layout"):
            c.lookup("t", np.arange(3))
        assert asked == [1]
