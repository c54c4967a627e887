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
