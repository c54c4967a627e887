"""Adversarial suite (issue 12): one shard server in a subprocess on loopback, attacked for a
bounded time while authorised clients read and train on it.

    pytest -m slow tests/rpc/test_adversarial.py -s                 # ~60 s of attacks
    ENGRAM_ADVERSARIAL_S=300 pytest -m slow tests/rpc/test_adversarial.py -s

Attacks (one thread, one at a time, cycling): poisoned pushes (steps 2**63-1, 2**62, -1;
gradients 1e20, NaN, inf; ids out of range; wrong sizes; unknown tables and dtypes), ImportRows
streams that go bad after good batches (NaN, 1e20, a huge step, a wrong size, another table,
repeated ids, unparsable bytes), unparsable bytes to every method, malformed shard maps, bad table
specs (a name with a final newline), small requests for huge answers, writes with a read token,
wrong tokens, gzip bombs and a large body without a token, bad snapshot calls, and read-only
lookups of fresh ids. Beside them, a background thread keeps idle calls open: headers-only calls
without a token, calls with a read token that send no message, unread ExportRows streams, idle
ImportRows streams. After every attack the victim table's checksum (every stored row and its
optimizer state, exported) and the shard's metadata (its tables' counters and shard state) must
equal what they were before the attacks.

Authorised traffic meanwhile: a reader measuring Lookup latency, a trainer pushing SGD (lr 1,
zero init, integer gradients) to its own table with request ids, and snapshots taken while idle
import streams are open. At the end: the server is alive and answers, every acknowledged push is
in the table exactly (each row equals minus the sum of the gradients acknowledged for it).
Prints one JSON summary: attacks tried, crashes, INTERNAL answers, state changes by rejected
requests, acknowledged pushes lost, authorised p99 latency during the attacks, server RSS.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.ops.snapshot import snapshot
from engram_store.rpc import wire
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from tests.servers import ROOT

pytestmark = pytest.mark.slow

DURATION_S = float(os.environ.get("ENGRAM_ADVERSARIAL_S", "60"))
READ, WRITE = "adv-read", "adv-write"
MAX_MESSAGE = 8 << 20
VICTIM = TableConfig(
    name="victim", num_rows=50_000, dim=64, seed=3, optimizer=OptimizerConfig(kind="adam")
)
TRAIN = TableConfig(
    name="train",
    num_rows=20_000,
    dim=8,
    init="zeros",
    optimizer=OptimizerConfig(kind="sgd", lr=1.0),
)
CODES = grpc.StatusCode

SERVER = textwrap.dedent(
    """
    import sys
    from engram_store.engine.config import ShardConfig
    from engram_store.rpc.config import AuthConfig, ServerConfig
    from engram_store.rpc.server import serve
    config = ServerConfig(
        ShardConfig(data_dir=sys.argv[1]),
        auth=AuthConfig(read_tokens=(sys.argv[2],), write_tokens=(sys.argv[3],)),
        max_message_bytes=int(sys.argv[4]),
        message_timeout_s=2.0,
        workers=4,
    )
    serve(config, ready=lambda host, port: print(f"serving on {host}:{port}", flush=True))
    """
)


def _md(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _raw(channel: grpc.Channel, method: str, streaming: bool = False):
    kind = channel.stream_unary if streaming else channel.unary_unary
    return kind(
        f"/engram.v1.{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


def _code(fn) -> CODES:
    try:
        fn()
        return CODES.OK
    except grpc.RpcError as e:
        return e.code()


class Attacker:
    """The attacks, each a (name, call returning a status code, codes that count as refused)."""

    def __init__(self, address: str):
        self.ch = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = pb_grpc.MemoryStoreStub(self.ch)
        self.admin = pb_grpc.StoreAdminStub(self.ch)
        self.record_bytes = 0  # set once the victim exists

    def push(self, token=WRITE, table="victim", ids=(1, 2), grads=None, **kw):
        ids = np.asarray(ids, np.int64)
        g = np.ones((len(ids), VICTIM.dim), np.float32) if grads is None else grads
        req = pb.PushGradientsRequest(
            table=table,
            ids=wire.pack_ids(ids),
            grads=np.asarray(g, np.float32).tobytes(),
            **kw,
        )
        return _code(lambda: self.stub.PushGradients(req, metadata=_md(token), timeout=20))

    def import_rows(self, bad: pb.RowBatch | bytes):
        good = pb.RowBatch(
            table="victim",
            ids=wire.pack_ids(np.arange(40_000, 40_100)),
            records=bytes(100 * self.record_bytes),
            record_bytes=self.record_bytes,
        )
        stream = [
            good.SerializeToString(),
            bad if isinstance(bad, bytes) else bad.SerializeToString(),
        ]
        rpc = _raw(self.ch, "MemoryStore/ImportRows", streaming=True)
        return _code(lambda: rpc(iter(stream), metadata=_md(WRITE), timeout=20))

    def bad_batch(self, values=None, step=0, record_bytes=None, table="victim", ids=None):
        rb = self.record_bytes
        rec = np.zeros((100, rb), np.uint8)
        if values is not None:
            rec[:, :4] = np.frombuffer(np.float32(values).tobytes(), np.uint8)
        ids = np.arange(40_100, 40_200) if ids is None else ids
        return pb.RowBatch(
            table=table,
            ids=wire.pack_ids(ids),
            records=rec[:, : record_bytes or rb].tobytes(),
            record_bytes=record_bytes or rb,
            step=step,
        )

    def unparsable(self, method: str, token=WRITE):
        rpc = _raw(self.ch, method)
        return _code(lambda: rpc(b"\xff\xff\xff\xff", metadata=_md(token), timeout=20))

    def bomb(self, token: str, size: int, compress: bool):
        req = pb.LookupRequest(table="victim", ids=bytes(size)).SerializeToString()
        comp = grpc.Compression.Gzip if compress else grpc.Compression.NoCompression
        rpc = _raw(self.ch, "MemoryStore/Lookup")
        return _code(lambda: rpc(req, metadata=_md(token), timeout=30, compression=comp))

    def shard_state(self, **fields):
        st = pb.ShardState(**{"shard_index": 0, "map_version": 9, "num_slots": 4, **fields})
        req = pb.SetShardStateRequest(state=st)
        return _code(lambda: self.stub.SetShardState(req, metadata=_md(WRITE), timeout=20))

    def create(self, token=WRITE, **spec):
        fields = {"name": "x", "num_rows": 10, "dim": 4, **spec}
        req = pb.CreateTableRequest(spec=pb.TableSpec(**fields))
        return _code(lambda: self.stub.CreateTable(req, metadata=_md(token), timeout=20))

    def lookup(self, token=READ, n=4, **kw):
        req = pb.LookupRequest(table="victim", ids=wire.pack_ids(np.arange(n)), **kw)
        return _code(lambda: self.stub.Lookup(req, metadata=_md(token), timeout=30))

    def snap(self, **kw):
        req = pb.SnapshotRequest(snapshot_id="evil", **kw)
        return _code(lambda: self.admin.Snapshot(req, metadata=_md(WRITE), timeout=20))

    def attacks(self) -> list[tuple[str, object, set]]:
        bad = {CODES.INVALID_ARGUMENT}
        big = {CODES.RESOURCE_EXHAUSTED}
        denied = {CODES.UNAUTHENTICATED}
        n = VICTIM.num_rows
        return [
            ("push step 2**63-1", lambda: self.push(step=2**63 - 1, request_id="s63"), bad),
            ("push step 2**63-1, no id", lambda: self.push(step=2**63 - 1), bad),
            ("push step 2**62", lambda: self.push(step=2**62), bad),
            ("push step -1", lambda: self.push(step=-1), bad),
            ("push grads 1e20", lambda: self.push(grads=np.full((2, 64), 1e20)), bad),
            ("push grads NaN", lambda: self.push(grads=np.full((2, 64), np.nan)), bad),
            ("push grads inf", lambda: self.push(grads=np.full((2, 64), np.inf)), bad),
            ("push id out of range", lambda: self.push(ids=(n + 5, 1)), bad),
            ("push negative id", lambda: self.push(ids=(-1, 1)), bad),
            ("push short grads", lambda: self.push(grads=np.ones((1, 64))), bad),
            ("push unknown table", lambda: self.push(table="nope"), {CODES.NOT_FOUND}),
            ("push unknown dtype", lambda: self.push(grad_dtype=99), bad),
            ("push with read token", lambda: self.push(token=READ), {CODES.PERMISSION_DENIED}),
            ("push wrong token", lambda: self.push(token="guess"), denied),
            ("push no token", lambda: self.push(token=""), denied),
            ("import then NaN", lambda: self.import_rows(self.bad_batch(np.nan)), bad),
            ("import then 1e20", lambda: self.import_rows(self.bad_batch(1e20)), bad),
            (
                "import then step 2**63-1",
                lambda: self.import_rows(self.bad_batch(step=2**63 - 1)),
                bad,
            ),
            (
                "import then wrong size",
                lambda: self.import_rows(self.bad_batch(record_bytes=7)),
                bad,
            ),
            (
                "import then other table",
                lambda: self.import_rows(self.bad_batch(table="train")),
                bad,
            ),
            (
                "import then repeated ids",
                lambda: self.import_rows(self.bad_batch(ids=np.arange(40_000, 40_100))),
                bad,
            ),
            ("import then unparsable", lambda: self.import_rows(b"\xff\xff\xff"), bad),
            *[
                (f"unparsable {m}", lambda m=m: self.unparsable(f"MemoryStore/{m}"), bad)
                for m in (
                    "Lookup",
                    "PushGradients",
                    "CreateTable",
                    "DropTable",
                    "GetTable",
                    "SetShardState",
                    "DeleteRows",
                    "Stats",
                )
            ],
            ("unparsable Snapshot", lambda: self.unparsable("StoreAdmin/Snapshot"), bad),
            ("shard map not JSON", lambda: self.shard_state(shard_map_json='{"slots": ['), bad),
            (
                "shard map of 4 slots, owned of 3",
                lambda: self.shard_state(owned=b"\x01" * 3),
                bad,
            ),
            ("shard state num_slots -1", lambda: self.shard_state(num_slots=-1), bad),
            ("table named small\\n", lambda: self.create(name="small\n"), bad),
            ("table without a name", lambda: self.create(name=""), bad),
            ("table of 2**63-1 rows", lambda: self.create(num_rows=2**63 - 1), bad),
            ("table of dim 0", lambda: self.create(dim=0), bad),
            ("create with read token", lambda: self.create(token=READ), {CODES.PERMISSION_DENIED}),
            ("huge answer", lambda: self.lookup(n=65_536), big),
            ("too many ids", lambda: self.lookup(n=65_537), big),
            ("lookup unknown dtype", lambda: self.lookup(dtype=42), bad),
            ("lookup wrong token", lambda: self.lookup(token="guess"), denied),
            ("gzip bomb, no token", lambda: self.bomb("", 64 << 20, True), {CODES.UNIMPLEMENTED}),
            (
                "gzip bomb, read token",
                lambda: self.bomb(READ, 64 << 20, True),
                {CODES.UNIMPLEMENTED},
            ),
            (
                "32 MiB body, no token",
                lambda: self.bomb("", 32 << 20, False),
                denied | big,
            ),
            (
                "snapshot COPY unfrozen",
                lambda: self.snap(phase=pb.SNAPSHOT_COPY, path="/tmp/x"),
                bad | {CODES.FAILED_PRECONDITION, CODES.ABORTED},
            ),
            (
                "snapshot relative path",
                lambda: self.snap(phase=pb.SNAPSHOT_COPY, path="x"),
                bad | {CODES.FAILED_PRECONDITION, CODES.ABORTED},
            ),
            ("snapshot phase 77", lambda: self.snap(phase=77), bad),
            ("snapshot lease 1e9", lambda: self.snap(phase=pb.SNAPSHOT_FREEZE, lease_s=1e9), bad),
            # not refused, but must store nothing: reads of fresh ids
            ("lookup 8192 fresh ids", lambda: self.lookup(n=8192), {CODES.OK}),
        ]

    def close(self) -> None:
        self.ch.close()


class Idler(threading.Thread):
    """Keeps idle calls open: headers-only without a token, a read token and no message, unread
    ExportRows streams, idle ImportRows streams; reopens each as the server ends it."""

    def __init__(self, address: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.address, self.stop = address, stop
        self.opened = 0
        self.ended: dict[str, int] = {}

    def _one(self, kind: str) -> None:
        ch = grpc.insecure_channel(self.address)
        release = threading.Event()

        def never():
            release.wait(60)
            return
            yield

        try:
            if kind == "export":
                req = pb.ExportRowsRequest(table="victim", slots=b"\x01", batch_rows=64)
                call = pb_grpc.MemoryStoreStub(ch).ExportRows(req, metadata=_md(READ), timeout=60)
                time.sleep(3)  # never read while the server's limit runs out
                code = _code(lambda: [None for _ in call])
            else:
                method, token = {
                    "headers-only": ("MemoryStore/Lookup", ""),
                    "no message": ("MemoryStore/Lookup", READ),
                    "idle import": ("MemoryStore/ImportRows", WRITE),
                }[kind]
                fut = _raw(ch, method, streaming=True).future(
                    never(), metadata=_md(token), timeout=60
                )
                code = _code(lambda: fut.result(timeout=30))
            self.ended[f"{kind}: {code.name}"] = self.ended.get(f"{kind}: {code.name}", 0) + 1
        finally:
            release.set()
            ch.close()

    def run(self) -> None:
        kinds = ["headers-only"] * 8 + ["no message"] * 4 + ["export"] * 4 + ["idle import"] * 2
        while not self.stop.is_set():
            threads = [threading.Thread(target=self._one, args=(k,), daemon=True) for k in kinds]
            self.opened += len(threads)
            for t in threads:
                t.start()
            for t in threads:
                t.join(40)


class Trainer(threading.Thread):
    """Authorised pushes (SGD lr 1, integer gradients, request ids) to the train table."""

    def __init__(self, address: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.client = StoreClient(address, ClientConfig(token=WRITE))
        self.stop = stop
        self.expected = np.zeros((TRAIN.num_rows, TRAIN.dim), np.int64)
        self.acked = 0
        self.error: Exception | None = None

    def run(self) -> None:
        rng = np.random.default_rng(5)
        try:
            while not self.stop.is_set():
                ids = np.unique(rng.integers(0, TRAIN.num_rows, 512))
                g = rng.integers(-3, 4, (len(ids), TRAIN.dim))
                self.client.push(
                    "train",
                    ids,
                    g.astype(np.float32),
                    step=self.acked + 1,
                    request_id=f"adv/r0/train/{self.acked}/0",
                )
                self.expected[ids] += g
                self.acked += 1
        except Exception as e:  # reported by the test
            self.error = e


class Reader(threading.Thread):
    """Authorised lookups; their latencies."""

    def __init__(self, address: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.client = StoreClient(address, ClientConfig(token=READ, timeout_s=30, retries=0))
        self.stop = stop
        self.latencies: list[float] = []
        self.error: Exception | None = None

    def run(self) -> None:
        rng = np.random.default_rng(6)
        try:
            while not self.stop.is_set():
                ids = rng.integers(0, TRAIN.num_rows, 4096)
                t0 = time.perf_counter()
                self.client.lookup("train", ids)
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.005)
        except Exception as e:
            self.error = e


def _victim_state(stub) -> tuple[str, str]:
    """(checksum of every stored victim row with its optimizer state, the shard's metadata)."""
    h = hashlib.sha256()
    for b in stub.ExportRows(
        pb.ExportRowsRequest(table="victim", slots=b"\x01", batch_rows=8192),
        metadata=_md(READ),
        timeout=60,
    ):
        h.update(b.ids)
        h.update(b.records)
    stats = stub.Stats(pb.StatsRequest(), metadata=_md(READ), timeout=30)
    tables = sorted(
        (t.spec.name, t.step, t.pushes, t.stored_rows)
        for t in stats.tables
        if t.spec.name != "train"
    )
    meta = json.dumps(
        {
            "tables": tables,
            "names": sorted(t.spec.name for t in stats.tables),
            "shard": [stats.shard.map_version, stats.shard.shard_map_json, stats.shard.owned.hex()],
        }
    )
    return h.hexdigest(), meta


def test_adversarial(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path / "shard"), READ, WRITE, str(MAX_MESSAGE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on "), (line, proc.stderr.read())
        address = line.split()[-1]
        _run(address, proc, tmp_path)
    finally:
        proc.kill()
        proc.wait(30)


def _run(address: str, proc: subprocess.Popen, tmp_path) -> None:
    with StoreClient(address, ClientConfig(token=WRITE)) as c:
        c.create_table(VICTIM)
        c.create_table(TRAIN)
        ids = np.arange(0, VICTIM.num_rows, 7)
        c.push("victim", ids, np.ones((len(ids), VICTIM.dim), np.float32), step=5)
    attacker = Attacker(address)
    first = next(
        attacker.stub.ExportRows(
            pb.ExportRowsRequest(table="victim", slots=b"\x01", batch_rows=1),
            metadata=_md(READ),
            timeout=30,
        )
    )
    attacker.record_bytes = first.record_bytes  # the row in its dtype, then the Adam state
    reference = _victim_state(attacker.stub)
    server = psutil.Process(proc.pid)
    rss0 = server.memory_info().rss
    rss_max = rss0

    stop = threading.Event()
    idler, trainer, reader = Idler(address, stop), Trainer(address, stop), Reader(address, stop)
    for t in (idler, trainer, reader):
        t.start()
    tried: dict[str, int] = {}
    unexpected: list[tuple[str, str]] = []
    internal = state_changes = snapshots = 0
    t0 = time.monotonic()
    attacks = attacker.attacks()
    k = 0
    while time.monotonic() - t0 < DURATION_S and proc.poll() is None:
        name, fn, refused = attacks[k % len(attacks)]
        k += 1
        code = fn()
        tried[name] = tried.get(name, 0) + 1
        if code == CODES.INTERNAL:
            internal += 1
        if code not in refused:
            unexpected.append((name, code.name))
        if _victim_state(attacker.stub) != reference:
            state_changes += 1
            unexpected.append((name, "changed the victim's state"))
            reference = _victim_state(attacker.stub)
        if k % len(attacks) == 0:  # once a round: a snapshot beside the idle imports
            snapshot(
                address,
                str(tmp_path / f"snap{snapshots}"),
                ClientConfig(token=WRITE),
                lease_s=10,
            )
            snapshots += 1
        rss_max = max(rss_max, server.memory_info().rss)
    elapsed = time.monotonic() - t0
    stop.set()
    for t in (idler, trainer, reader):
        t.join(90)
    crashed = proc.poll() is not None

    lost = -1
    if not crashed:
        with StoreClient(address, ClientConfig(token=READ)) as c:
            rows = c.lookup("train", np.arange(TRAIN.num_rows))
        want = -trainer.expected.astype(np.float32)
        lost = int((rows != want).any(axis=1).sum())  # rows whose acknowledged pushes differ
    lat = np.asarray(reader.latencies) * 1e3
    summary = {
        "duration_s": round(elapsed, 1),
        "attacks_tried": sum(tried.values()),
        "attack_kinds": len(tried),
        "idle_calls_opened": idler.opened,
        "idle_calls_ended": idler.ended,
        "crashes": int(crashed),
        "internal_answers": internal,
        "state_changes_by_rejected_requests": state_changes,
        "unexpected": unexpected[:20],
        "acknowledged_pushes": trainer.acked,
        "rows_with_acknowledged_pushes_lost": lost,
        "snapshots": snapshots,
        "authorised_lookups": len(lat),
        "authorised_lookup_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "max": round(float(lat.max()), 1) if len(lat) else None,
        },
        "server_rss_mib": {"start": rss0 >> 20, "max": rss_max >> 20},
    }
    print("\nADVERSARIAL " + json.dumps(summary))
    attacker.close()
    assert not crashed and internal == 0 and state_changes == 0, summary
    assert not unexpected, summary
    assert trainer.error is None and reader.error is None, (trainer.error, reader.error)
    assert lost == 0 and trainer.acked > 0 and len(lat) > 0, summary
    assert all(k.endswith(("UNAUTHENTICATED", "CANCELLED")) for k in idler.ended), summary
