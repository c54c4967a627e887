"""Shared-token auth and TLS: every case a client can hit."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram_store.engine.config import OptimizerConfig, ShardConfig
from engram_store.engine.errors import ConfigError
from engram_store.rpc.auth import load_tokens_file, open_channel
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import AuthConfig, ClientConfig, ServerConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from tests.servers import table_spec

READ, WRITE = "r3ad-token", "wr1te-token"


@pytest.fixture
def secured(make_shard):
    s = make_shard(auth=AuthConfig(read_tokens=(READ,), write_tokens=(WRITE,)))
    with StoreClient(s.address, ClientConfig(token=WRITE, retries=1)) as c:
        c.create_table(table_spec("t", optimizer=OptimizerConfig(kind="sgd", lr=1.0)))
    return s


def _stub(address: str, token: str = "", root: str = "") -> pb_grpc.MemoryStoreStub:
    return pb_grpc.MemoryStoreStub(
        open_channel(address, ClientConfig(token=token, tls_root_cert=root))
    )


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def _lookup(stub):
    return stub.Lookup(
        pb.LookupRequest(table="t", ids=np.arange(3, dtype="<i8").tobytes()), timeout=10
    )


def _push(stub):
    return stub.PushGradients(
        pb.PushGradientsRequest(
            table="t",
            ids=np.arange(2, dtype="<i8").tobytes(),
            grads=np.ones((2, 8), "<f4").tobytes(),
            request_id="auth-test",
        ),
        timeout=10,
    )


@pytest.mark.parametrize("token", ["", "not-a-token", READ + "x"])
def test_no_or_unknown_token_is_unauthenticated(secured, token):
    stub = _stub(secured.address, token)
    for call in (
        lambda: _lookup(stub),
        lambda: _push(stub),
        lambda: stub.Stats(pb.StatsRequest(), timeout=10),
        lambda: stub.ListTables(pb.ListTablesRequest(), timeout=10),
    ):
        assert _code(call) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(Exception, match="requires a token"):
        StoreClient(secured.address, ClientConfig(token=token, retries=0))


def test_read_token_reads_but_cannot_write(secured):
    stub = _stub(secured.address, READ)
    assert _lookup(stub).num_rows == 3
    stub.Stats(pb.StatsRequest(), timeout=10)
    for call in (
        lambda: _push(stub),
        lambda: stub.CreateTable(pb.CreateTableRequest(), timeout=10),
        lambda: stub.DropTable(pb.DropTableRequest(name="t"), timeout=10),
        lambda: stub.SetShardState(pb.SetShardStateRequest(), timeout=10),
        lambda: stub.DeleteRows(pb.DeleteRowsRequest(table="t", slots=b"\1"), timeout=10),
        lambda: stub.ImportRows(iter([pb.RowBatch(table="t")]), timeout=10),
    ):
        assert _code(call) == grpc.StatusCode.PERMISSION_DENIED
    admin = pb_grpc.StoreAdminStub(open_channel(secured.address, ClientConfig(token=READ)))
    assert (
        _code(
            lambda: admin.Snapshot(
                pb.SnapshotRequest(phase=pb.SNAPSHOT_FREEZE, snapshot_id="x"), timeout=10
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    with StoreClient(secured.address, ClientConfig(token=READ, retries=0)) as c:
        assert c.lookup("t", [1, 2]).shape == (2, 8)
        with pytest.raises(Exception, match="may only read"):
            c.push("t", [1], np.ones((1, 8)))


def test_write_token_does_everything(secured):
    with StoreClient(secured.address, ClientConfig(token=WRITE, retries=0)) as c:
        before = c.lookup("t", [5])
        c.push("t", [5], np.ones((1, 8)))
        np.testing.assert_array_equal(c.lookup("t", [5]), before - 1.0)
        assert c.drop_table("t")


def test_health_check_needs_no_token(secured):
    channel = grpc.insecure_channel(secured.address)
    resp = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="engram.v1.MemoryStore"), timeout=10
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_non_loopback_without_tokens_is_refused(tmp_path):
    shard = ShardConfig(data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--insecure"):
        ServerConfig(shard, host="0.0.0.0").validate()
    ServerConfig(shard, host="0.0.0.0", auth=AuthConfig(insecure=True)).validate()
    ServerConfig(shard, host="0.0.0.0", auth=AuthConfig(write_tokens=("w",))).validate()
    with pytest.raises(ConfigError, match="both"):
        AuthConfig(tls_cert="c.pem").validate("127.0.0.1")


def test_tokens_file(tmp_path):
    p = tmp_path / "tokens"
    p.write_text("# who may do what\nread abc\nwrite def  # trainer\n\nread ghi\n")
    p.chmod(0o600)
    assert load_tokens_file(str(p)) == (("abc", "ghi"), ("def",))
    p.write_text("admin xyz\n")
    with pytest.raises(ConfigError, match="read TOKEN"):
        load_tokens_file(str(p))


def _self_signed(tmp_path):
    x509 = pytest.importorskip(
        "cryptography.x509",
        reason="TLS test needs the `cryptography` package to make a self-signed certificate",
    )
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_tls_with_tokens(make_shard, tmp_path):
    cert, key = _self_signed(tmp_path)
    s = make_shard(auth=AuthConfig(write_tokens=(WRITE,), tls_cert=cert, tls_key=key))
    with StoreClient(s.address, ClientConfig(token=WRITE, tls_root_cert=cert, retries=0)) as c:
        c.create_table(table_spec("t"))
        assert c.lookup("t", [1, 2, 3]).shape == (3, 8)
    # TLS without a token is still unauthenticated; plaintext does not get through at all
    assert _code(lambda: _lookup(_stub(s.address, "", cert))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: _lookup(_stub(s.address, WRITE))) == grpc.StatusCode.UNAVAILABLE
