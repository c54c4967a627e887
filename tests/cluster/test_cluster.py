"""The store as Ray actors: placement on store nodes, live resharding under pushes, restarts after
kill -9, and refusals that change nothing. One small Ray for the whole module (conftest)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import threading
import time

import numpy as np
import pytest

from cluster.api import ClusterNotFound, EngramCluster, RayUnreachable
from engram_store.engine.errors import ConfigError, DataDirLocked, LayoutMismatch, ShardUnavailable
from engram_store.ops.layout import LAYOUT_FILE
from tests.cluster.conftest import Pusher, cluster_config, push_batch, reference_table, table_spec


def _nodes_of(cluster: EngramCluster) -> set[str]:
    return {s.node_id for s in cluster.status(interval_s=0).shards}


def test_scaling_under_pushes_matches_one_shard(ray_cluster, tmp_path):
    """2 -> 4 -> 3 shards while one thread pushes and another looks up: the table ends equal to a
    one-shard table fed the same pushes; shards only ever run on the store node."""
    _, store_node, trainer_node = ray_cluster
    spec = table_spec()
    cluster = EngramCluster.up(cluster_config(tmp_path / "c", 2), tables=[spec])
    try:
        assert _nodes_of(cluster) == {store_node}
        client = cluster.client()
        pusher = Pusher(client, spec)
        lookup_errors: list[str] = []
        stop_lookups = threading.Event()

        def look() -> None:  # lookups during the moves must keep answering
            with cluster.client() as c:
                for i in range(2000):
                    if stop_lookups.is_set():
                        return
                    try:
                        rows = c.lookup(
                            spec.name, push_batch(i % 50 + 1, spec.num_rows, spec.dim)[0]
                        )
                        assert rows.shape == (64, spec.dim) and np.isfinite(rows).all()
                    except Exception as e:
                        lookup_errors.append(repr(e))
                    time.sleep(0.005)

        looker = threading.Thread(target=look, daemon=True)
        pusher.start()
        looker.start()
        assert pusher.wait_for(30, 30)
        grown = cluster.scale(4)
        assert grown["to"] == 4 and grown["moved_slots"] > 0
        assert _nodes_of(cluster) == {store_node}
        assert pusher.wait_for(pusher.acked + 30, 30)
        shrunk = cluster.scale(3)
        assert shrunk["to"] == 3 and shrunk["moved_slots"] > 0
        assert pusher.wait_for(pusher.acked + 30, 30)
        acked = pusher.stop()
        stop_lookups.set()
        looker.join(timeout=30)
        assert not pusher.failures and not lookup_errors, (pusher.failures, lookup_errors[:3])

        ids, expected = reference_table(tmp_path, spec, acked)
        np.testing.assert_array_equal(client.lookup(spec.name, ids), expected)
        status = cluster.status(interval_s=0)
        assert len(status.shards) == 3 and trainer_node not in status.nodes
        # every stored row lives on exactly one shard: sources deleted what they gave away
        assert sum(s.stored_rows for s in status.shards) == len(ids)
        assert all(s.map_version == status.map_version for s in status.shards)
        client.close()
    finally:
        cluster.down()
    # the removed shard's directory holds no rows any more
    from engram_store.engine.config import ShardConfig
    from engram_store.engine.shard import Shard

    with Shard(ShardConfig(data_dir=str(tmp_path / "c" / "shard-3"))) as removed:
        assert removed.stats()["stored_rows"] == 0


def test_kill9_of_shards_loses_no_acknowledged_push(ray_cluster, tmp_path):
    """SIGKILL a shard process three times, then the registry, during a push stream: Ray
    restarts each (a shard on its data dir), the stream resumes by itself, and every
    acknowledged push is there."""
    spec = table_spec(num_rows=5000)
    cluster = EngramCluster.up(cluster_config(tmp_path / "c", 2), tables=[spec])
    try:
        client = cluster.client()
        pusher = Pusher(client, spec)
        pusher.start()
        assert pusher.wait_for(20, 30)
        for round_ in range(3):
            shard = round_ % 2
            pid = cluster.shard_pid(shard)
            before = pusher.acked
            os.kill(pid, signal.SIGKILL)
            # resumed by itself: pushes are acknowledged again after the restart
            assert pusher.wait_for(before + 20, 45), f"stream stalled after kill {round_}"
            assert cluster.shard_pid(shard) != pid
        # the registry too: the shards (detached) keep serving, the restarted registry adopts them
        pids = [cluster.shard_pid(i) for i in range(2)]
        before = pusher.acked
        os.kill(cluster.registry_pid(), signal.SIGKILL)
        assert pusher.wait_for(before + 20, 45), "stream stalled after the registry's kill"
        assert [cluster.shard_pid(i) for i in range(2)] == pids
        assert cluster.shard_map().num_shards == 2
        acked = pusher.stop()
        assert len(pusher.failures) <= 3, pusher.failures  # the client's own retries cover it
        ids, expected = reference_table(tmp_path, spec, acked)
        np.testing.assert_array_equal(client.lookup(spec.name, ids), expected)
        client.close()
    finally:
        cluster.down()


def test_down_and_up_again_keeps_the_table(ray_cluster, tmp_path):
    """`down` keeps the data; `up` on the same data root reopens the layout (and its map, even
    after a reshard), at another shard count if asked."""
    spec = table_spec(num_rows=3000)
    config = cluster_config(tmp_path / "c", 2)
    cluster = EngramCluster.up(config, tables=[spec])
    with cluster.client() as c:
        for k in range(1, 21):
            c.push(spec.name, *push_batch(k, spec.num_rows, spec.dim), step=k)
    cluster.scale(3)
    layout = cluster.status(interval_s=0).layout
    cluster.down()
    ids, expected = reference_table(tmp_path, spec, 20)
    again = EngramCluster.up(dataclasses.replace(config, num_shards=2), tables=[spec])
    try:
        status = again.status(interval_s=0)
        assert status.layout == layout and len(status.shards) == 2
        with again.client() as c:
            np.testing.assert_array_equal(c.lookup(spec.name, ids), expected)
    finally:
        again.down()


def test_refusals_change_nothing(ray_cluster, tmp_path):
    """Scale to 0, an unreachable Ray, a data root of another layout, a foreign shard directory,
    and a second cluster on a live data root: each a clear error, nothing changed."""
    spec = table_spec(num_rows=1000)
    config = cluster_config(tmp_path / "a", 2)
    cluster = EngramCluster.up(config, tables=[spec])
    try:
        version = cluster.shard_map().version
        with pytest.raises(ConfigError, match="at least 1"):
            cluster.scale(0)
        assert cluster.shard_map().version == version

        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(RayUnreachable, match="no Ray answers"):
            EngramCluster.up(cluster_config(tmp_path / "x", 1), address=dead, timeout_s=1)
        assert not (tmp_path / "x").exists()

        # a second live cluster on the same data root: refused by the data-root lock
        meta_before = (tmp_path / "a" / LAYOUT_FILE).read_text()
        with pytest.raises(DataDirLocked, match="live cluster"):
            EngramCluster.up(cluster_config(tmp_path / "a", 2))
        # the same cluster name again: refused before anything starts
        with pytest.raises(DataDirLocked, match="already serves"):
            EngramCluster.up(config)
        assert (tmp_path / "a" / LAYOUT_FILE).read_text() == meta_before
        assert cluster.shard_map().version == version
        with cluster.client() as c:  # still serving
            assert c.lookup(spec.name, np.arange(4)).shape == (4, spec.dim)
    finally:
        cluster.down()

    # the data root of a 64-slot layout refuses a 128-slot cluster
    meta_before = (tmp_path / "a" / LAYOUT_FILE).read_text()
    with pytest.raises(LayoutMismatch, match="64 slots"):
        EngramCluster.up(cluster_config(tmp_path / "a", 2, num_slots=128))
    # ... and a table spec that differs from the recorded one
    with pytest.raises(LayoutMismatch, match="another spec"):
        EngramCluster.up(cluster_config(tmp_path / "a", 2), tables=[table_spec(num_rows=999)])
    assert (tmp_path / "a" / LAYOUT_FILE).read_text() == meta_before
    assert json.loads(meta_before)["num_shards"] == 2

    # a shard directory copied from another cluster's layout
    other = EngramCluster.up(cluster_config(tmp_path / "b", 1), tables=[spec])
    other.down()
    shutil.rmtree(tmp_path / "a" / "shard-1")
    shutil.copytree(tmp_path / "b" / "shard-0", tmp_path / "a" / "shard-1")
    with pytest.raises(LayoutMismatch, match="belongs to cluster layout"):
        EngramCluster.up(cluster_config(tmp_path / "a", 2))
    assert (tmp_path / "a" / LAYOUT_FILE).read_text() == meta_before


def test_connect_and_cli(ray_cluster, tmp_path, capsys):
    """connect() finds a cluster by name; the `engram cluster` commands drive it."""
    from engram.cli import main

    address = ray_cluster[0].address
    config = cluster_config(tmp_path / "c", 1)
    with pytest.raises(ClusterNotFound):
        EngramCluster.connect(address, name=config.name, namespace=config.namespace)
    cluster = EngramCluster.up(config, tables=[table_spec(num_rows=1000)])
    try:
        args = ["--address", address, "--name", config.name, "--namespace", config.namespace]
        assert main(["cluster", "scale", "--shards", "2", *args]) == 0
        assert json.loads(capsys.readouterr().out)["to"] == 2
        assert main(["cluster", "status", "--json", "--interval", "0", *args]) == 0
        status = json.loads(capsys.readouterr().out)
        assert len(status["shards"]) == 2
        assert main(["cluster", "scale", "--shards", "0", *args]) == 2
        assert "at least 1" in capsys.readouterr().err
        found = EngramCluster.connect(address, name=config.name, namespace=config.namespace)
        assert found.shard_map().num_shards == 2
        assert main(["cluster", "down", *args]) == 0
        with pytest.raises(ClusterNotFound):
            EngramCluster.connect(address, name=config.name, namespace=config.namespace)
    except BaseException:
        cluster.down()
        raise


def test_discover_store_by_shard_or_ray_address(ray_cluster, tmp_path):
    """discover_store finds the whole store from one shard's address (no Ray) or from Ray."""
    from cluster.api import discover_store

    spec = table_spec(num_rows=2000)
    config = cluster_config(tmp_path / "c", 2)
    cluster = EngramCluster.up(config, tables=[spec])
    try:
        ids = np.arange(0, 2000, 7)
        with cluster.client() as c:
            expected = c.lookup(spec.name, ids)
        with discover_store(cluster.shard_map().addresses[1]) as c:
            assert c.shard_map.num_shards == 2
            np.testing.assert_array_equal(c.lookup(spec.name, ids), expected)
        with discover_store(
            ray_cluster[0].address, name=config.name, namespace=config.namespace
        ) as c:
            np.testing.assert_array_equal(c.lookup(spec.name, ids), expected)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(RayUnreachable, match="nothing answers"):
            discover_store(dead)
    finally:
        cluster.down()


def test_cli_up_returns_and_the_cluster_lives_on(ray_cluster, tmp_path):
    """`engram cluster up --address` returns; status/scale/down from other processes reach it."""
    import subprocess
    import sys

    address = ray_cluster[0].address
    name = "cli-" + os.urandom(3).hex()
    common = ["--address", address, "--name", name, "--namespace", "engram-test"]

    def engram(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "engram", "cluster", *args, *common],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        )

    up = engram(
        "up",
        "--shards",
        "1",
        "--data",
        str(tmp_path / "c"),
        "--slots",
        "64",
        "--store-resource",
        "engram_store_test",
        "--cpus-per-shard",
        "0.25",
    )
    assert up.returncode == 0, up.stderr[-2000:]
    assert "reach it with --address" in up.stdout
    try:
        scaled = engram("scale", "--shards", "2")
        assert scaled.returncode == 0, scaled.stderr[-2000:]
        assert json.loads(scaled.stdout.strip().splitlines()[-1])["to"] == 2
        status = engram("status", "--interval", "0")
        assert status.returncode == 0 and "127.0.0.1:" in status.stdout, status.stderr[-2000:]
        assert len([ln for ln in status.stdout.splitlines() if "127.0.0.1:" in ln]) == 2
    finally:
        down = engram("down")
    assert down.returncode == 0, down.stderr[-2000:]
    with pytest.raises(ClusterNotFound):
        EngramCluster.connect(address, name=name, namespace="engram-test")


def test_tokens_protect_the_shards(ray_cluster, tmp_path):
    """Shards that require tokens: the cluster's own calls and its client carry the write token;
    a client without one is refused."""
    from engram_store.engine.errors import EngramError
    from engram_store.rpc.client import StoreClient
    from engram_store.rpc.config import AuthConfig

    spec = table_spec(num_rows=1000)
    base = cluster_config(tmp_path / "c", 1)
    config = dataclasses.replace(
        base,
        server=dataclasses.replace(base.server, auth=AuthConfig(write_tokens=("w-secret",))),
        client=dataclasses.replace(base.client, token="w-secret"),
    )
    cluster = EngramCluster.up(config, tables=[spec])
    try:
        cluster.scale(2)  # SetShardState, ExportRows/ImportRows, DeleteRows with the token
        with cluster.client() as c:
            c.push(spec.name, np.arange(8), np.ones((8, spec.dim), np.float32), step=1)
            assert c.lookup(spec.name, np.arange(8)).shape == (8, spec.dim)
        # status reads each shard's /metrics, which asks for the token too
        for shard in cluster.status(interval_s=0).shards:
            assert shard.metrics.get("requests", 0) > 0, shard.metrics
        address = cluster.shard_map().addresses[0]
        with pytest.raises(EngramError, match="requires a token"):
            StoreClient(address, dataclasses.replace(config.client, token="", retries=0))
    finally:
        cluster.down()


def test_a_shard_whose_node_is_gone_is_not_started_empty(ray_cluster, tmp_path):
    """A shard's directory lives on the store node it was written on: `up` refuses to start it
    elsewhere (with an empty directory) when that node is not in the Ray cluster."""
    config = cluster_config(tmp_path / "c", 1)
    EngramCluster.up(config, tables=[table_spec(num_rows=100)]).down()
    path = tmp_path / "c" / LAYOUT_FILE
    meta = json.loads(path.read_text())
    meta["placement"]["0"] = "10.255.255.1"  # a node that left
    path.write_text(json.dumps(meta))
    with pytest.raises(ShardUnavailable, match="not in the Ray cluster"):
        EngramCluster.up(config)
    assert json.loads(path.read_text()) == meta
    shared = EngramCluster.up(dataclasses.replace(config, shared_storage=True))
    shared.down()


class _Raiser:
    """An actor that raises the error it is given (as the registry raises its refusals)."""

    def fail(self, error: Exception) -> None:
        raise error


def test_errors_keep_their_class_through_ray(ray_cluster):
    """ray_get raises what the actor raised, as its own class, not Ray's wrapper."""
    import ray

    from cluster.api import ClusterExists
    from cluster.registry import ray_get

    actor = ray.remote(num_cpus=0)(_Raiser).remote()
    try:
        for error in (
            ClusterNotFound("no cluster named 'x'"),
            ClusterExists("up already"),
            RayUnreachable("nothing at 1.2.3.4:6379"),
            LayoutMismatch("64 slots"),
        ):
            with pytest.raises(type(error)) as e:
                ray_get(actor.fail.remote(error), timeout=60)
            assert type(e.value) is type(error) and str(e.value) == str(error)
    finally:
        ray.kill(actor)
