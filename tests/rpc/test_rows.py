"""Lookup and push through a real server: wire dtypes, SparseAdam equality, sharding, exactly-once,
restart and kill -9 durability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_store.engine import dtypes
from engram_store.engine.config import OptimizerConfig
from engram_store.engine.routing import ShardMap
from engram_store.rpc import wire
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from tests.servers import table_spec


def _rng_batch(rng, num_rows: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """ids with plenty of duplicates and float32 gradients for them."""
    ids = rng.integers(0, num_rows, size=n)
    return ids, rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16", "float16"])
def test_lookup_push_round_trip(shard, wire_dtype):
    spec = table_spec(optimizer=OptimizerConfig(kind="sgd", lr=0.5))
    with StoreClient(shard.address, ClientConfig(wire_dtype=wire_dtype)) as c:
        c.create_table(spec)
        ids = np.array([[3, 999, 3], [0, 42, 7]])
        rows = c.lookup("t", ids)
        assert rows.shape == (2, 3, 8) and rows.dtype == np.float32
        exact = shard.shard.lookup("t", ids.reshape(-1)).reshape(2, 3, 8)
        # rows travel in the wire dtype: equal to the stored rows rounded to it
        expect = dtypes.to_float32(dtypes.to_dtype(exact, wire_dtype), wire_dtype)
        np.testing.assert_array_equal(rows, expect)
        np.testing.assert_array_equal(rows[0, 0], rows[0, 2])

        grads = np.full((6, 8), 0.25, np.float32)  # exact in every wire dtype
        res = c.push("t", ids, grads)
        assert res.rows_updated == 5 and not res.duplicate and res.step == 1
        after = shard.shard.lookup("t", ids.reshape(-1)).reshape(2, 3, 8)
        twice = np.array([2 if i == 3 else 1 for i in ids.reshape(-1)], np.float32).reshape(2, 3, 1)
        np.testing.assert_allclose(after, exact - 0.5 * 0.25 * twice, atol=1e-6)
        assert c.lookup("t", np.zeros((0,), np.int64)).shape == (0, 8)


def test_push_matches_torch_sparse_adam(client, shard):
    num_rows, dim = 64, 8
    spec = table_spec(
        num_rows=num_rows,
        dim=dim,
        optimizer=OptimizerConfig(kind="adam", lr=0.05, beta1=0.8, beta2=0.95),
    )
    client.create_table(spec)
    all_ids = np.arange(num_rows)
    emb = torch.nn.Embedding(num_rows, dim, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(client.lookup("t", all_ids)))
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.05, betas=(0.8, 0.95))
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        ids, grads = _rng_batch(rng, num_rows, 40, dim)
        opt.zero_grad()
        (emb(torch.from_numpy(ids)) * torch.from_numpy(grads)).sum().backward()
        opt.step()
        client.push("t", ids, grads, step=step)
    np.testing.assert_allclose(
        client.lookup("t", all_ids), emb.weight.detach().numpy(), atol=1e-6, rtol=0
    )
    state = shard.shard.optimizer_state("t", all_ids)  # (n, 2*dim): exp_avg then exp_avg_sq
    st = opt.state[emb.weight]
    np.testing.assert_allclose(state[:, :dim], st["exp_avg"].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(state[:, dim:], st["exp_avg_sq"].numpy(), atol=1e-6, rtol=0)


def test_one_shard_equals_three_shards(make_shard):
    one = make_shard("one")
    three = [make_shard("three") for _ in range(3)]
    spec = table_spec(num_rows=5000, dim=16)
    cfg = ClientConfig(max_batch_rows=300)  # several chunks per shard as well
    with (
        StoreClient(one.address, cfg) as c1,
        StoreClient(ShardMap.balanced([s.address for s in three]), cfg) as c3,
    ):
        c1.create_table(spec)
        c3.create_table(spec)
        all_ids = np.arange(spec.num_rows)
        np.testing.assert_array_equal(c1.lookup("t", all_ids), c3.lookup("t", all_ids))
        rng = np.random.default_rng(1)
        for _ in range(3):
            ids, grads = _rng_batch(rng, spec.num_rows, 2000, 16)
            r1, r3 = c1.push("t", ids, grads), c3.push("t", ids, grads)
            assert r1.rows_updated == r3.rows_updated == len(np.unique(ids))
        np.testing.assert_array_equal(c1.lookup("t", all_ids), c3.lookup("t", all_ids))
        # every shard stored some rows, and together exactly the rows pushed
        stored = [s.shard.table_stats("t").stored_rows for s in three]
        assert all(n > 0 for n in stored)
        assert sum(stored) == one.shard.table_stats("t").stored_rows
        assert c3.table_info("t").stored_rows == sum(stored)


def test_retried_push_applies_once(client, shard):
    client.create_table(table_spec())
    ids = np.array([1, 2, 2, 9])
    req = pb.PushGradientsRequest(
        table="t",
        ids=wire.pack_ids(ids),
        grads=wire.pack_rows(np.ones((4, 8), np.float32), "float32"),
        grad_dtype=pb.FLOAT32,
        request_id="push-1",
    )
    stub = client._stub(shard.address)
    first = stub.PushGradients(req)
    after_first = client.lookup("t", ids)
    second = stub.PushGradients(req)
    assert not first.duplicate and first.rows_updated == 3
    assert second.duplicate and second.step == first.step
    np.testing.assert_array_equal(client.lookup("t", ids), after_first)
    assert client.table_info("t").pushes == 1
    # the client sends the same id on every retry of one logical push
    r = client.push("t", ids, np.ones((4, 8)), request_id="logical")
    again = client.push("t", ids, np.ones((4, 8)), request_id="logical")
    assert not r.duplicate and again.duplicate


def test_rows_survive_restart(shard):
    with StoreClient(shard.address) as c:
        c.create_table(table_spec())
        ids = np.arange(0, 1000, 7)
        c.push("t", ids, np.ones((len(ids), 8)))
        before = c.lookup("t", ids)
    shard.stop()
    shard.start()  # same data dir, new port
    with StoreClient(shard.address) as c:
        np.testing.assert_array_equal(c.lookup("t", ids), before)
        assert c.table_info("t").step == 1


def test_rows_survive_kill9(tmp_path, server_process):
    data = tmp_path / "killed"
    p = server_process(data)
    ids = np.arange(0, 1000, 3)
    with StoreClient(p.address) as c:
        c.create_table(table_spec())
        for step in range(1, 4):
            c.push("t", ids, np.full((len(ids), 8), 0.1 * step), step=step)  # acknowledged
        before = c.lookup("t", ids)
    p.kill9()
    q = server_process(data)  # the lock of the dead process is gone
    with StoreClient(q.address) as c:
        np.testing.assert_array_equal(c.lookup("t", ids), before)
        assert c.table_info("t").step == 3
    assert q.terminate() == 0  # SIGTERM: graceful stop, exit 0


def test_async_and_client_validation(client):
    client.create_table(table_spec())
    ids = np.array([4, 5, 6])
    fut = client.lookup_async("t", ids)
    push = client.push_async("t", ids, np.ones((3, 8), np.float32))
    assert fut.result().shape == (3, 8)
    # the caller owns the rows, with or without duplicate ids
    assert client.lookup("t", ids).flags.writeable
    assert client.lookup("t", np.array([4, 4])).flags.writeable
    assert push.result().rows_updated == 3
    from engram_store.engine.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="integer"):
        client.lookup("t", np.array([1.5]))
    with pytest.raises(InvalidArgument, match=r"\(3, 8\)"):
        client.push("t", ids, np.ones((3, 4), np.float32))
    with pytest.raises(InvalidArgument, match="float"):
        client.push("t", ids, np.ones((3, 8), np.int64))
