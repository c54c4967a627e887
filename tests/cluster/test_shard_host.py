"""ShardHost as a plain class (no Ray): serves its directory, comes back on its port, refuses a
directory of another layout."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.admin import ShardAdmin, shard_state
from cluster.shard_actor import ShardHost
from engram_store.engine.errors import LayoutMismatch
from engram_store.engine.routing import ShardMap
from engram_store.rpc.client import StoreClient
from tests.cluster.conftest import cluster_config, table_spec


def test_shard_host_reopens_its_directory_on_its_port(tmp_path):
    config = cluster_config(tmp_path, 1)
    host = ShardHost(config, 0, layout="L1")
    address = host.start()
    assert host.start() == address  # idempotent
    spec = table_spec(num_rows=100)
    with StoreClient(address) as c:
        c.create_table(spec)
        c.push(spec.name, np.arange(5), np.ones((5, spec.dim), np.float32), step=1)
        before = c.lookup(spec.name, np.arange(5))
    with ShardAdmin(address, config.client) as admin:  # as the registry would
        m = ShardMap.balanced([address], num_slots=config.num_slots, layout="L1")
        assert admin.set_state(shard_state(0, m)).layout == "L1"
    host.stop()

    again = ShardHost(config, 0, layout="L1")
    assert again.start() == address  # same port: clients holding the map reach it again
    with StoreClient(address) as c:
        np.testing.assert_array_equal(c.lookup(spec.name, np.arange(5)), before)
    again.stop()

    with pytest.raises(LayoutMismatch, match="belongs to cluster layout L1"):
        ShardHost(config, 0, layout="L2").start()


def test_a_reshard_copy_goes_in_bounded_import_streams(make_shard, monkeypatch):
    """copy_rows_to splits a slot group into several ImportRows streams (each one is staged
    whole by the destination), and the destination ends with exactly the source's rows."""
    import cluster.admin as admin_mod

    src, dst = make_shard("src"), make_shard("dst")
    spec = table_spec(num_rows=21_000)
    ids = np.arange(0, 21_000, 7, dtype=np.int64)
    with StoreClient(src.address) as c:
        c.create_table(spec)
        c.push(spec.name, ids, np.ones((ids.shape[0], spec.dim), np.float32), step=1)
        want = c.lookup(spec.name, ids)
    with StoreClient(dst.address) as c:
        c.create_table(spec)
    calls = []
    real = ShardAdmin.copy_rows_to
    monkeypatch.setattr(admin_mod, "COPY_STREAM_BYTES", 64 << 10)  # many small streams
    monkeypatch.setattr(admin_mod, "COPY_STREAM_ROWS", 1000)
    with ShardAdmin(src.address) as a, ShardAdmin(dst.address) as b:
        orig = b._stub.ImportRows

        def counted(stream, **kw):
            calls.append(1)
            return orig(stream, **kw)

        b._stub.ImportRows = counted
        n = real(a, b, spec.name, b"\1" * 1024, batch_rows=512)
    assert n == ids.shape[0] and len(calls) > 3
    with StoreClient(dst.address) as c:
        np.testing.assert_array_equal(c.lookup(spec.name, ids), want)
        assert c.table_info(spec.name).stored_rows == ids.shape[0]
