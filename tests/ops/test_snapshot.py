"""Snapshots under concurrent pushes are a consistent cut; restore onto other shard counts."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import grpc
import numpy as np
import pytest

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import ConfigError, DataDirLocked
from engram_store.engine.routing import ShardMap
from engram_store.engine.types import ShardStateInfo
from engram_store.ops import restore as restore_module
from engram_store.ops.layout import lock_data_root
from engram_store.ops.restore import restore
from engram_store.ops.snapshot import load_manifest, open_snapshot_shard, snapshot
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from tests.servers import LocalShard

ROWS, DIM = 96, 4
SGD = TableConfig(
    name="sgd", num_rows=ROWS, dim=DIM, init="zeros", optimizer=OptimizerConfig(kind="sgd", lr=1.0)
)
ADAM = TableConfig(
    name="adam", num_rows=4000, dim=DIM, seed=7, optimizer=OptimizerConfig(kind="adam", lr=0.01)
)
RETRYING = ClientConfig(retries=40, backoff_s=0.005, backoff_max_s=0.1)


def make_cluster(make_shard, n: int) -> list[LocalShard]:
    """n in-process shards that publish one shard map, as a cluster registry would."""
    shards = [make_shard() for _ in range(n)]
    m = ShardMap.balanced([s.address for s in shards], num_slots=64, layout="test")
    for i, s in enumerate(shards):
        s.shard.set_shard_state(
            ShardStateInfo(i, m.version, m.num_slots, m.owned_mask(i), b"", m.layout, m.to_json())
        )
    return shards


MAGNITUDE = 4096  # the second pusher's gradient: n0 < 4096 and n1 < 4096 decode exactly
MAX_PUSHES = MAGNITUDE - 1


class Pusher(threading.Thread):
    """Pushes gradient `magnitude` to every row (so every push spans every shard), one push at a
    time, counting pushes started and acknowledged; at most MAX_PUSHES, so that a row's value
    (n0 + MAGNITUDE n1, exact in float32 below 2^24) still tells the two pushers' counts apart."""

    def __init__(self, address: str, magnitude: float, run: str = ""):
        """`run`: push with the trainer's request ids, `<run>/r0/train/<n>/0` (they hold `/`);
        "" sends none (the client makes one per push)."""
        super().__init__(daemon=True)
        self.client = StoreClient(address, RETRYING)
        self.magnitude = magnitude
        self.run_id = run
        self.started = self.acked = 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        ids = np.arange(ROWS)
        grads = np.full((ROWS, DIM), self.magnitude, np.float32)
        try:
            while not self.stop.is_set() and self.started < MAX_PUSHES:
                self.started += 1
                rid = f"{self.run_id}/r0/train/{self.started}/0" if self.run_id else None
                self.client.push("sgd", ids, grads, step=1, request_id=rid)
                self.acked += 1
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self.client.close()


def snapshot_rows(directory: str, n: int, table: str, ids: np.ndarray) -> np.ndarray:
    """Rows of `ids` as the snapshot holds them (from the shard that owns each)."""
    m = ShardMap.from_json(json.dumps(load_manifest(directory)["shard_map"]))
    owner = m.shard_of(table, ids)
    out = np.empty((len(ids), DIM), np.float32)
    for i in range(n):
        with open_snapshot_shard(directory, i) as s:
            sel = owner == i
            out[sel] = s.lookup(table, ids[sel])
    return out


@pytest.mark.parametrize("ids", ["client", "trainer"])
def test_snapshot_is_a_consistent_cut_under_concurrent_pushes(make_shard, tmp_path, ids):
    """Also with the trainer's request ids, which hold `/`: the shard's freeze must find the
    logical push before the client's `/<shard>~<parts>` suffix, not before the first `/`."""
    shards = make_cluster(make_shard, 2)
    with StoreClient(shards[0].address, RETRYING) as c:
        c.create_table(SGD)
        c.create_table(ADAM)
        c.push("adam", np.arange(0, 4000, 7), np.ones((572, DIM)), step=3)
    # magnitudes 1 and 4096: a row's value -(n0 + 4096 n1) says which pushes of each it holds
    run = "run-7f3a" if ids == "trainer" else ""
    pushers = [
        Pusher(shards[0].address, 1.0, run),
        Pusher(shards[1].address, float(MAGNITUDE), run + "b"),
    ]
    for p in pushers:
        p.start()
    try:
        for k in range(8 if run else 4):
            time.sleep(0.3)
            before = [p.acked for p in pushers]
            path = snapshot(shards[0].address, str(tmp_path / f"snap{k}"))
            after = [p.started for p in pushers]
            rows = snapshot_rows(str(tmp_path / f"snap{k}"), 2, "sgd", np.arange(ROWS))
            # all or nothing: every row holds the same pushes
            assert (rows == rows[0, 0]).all(), f"snapshot {k} split a push: {np.unique(rows)}"
            total = -int(rows[0, 0])
            n0, n1 = total % MAGNITUDE, total // MAGNITUDE
            assert before[0] <= n0 <= after[0] and before[1] <= n1 <= after[1], (
                k,
                before,
                (n0, n1),
                after,
            )
            m = json.load(open(path))
            assert m["num_shards"] == 2 and set(m["tables"]) == {"sgd", "adam"}
            assert m["steps"]["adam"] == 3
            assert [s["tables"]["adam"]["step"] for s in m["shards"]] == [3, 3]
    finally:
        for p in pushers:
            p.stop.set()
        for p in pushers:
            p.join(30)
    assert all(p.error is None for p in pushers), [p.error for p in pushers]
    assert all(p.acked > 20 for p in pushers), [p.acked for p in pushers]
    # every shard accepts writes again
    with StoreClient(shards[0].address, ClientConfig(retries=0)) as c:
        c.push("sgd", [0], np.zeros((1, DIM)))


def test_snapshot_waits_for_a_part_still_on_its_way(make_shard, tmp_path):
    """A push whose first part is applied before the freeze and whose second part arrives only
    after the coordinator's settle time is completed before the copy, not split."""
    shards = make_cluster(make_shard, 2)
    with StoreClient(shards[0].address) as c:
        c.create_table(SGD)
        owner = c.shard_map.shard_of("sgd", np.arange(ROWS))
    a, b = int(np.flatnonzero(owner == 0)[0]), int(np.flatnonzero(owner == 1)[0])
    stubs = [pb_grpc.MemoryStoreStub(grpc.insecure_channel(s.address)) for s in shards]

    def part(i: int, row: int) -> pb.PushGradientsRequest:
        return pb.PushGradientsRequest(
            table="sgd",
            ids=np.array([row], "<i8").tobytes(),
            grads=np.ones((1, DIM), "<f4").tobytes(),
            step=1,
            request_id=f"late/{i}~2",
        )

    stubs[0].PushGradients(part(0, a), timeout=10)

    def late() -> None:
        time.sleep(0.6)  # well after the freeze and the 0.2 s settle time
        while True:
            try:
                stubs[1].PushGradients(part(1, b), timeout=10)
                return
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                time.sleep(0.02)

    t = threading.Thread(target=late)
    t.start()
    path = snapshot(shards[0].address, str(tmp_path / "snap"))
    t.join(10)
    rows = snapshot_rows(str(tmp_path / "snap"), 2, "sgd", np.array([a, b]))
    np.testing.assert_array_equal(rows, -np.ones((2, DIM)))
    assert json.load(open(path))["half_applied_completed"] == 1


@pytest.mark.parametrize("m_new", [1, 3])
def test_restore_onto_another_shard_count_gives_identical_lookups(make_shard, tmp_path, m_new):
    shards = make_cluster(make_shard, 2)
    rng = np.random.default_rng(0)
    with StoreClient(shards[0].address) as c:
        c.create_table(ADAM)
        c.create_table(SGD)
        for step in range(1, 4):
            ids = rng.integers(0, 4000, 800)
            c.push("adam", ids, rng.standard_normal((800, DIM)), step=step)
        c.push("sgd", np.arange(10), np.ones((10, DIM)), step=9)
        all_ids = np.arange(4000)
        expected = c.lookup("adam", all_ids)
        state = np.concatenate(
            [
                s.shard.optimizer_state("adam", all_ids[c.shard_map.shard_of("adam", all_ids) == i])
                for i, s in enumerate(shards)
            ]
        )
        order = np.concatenate(
            [all_ids[c.shard_map.shard_of("adam", all_ids) == i] for i in range(2)]
        )
    snapshot(shards[0].address, str(tmp_path / "snap"))
    summary = restore(str(tmp_path / "snap"), str(tmp_path / "restored"), shards=m_new)
    assert summary["shards"] == m_new and summary["steps"] == {"adam": 3, "sgd": 9}
    restored = [
        make_shard(data_dir=str(tmp_path / "restored" / f"shard-{j}")) for j in range(m_new)
    ]
    meta = json.load(open(tmp_path / "restored" / "cluster.json"))
    m = dataclasses.replace(
        ShardMap.from_json(meta["shard_map"]), addresses=tuple(s.address for s in restored)
    )
    target = m if m_new > 1 else restored[0].address
    with StoreClient(target) as c:
        np.testing.assert_array_equal(c.lookup("adam", all_ids), expected)
        assert c.table_info("adam").step == 3 and c.table_info("sgd").step == 9
        owner = m.shard_of("adam", order)
        got = np.empty_like(state)
        for j, s in enumerate(restored):
            got[owner == j] = s.shard.optimizer_state("adam", order[owner == j])
        np.testing.assert_array_equal(got, state)
        # Adam continues from step 3 where no step is given
        assert c.push("adam", [1], np.ones((1, DIM))).step == 4
    with pytest.raises(ConfigError, match="not empty"):
        restore(str(tmp_path / "snap"), str(tmp_path / "restored"), shards=2)


def test_snapshot_protocol_errors(shard, tmp_path):
    stub = pb_grpc.StoreAdminStub(grpc.insecure_channel(shard.address))

    def code(**fields):
        with pytest.raises(grpc.RpcError) as e:
            stub.Snapshot(pb.SnapshotRequest(**fields), timeout=10)
        return e.value.code()

    assert (
        code(phase=pb.SNAPSHOT_COPY, snapshot_id="a", path=str(tmp_path / "x"))
        == grpc.StatusCode.FAILED_PRECONDITION
    )  # not frozen
    assert code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.Snapshot(pb.SnapshotRequest(phase=pb.SNAPSHOT_FREEZE, snapshot_id="a", lease_s=0.5))
    assert code(phase=pb.SNAPSHOT_FREEZE, snapshot_id="b") == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        code(phase=pb.SNAPSHOT_COPY, snapshot_id="a", path="relative")
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    with StoreClient(shard.address, ClientConfig(retries=0)) as c:
        with pytest.raises(Exception, match="snapshot in progress"):
            c.create_table(SGD)
        time.sleep(0.6)  # the lease runs out: the shard thaws by itself
        c.create_table(SGD)
    with pytest.raises(ConfigError, match="exists"):
        snapshot(shard.address, str(tmp_path))


def test_restore_holds_the_data_root_lock(make_shard, tmp_path, monkeypatch):
    """While a restore writes, a cluster (or a second restore) cannot take the directory."""
    shards = make_cluster(make_shard, 2)
    with StoreClient(shards[0].address) as c:
        c.create_table(SGD)
        c.push("sgd", np.arange(10), np.ones((10, DIM)), step=1)
    snapshot(shards[0].address, str(tmp_path / "snap"))
    seen = []
    real_write = restore_module.write_layout

    def write_while_checking(data_root, layout, *a, **kw):
        with pytest.raises(DataDirLocked, match="being written by a live process"):
            lock_data_root(data_root, {"cluster": "engram"})
        seen.append(data_root)
        return real_write(data_root, layout, *a, **kw)

    monkeypatch.setattr(restore_module, "write_layout", write_while_checking)
    restore(str(tmp_path / "snap"), str(tmp_path / "restored"), shards=2)
    assert seen == [str(tmp_path / "restored")]
    with lock_data_root(str(tmp_path / "restored"), {"cluster": "engram"}):  # released after
        pass
