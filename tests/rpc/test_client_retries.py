"""The client's recovery: stale shard maps are refreshed, moving slots are retried."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engram_store.engine import errors
from engram_store.engine.routing import ShardMap
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from tests.servers import table_spec

FAST = ClientConfig(retries=6, backoff_s=0.02)


def _set_state(address: str, **state) -> None:
    with StoreClient(address) as c:
        c._stub(address).SetShardState(pb.SetShardStateRequest(state=pb.ShardState(**state)))


def test_stale_map_is_refreshed(make_shard):
    a, b, ref = make_shard(), make_shard(), make_shard("ref")
    current = ShardMap.balanced([a.address, b.address], num_slots=8, version=2)
    for i, s in enumerate((a, b)):
        _set_state(
            s.address,
            shard_index=i,
            map_version=2,
            num_slots=8,
            owned=current.owned_mask(i),
            shard_map_json=current.to_json(),
        )
    # an old map that sends every row to the other shard
    stale = ShardMap(
        version=1,
        num_slots=8,
        assignment=tuple(1 - x for x in current.assignment),
        addresses=current.addresses,
    )
    ids = np.arange(1000)
    grads = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    with StoreClient(stale, FAST) as c, StoreClient(ref.address) as r:
        c.create_table(table_spec())
        r.create_table(table_spec())
        np.testing.assert_array_equal(c.lookup("t", ids), r.lookup("t", ids))
        assert c.shard_map == current
    with StoreClient(stale, FAST) as c, StoreClient(ref.address) as r:
        res = c.push("t", ids, grads, step=1)
        assert res.rows_updated == 1000 and c.shard_map == current
        r.push("t", ids, grads, step=1)
        np.testing.assert_array_equal(c.lookup("t", ids), r.lookup("t", ids))
    # a map_provider is asked instead of the shards when one is given
    asked = []
    with StoreClient(stale, FAST, map_provider=lambda: asked.append(1) or current) as c:
        c.lookup("t", ids)
        assert asked and c.shard_map == current


def test_moving_slots_are_retried(shard):
    with StoreClient(shard.address, FAST) as c:
        c.create_table(table_spec())
        before = c.lookup("t", np.arange(10))
        _set_state(shard.address, num_slots=4, frozen=b"\1\1\1\1")
        with pytest.raises(errors.ShardUnavailable, match="slots moving"):
            with StoreClient(shard.address, ClientConfig(retries=1, backoff_s=0.01)) as impatient:
                impatient.push("t", np.arange(10), np.ones((10, 8)))
        np.testing.assert_array_equal(c.lookup("t", np.arange(10)), before)  # lookups still work
        timer = threading.Timer(0.2, lambda: _set_state(shard.address, num_slots=4))
        timer.start()
        res = c.push("t", np.arange(10), np.ones((10, 8)))  # waits out the move
        timer.join()
        assert res.rows_updated == 10 and not res.duplicate
        assert c.table_info("t").pushes == 1


def test_unreachable_shard_raises_unavailable():
    with pytest.raises(errors.ShardUnavailable, match="127.0.0.1:1"):
        StoreClient("127.0.0.1:1", ClientConfig(retries=1, backoff_s=0.01, timeout_s=2))


def test_unreachable_shard_in_an_outdated_map_is_rerouted(make_shard):
    """A client idle while its shard went away asks map_provider and reaches the new owner."""
    gone, live = make_shard(), make_shard()
    with StoreClient(live.address) as c:
        c.create_table(table_spec())
        c.push("t", np.arange(5), np.ones((5, 8)), step=1)
        expected = c.lookup("t", np.arange(10))
    old = ShardMap.balanced([gone.address], num_slots=4, version=1)
    gone.stop()
    new = ShardMap.balanced([live.address], num_slots=4, version=2)
    cfg = ClientConfig(retries=1, backoff_s=0.01, timeout_s=2)
    with StoreClient(old, cfg, map_provider=lambda: new) as c:
        np.testing.assert_array_equal(c.lookup("t", np.arange(10)), expected)
        assert c.shard_map == new
    # without a newer map the error still names the dead shard
    with StoreClient(old, cfg, map_provider=lambda: old) as c:
        with pytest.raises(errors.ShardUnavailable, match=gone.address):
            c.lookup("t", np.arange(10))
