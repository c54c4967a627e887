"""Issue 12's service items against real servers on loopback: idle and headers-only calls are
cancelled and never delay authorised traffic, a body without a token is refused unread, an
ImportRows stream stores all or nothing, a small request for a huge answer is refused before it
is built, a full disk says what is full and where, the client's retry budget covers a restart,
/metrics takes the tokens and TLS, a tokens file must be private, a wrong token is told apart
from a missing one."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error

import grpc
import numpy as np
import psutil
import pytest

from engram_store.engine import errors
from engram_store.engine.config import OptimizerConfig
from engram_store.ops.snapshot import snapshot
from engram_store.rpc import wire
from engram_store.rpc.auth import load_tokens_file
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import AuthConfig, ClientConfig
from engram_store.rpc.metrics import scrape
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from engram_store.rpc.retry import RetryPolicy
from tests.rpc.test_auth import _self_signed
from tests.servers import table_spec

READ, WRITE = "r-token", "w-token"
AUTH = AuthConfig(read_tokens=(READ,), write_tokens=(WRITE,))
SGD = OptimizerConfig(kind="sgd", lr=1.0)
LOOKUP = "/engram.v1.MemoryStore/Lookup"
IMPORT = "/engram.v1.MemoryStore/ImportRows"


def _metadata(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


class IdleCall:
    """A call that sends its headers and then no message (or, for ExportRows, never reads its
    answer) until released; `result` is its final status code."""

    def __init__(self, address: str, method: str, token: str = "", export_table: str = ""):
        self.channel = grpc.insecure_channel(address)
        self.release = threading.Event()
        self.result: grpc.StatusCode | None = None
        self.done = threading.Event()
        if export_table:
            req = pb.ExportRowsRequest(table=export_table, slots=b"\x01", batch_rows=256)
            self.call = pb_grpc.MemoryStoreStub(self.channel).ExportRows(
                req, metadata=_metadata(token), timeout=120
            )
            return
        rpc = self.channel.stream_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

        def never():
            self.release.wait(120)
            return
            yield  # a generator that yields nothing

        self.call = rpc.future(never(), metadata=_metadata(token), timeout=120)
        self.call.add_done_callback(lambda f: self._finish(f.code()))

    def drain(self) -> None:
        """Read what an unread ExportRows stream holds: the client learns how the server ended
        it only after the messages buffered before (one read per message)."""
        try:
            for _ in self.call:
                pass
            self._finish(self.call.code())
        except grpc.RpcError as e:
            self._finish(e.code())

    def _finish(self, code: grpc.StatusCode) -> None:
        self.result = code
        self.done.set()

    def close(self) -> None:
        self.release.set()
        self.call.cancel()
        self.channel.close()


def _p99_lookups(address: str, token: str, table: str, n: int = 60) -> float:
    """p99 latency (ms) of n authorised lookups; each must finish well within its deadline."""
    lat = []
    with StoreClient(address, ClientConfig(token=token, timeout_s=15, retries=0)) as c:
        for i in range(n):
            t0 = time.perf_counter()
            assert c.lookup(table, np.arange(i, i + 64)).shape == (64, 8)
            lat.append(time.perf_counter() - t0)
    return float(np.percentile(np.asarray(lat) * 1e3, 99))


def test_idle_calls_are_cancelled_and_do_not_delay_lookups(make_shard):
    s = make_shard(auth=AUTH, message_timeout_s=1.5, workers=4)
    with StoreClient(s.address, ClientConfig(token=WRITE)) as c:
        c.create_table(table_spec("t", num_rows=200_000, dim=8))
        # ~19 MB of records to export: more than an unread stream's buffers hold
        for lo in range(0, 200_000, 4096):
            ids = np.arange(lo, min(lo + 4096, 200_000))
            c.push("t", ids, np.ones((len(ids), 8), np.float32), step=1)
    quiet = _p99_lookups(s.address, READ, "t")
    idle = [IdleCall(s.address, LOOKUP) for _ in range(8)]  # no token, headers only
    idle += [IdleCall(s.address, LOOKUP, READ) for _ in range(8)]  # a token, no message
    idle += [IdleCall(s.address, "", READ, export_table="t") for _ in range(8)]  # never read
    idle += [IdleCall(s.address, IMPORT, WRITE) for _ in range(2)]  # an import that stalls
    try:
        time.sleep(0.3)
        busy = _p99_lookups(s.address, READ, "t")
        print(f"\nlookup p99: {quiet:.1f} ms alone, {busy:.1f} ms with {len(idle)} idle calls")
        deadline = time.monotonic() + 30
        while s.server.extras.limits.cancelled < 18 and time.monotonic() < deadline:
            time.sleep(0.1)
        for call in idle[16:24]:
            call.drain()
        for call in idle:
            call.done.wait(max(0.0, deadline - time.monotonic()))
        open_calls = [i for i, call in enumerate(idle) if not call.done.is_set()]
        assert not open_calls, f"idle calls {open_calls} were never ended by the server"
        codes = [c.result for c in idle]
        assert codes[:8] == [grpc.StatusCode.UNAUTHENTICATED] * 8
        assert set(codes[8:]) == {grpc.StatusCode.CANCELLED}, codes
        assert s.server.extras.limits.cancelled == 18
    finally:
        for call in idle:
            call.close()


def test_an_idle_import_stream_does_not_fail_a_snapshot(make_shard, tmp_path):
    s = make_shard(message_timeout_s=60)
    with StoreClient(s.address) as c:
        c.create_table(table_spec("t"))
        c.push("t", np.arange(10), np.ones((10, 8)), step=1)
    idle = IdleCall(s.address, IMPORT)
    try:
        time.sleep(0.2)
        path = snapshot(s.address, str(tmp_path / "snap"), lease_s=3)
        assert os.path.exists(path)
        assert not idle.done.is_set()  # still open, and it held nothing up
    finally:
        idle.close()


BOMB_CLIENT = textwrap.dedent(
    """
    import sys, grpc
    from engram_store.rpc.proto import store_pb2 as pb, store_pb2_grpc as pb_grpc
    address, token, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    gzip = grpc.Compression.Gzip if sys.argv[4] == "gzip" else grpc.Compression.NoCompression
    req = pb.LookupRequest(table="t", ids=bytes(size))
    md = (("authorization", "Bearer " + token),) if token else ()
    with grpc.insecure_channel(address) as ch:
        try:
            pb_grpc.MemoryStoreStub(ch).Lookup(
                req, metadata=md, timeout=60, compression=gzip
            )
            print("OK")
        except grpc.RpcError as e:
            print(e.code().name, e.details())
    """
)


def test_bodies_are_refused_unread_and_never_inflated(make_shard):
    """Gzip bombs (256 MiB of zeros in ~255 KB), with no, a wrong and a valid token, and a plain
    128 MiB body without a token: none is inflated or parsed (the server's RSS stays flat)."""
    s = make_shard(auth=AUTH, max_message_bytes=512 << 20)
    with StoreClient(s.address, ClientConfig(token=WRITE)) as c:
        c.create_table(table_spec("t"))
    me = psutil.Process()
    peak = [me.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], me.memory_info().rss)

    base = me.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attacks = [("", 256 << 20, "gzip"), ("wrong", 256 << 20, "gzip"), (READ, 256 << 20, "gzip")]
    attacks.append(("", 128 << 20, "plain"))
    out = []
    try:
        for token, size, how in attacks:
            r = subprocess.run(
                [sys.executable, "-c", BOMB_CLIENT, s.address, token, str(size), how],
                capture_output=True,
                text=True,
                timeout=120,
            )
            out.append(r.stdout.strip())
    finally:
        stop.set()
        sampler.join()
    grown = (peak[0] - base) >> 20
    print(f"\nserver RSS grew {grown} MiB over 3 gzip bombs and a 128 MiB body: {out}")
    for answer in out[:3]:  # compressed requests are refused by grpc before the app sees them
        assert answer.startswith("UNIMPLEMENTED") and "is disabled" in answer, answer
    assert out[3].startswith("UNAUTHENTICATED") and "sent none" in out[3], out[3]
    assert grown < 64, f"the server read a body it should have refused: RSS +{grown} MiB"


def _records(s, table: str, n: int) -> np.ndarray:
    return np.zeros((n, s.shard.record_bytes(table)), np.uint8)


def _batch(table, ids, records, step=0, record_bytes=None):
    return pb.RowBatch(
        table=table,
        ids=wire.pack_ids(np.asarray(ids, np.int64)),
        records=records.tobytes(),
        record_bytes=record_bytes or records.shape[1],
        step=step,
    )


def test_import_rows_is_all_or_nothing(make_shard):
    s = make_shard()
    with StoreClient(s.address) as c:
        c.create_table(table_spec("t", optimizer=SGD))
        c.push("t", np.arange(0, 300, 3), np.ones((100, 8)), step=2)
        before = c.lookup("t", np.arange(300)), c.table_info("t")
    stub = pb_grpc.MemoryStoreStub(grpc.insecure_channel(s.address))
    rec = _records(s, "t", 100)
    nan = rec.copy()
    nan[:, :4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    bad_tails = {
        "record size": _batch("t", range(200, 300), rec[:, :-4]),
        "NaN row": _batch("t", range(200, 300), nan),
        "step": _batch("t", range(200, 300), rec, step=2**62),
        "other table": _batch("u", range(200, 300), rec),
        "repeated ids": _batch("t", range(0, 100), rec),
    }
    for what, tail in bad_tails.items():
        stream = [_batch("t", range(0, 100), rec), _batch("t", range(100, 200), rec), tail]
        with pytest.raises(grpc.RpcError) as e:
            stub.ImportRows(iter(stream), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.value.details())
    with StoreClient(s.address) as c:
        after = c.lookup("t", np.arange(300)), c.table_info("t")
    np.testing.assert_array_equal(after[0], before[0])
    assert (after[1].stored_rows, after[1].step, after[1].pushes) == (
        before[1].stored_rows,
        before[1].step,
        before[1].pushes,
    )
    # a whole good stream is stored, with its highest step
    stream = [_batch("t", range(0, 100), rec), _batch("t", range(100, 200), rec, step=9)]
    assert stub.ImportRows(iter(stream), timeout=10).rows == 200
    with StoreClient(s.address) as c:
        assert c.table_info("t").step == 9
        assert not c.lookup("t", np.arange(200)).any()


def test_import_stream_above_the_staging_limit_stores_nothing(make_shard):
    s = make_shard(max_import_bytes=64 << 10)
    with StoreClient(s.address) as c:
        c.create_table(table_spec("t", optimizer=SGD))
    stub = pb_grpc.MemoryStoreStub(grpc.insecure_channel(s.address))
    rec = _records(s, "t", 1000)
    stream = [_batch("t", range(k * 1000, (k + 1) * 1000), rec) for k in range(3)]
    with pytest.raises(grpc.RpcError) as e:
        stub.ImportRows(iter(stream), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "several streams" in e.value.details()
    assert s.shard.table_stats("t").stored_rows == 0


def test_malformed_shard_map_is_refused_and_clients_keep_working(shard):
    stub = pb_grpc.MemoryStoreStub(grpc.insecure_channel(shard.address))
    state = pb.ShardState(
        shard_index=0,
        map_version=3,
        num_slots=4,
        owned=b"\x01" * 4,
        shard_map_json='{"slots": [0, ',
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.SetShardState(pb.SetShardStateRequest(state=state), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with StoreClient(shard.address) as c:
        c.create_table(table_spec("t"))
        assert c.lookup("t", np.arange(4)).shape == (4, 8)
    assert stub.Stats(pb.StatsRequest(), timeout=10).shard.map_version == 0


def test_a_small_request_for_a_huge_answer_is_refused_before_it_is_built(make_shard):
    s = make_shard(max_message_bytes=1 << 20)
    with StoreClient(s.address) as c:
        c.create_table(table_spec("wide", num_rows=10_000, dim=1024))
        before = s.shard.stats()["stored_rows"]
        # 4096 ids (32 KB) ask for 16 MiB of float32 rows
        with pytest.raises(errors.BatchTooLarge, match="1048576-byte message limit"):
            c._call(
                s.address,
                "LookupRaw",
                pb.LookupRequest(table="wide", ids=wire.pack_ids(np.arange(4096))),
            )
        assert s.shard.stats()["stored_rows"] == before
        assert c.lookup("wide", np.arange(200)).shape == (200, 1024)  # the client splits


def test_a_full_disk_is_resource_exhausted_naming_the_data_dir(make_shard, tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        data = mnt / "shard"
        s = make_shard(data_dir=str(data), map_size=64 << 20)
        with StoreClient(s.address, ClientConfig(retries=0)) as c:
            c.create_table(table_spec("t", num_rows=1_000_000, dim=64, optimizer=SGD))
            with pytest.raises(errors.StoreFull) as e:
                for k in range(200):  # 1 MiB of gradients a push: the disk fills
                    ids = np.arange(k * 4096, (k + 1) * 4096)
                    c.push("t", ids, np.ones((4096, 64), np.float32), step=k + 1)
            assert str(data) in str(e.value) and "free" in str(e.value)
            assert type(e.value).code == "RESOURCE_EXHAUSTED"
            assert c.lookup("t", np.arange(4)).shape == (4, 64)  # reads still served
        # closing skips the final checkpoint it cannot write (the log replays at the next open)
        s.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_default_retry_budget_covers_a_slow_restart(make_shard):
    policy = RetryPolicy.of(ClientConfig())
    assert policy.deadline_s == 30.0 and policy.retries is None
    s = make_shard()
    with StoreClient(s.address) as c:
        c.create_table(table_spec("t"))
        s.stop()
        s.config = dataclasses.replace(s.config, port=s.port)
        restart = threading.Timer(8.0, s.start)  # longer than the old budget of ~7 s
        restart.start()
        t0 = time.monotonic()
        assert c.lookup("t", np.arange(3)).shape == (3, 8)
        waited = time.monotonic() - t0
        restart.join()
    print(f"\nlookup waited {waited:.1f} s for the restart")


def test_metrics_take_the_tokens_and_tls(make_shard, tmp_path):
    cert, key = _self_signed(tmp_path)
    auth = dataclasses.replace(AUTH, tls_cert=str(cert), tls_key=str(key))
    s = make_shard(auth=auth, metrics_port=0)
    where = f"127.0.0.1:{s.server.extras.metrics_port}"
    for token, says in (("", "needs one of its tokens"), ("nope", "not one of")):
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(where, token=token, tls_root_cert=str(cert))
        assert e.value.code == 401 and says in e.value.read().decode()
    assert "engram_stored_rows" in scrape(where, token=READ, tls_root_cert=str(cert))
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain http to the TLS port
        scrape(f"http://{where}/metrics", token=READ)


def test_tokens_file_must_be_private(tmp_path):
    p = tmp_path / "tokens"
    p.write_text("write w\n")
    p.chmod(0o644)
    with pytest.raises(errors.ConfigError, match=f"chmod 600 {p}"):
        load_tokens_file(str(p))
    p.chmod(0o600)
    assert load_tokens_file(str(p)) == ((), ("w",))


def test_a_wrong_token_is_told_apart_from_a_missing_one(make_shard):
    s = make_shard(auth=AUTH)
    messages = []
    for token in ("", "wrong"):
        with pytest.raises(errors.Unauthenticated) as e:
            StoreClient(s.address, ClientConfig(token=token, retries=0))
        messages.append(str(e.value))
    assert "sent none" in messages[0] and "not one of its tokens" in messages[1]


def test_calls_beyond_the_admitted_limit_are_refused_at_once(make_shard):
    s = make_shard(message_timeout_s=1.0, max_concurrent_rpcs=4)
    idle = [IdleCall(s.address, LOOKUP) for _ in range(4)]
    try:
        time.sleep(0.3)
        stub = pb_grpc.MemoryStoreStub(grpc.insecure_channel(s.address))
        with pytest.raises(grpc.RpcError) as e:
            stub.Stats(pb.StatsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in idle:
            assert call.done.wait(20) and call.result == grpc.StatusCode.CANCELLED
        stub.Stats(pb.StatsRequest(), timeout=10)  # admitted again once they are gone
    finally:
        for call in idle:
            call.close()
