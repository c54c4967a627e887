"""Health, reflection, stats, resharding RPCs, and the `engram` CLI in subprocesses."""

from __future__ import annotations

import json
import subprocess

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engram_store.engine.routing import ShardMap
from engram_store.rpc import wire
from engram_store.rpc.client import StoreClient
from engram_store.rpc.proto import store_pb2 as pb
from tests.servers import ROOT, engram_command, table_spec


def test_health_and_reflection(shard):
    with grpc.insecure_channel(shard.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "engram.v1.MemoryStore"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(refl.ServerReflectionInfo(iter([req]), timeout=10)))
        names = {s.name for s in resp.list_services_response.service}
        assert "engram.v1.MemoryStore" in names and "grpc.health.v1.Health" in names


def test_stats(client):
    client.create_table(table_spec())
    client.lookup("t", np.arange(100))
    client.push("t", np.arange(10), np.ones((10, 8)))
    (st,) = client.stats()
    methods = {m["method"]: m for m in st["methods"]}
    assert methods["Lookup"]["requests"] == 1 and methods["Lookup"]["rows"] == 100
    assert methods["Lookup"]["bytes"] == 100 * 8 * 4
    assert methods["PushGradients"]["rows"] == 10
    assert methods["Lookup"]["p99_ms"] >= methods["Lookup"]["p50_ms"] > 0
    assert st["stored_rows"] == 10 and st["shard"]["standalone"]
    assert st["tables"][0]["name"] == "t"


def test_export_import_delete(make_shard):
    src, dst = make_shard("src"), make_shard("dst")
    spec = table_spec()
    with StoreClient(src.address) as a, StoreClient(dst.address) as b:
        a.create_table(spec)
        b.create_table(spec)
        ids = np.arange(0, 1000, 2)
        a.push("t", ids, np.ones((len(ids), 8)))
        want = a.lookup("t", np.arange(1000))
        mask = np.zeros(16, np.uint8)
        mask[::2] = 1  # move half of 16 slots
        batches = list(
            a._stub(src.address).ExportRows(
                pb.ExportRowsRequest(table="t", slots=mask.tobytes(), batch_rows=50)
            )
        )
        moved = np.concatenate([wire.unpack_ids(x.ids) for x in batches])
        assert 0 < len(moved) < len(ids) and all(len(x.ids) <= 50 * 8 for x in batches)
        n = b._stub(dst.address).ImportRows(iter(batches)).rows
        assert n == len(moved)
        np.testing.assert_array_equal(b.lookup("t", moved), a.lookup("t", moved))
        deleted = (
            a._stub(src.address)
            .DeleteRows(pb.DeleteRowsRequest(table="t", slots=mask.tobytes()))
            .rows
        )
        assert deleted == len(moved)
        # deleted rows read as initial rows again on the source; the rest is untouched
        rest = np.setdiff1d(np.arange(1000), moved)
        np.testing.assert_array_equal(a.lookup("t", rest), want[rest])


def test_shard_state_publishes_the_map(make_shard):
    shards = [make_shard() for _ in range(2)]
    m = ShardMap.balanced([s.address for s in shards], num_slots=8, version=3)
    for i, s in enumerate(shards):
        with StoreClient(s.address) as c:
            state = pb.ShardState(
                shard_index=i,
                map_version=3,
                num_slots=8,
                owned=m.owned_mask(i),
                shard_map_json=m.to_json(),
            )
            got = c._stub(s.address).SetShardState(pb.SetShardStateRequest(state=state)).state
            assert got.map_version == 3 and got.owned == m.owned_mask(i)
    with StoreClient(shards[1].address) as c:  # one address finds the whole map
        assert c.shard_map == m
        c.create_table(table_spec())
        rows = c.lookup("t", np.arange(1000))
        c.push("t", np.arange(1000), np.ones((1000, 8)))
        assert not np.array_equal(c.lookup("t", np.arange(1000)), rows)
        assert [st["shard"]["owned_slots"] for st in c.stats()] == [4, 4]


def _engram(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*engram_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=check,
    )


def test_cli(tmp_path, server_process):
    p = server_process(tmp_path / "cli")
    out = _engram(
        "table",
        "create",
        "--address",
        p.address,
        "--name",
        "demo",
        "--head-rows",
        "7,11,13",
        "--dim",
        "4",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
    )
    created = json.loads(out.stdout)
    assert created["spec"]["num_rows"] == 31 and created["spec"]["head_rows"] == [7, 11, 13]
    q = json.loads(
        _engram(
            "query", "--address", p.address, "--table", "demo", "--rows", "0,5,30", "--json"
        ).stdout
    )
    with StoreClient(p.address) as c:
        np.testing.assert_array_equal(
            np.asarray(q["rows"], np.float32), c.lookup("demo", [0, 5, 30])
        )
    listed = json.loads(_engram("table", "list", "--address", p.address).stdout)
    assert [t["spec"]["name"] for t in listed] == ["demo"]
    stats = json.loads(_engram("stats", "--address", p.address).stdout)
    assert stats[0]["tables"][0]["name"] == "demo"
    # errors the store answers: one line on stderr, exit 1 (a runtime error), no traceback
    bad = _engram("query", "--address", p.address, "--table", "demo", "--rows", "31", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "31" in bad.stderr
    missing = _engram("table", "info", "--address", p.address, "--name", "nope", check=False)
    assert missing.returncode == 1 and "nope" in missing.stderr
    dropped = json.loads(_engram("table", "drop", "--address", p.address, "--name", "demo").stdout)
    assert dropped["dropped"]
    assert p.terminate() == 0
