"""Export for inference: safetensors files equal the store's rows, pushed or not."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import TableNotFound
from engram_store.ops.export import export_safetensors
from engram_store.ops.snapshot import snapshot
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from tests.ops.test_snapshot import make_cluster

HEADS = (1009, 1013, 1019, 1021)
ENGRAM = TableConfig(
    name="engram_l1",
    head_rows=HEADS,
    dim=8,
    dtype="bfloat16",
    seed=3,
    optimizer=OptimizerConfig(kind="adam", lr=0.05),
)
PLAIN = TableConfig(name="plain", num_rows=300, dim=5, optimizer=OptimizerConfig(kind="sgd"))
HASH = json.dumps({"layers": [1], "max_ngram": 3, "heads": 2, "n_embed_per_ngram": 16})


def _fill(c: StoreClient) -> None:
    rng = np.random.default_rng(1)
    c.create_table(ENGRAM)
    c.create_table(PLAIN)
    for step in (1, 2):
        ids = rng.integers(0, ENGRAM.num_rows, 1500)
        c.push("engram_l1", ids, rng.standard_normal((1500, 8)), step=step)
    c.push("plain", [0, 299], np.ones((2, 5)))


def _lookup_all(c: StoreClient, spec: TableConfig) -> np.ndarray:
    ids = np.arange(spec.num_rows)
    return np.concatenate(
        [c.lookup(spec.name, ids[i : i + 4000]) for i in range(0, len(ids), 4000)]
    )


def test_export_round_trip_from_a_live_store(make_shard, tmp_path):
    shards = make_cluster(make_shard, 2)
    with StoreClient(shards[0].address) as c:
        _fill(c)
        expected = {s.name: _lookup_all(c, s) for s in (ENGRAM, PLAIN)}
        paths = export_safetensors(c, str(tmp_path / "out"), hash_config=HASH, chunk_rows=1000)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["engram_l1.safetensors", "plain.safetensors"]
    for spec in (ENGRAM, PLAIN):
        w = load_file(str(tmp_path / "out" / f"{spec.name}.safetensors"))["weight"]
        assert w.shape == (spec.num_rows, spec.dim) and w.dtype == np.float32
        np.testing.assert_array_equal(w, expected[spec.name])  # stored and never-pushed rows
    with safe_open(str(tmp_path / "out" / "engram_l1.safetensors"), "np") as f:
        meta = f.metadata()
        head2 = f.get_slice("weight")[HEADS[0] + HEADS[1] : sum(HEADS[:3])]  # memory-mapped
    assert meta["layer"] == "1" and json.loads(meta["head_rows"]) == list(HEADS)
    assert json.loads(meta["head_offsets"]) == [0, 1009, 2022, 3041]
    assert json.loads(meta["hash_config"])["heads"] == 2 and meta["step"] == "2"
    assert TableConfig.from_dict(json.loads(meta["spec"])) == ENGRAM
    np.testing.assert_array_equal(head2, expected["engram_l1"][2022:3041])


def test_export_from_a_snapshot_and_float16(make_shard, tmp_path):
    shard = make_shard()
    with StoreClient(shard.address) as c:
        _fill(c)
        expected = _lookup_all(c, ENGRAM)
    snapshot(shard.address, str(tmp_path / "snap"))
    export_safetensors(
        None,
        str(tmp_path / "out"),
        ["engram_l1"],
        dtype="float16",
        snapshot_dir=str(tmp_path / "snap"),
    )
    w = load_file(str(tmp_path / "out" / "engram_l1.safetensors"))["weight"]
    assert w.dtype == np.float16
    np.testing.assert_array_equal(w, expected.astype(np.float16))
    with pytest.raises(TableNotFound, match="nope"):
        export_safetensors(shard.address, str(tmp_path / "o2"), ["nope"])


def test_read_only_serving_refuses_writes(make_shard, tmp_path):
    s = make_shard()
    with StoreClient(s.address) as c:
        c.create_table(PLAIN)
        c.push("plain", [1], np.ones((1, 5)))
        before = c.lookup("plain", [1, 2])
    s.stop()
    ro = make_shard(data_dir=s.config.shard.data_dir, read_only=True)
    stub = pb_grpc.MemoryStoreStub(grpc.insecure_channel(ro.address))
    with pytest.raises(grpc.RpcError) as e:
        stub.PushGradients(
            pb.PushGradientsRequest(
                table="plain",
                ids=np.arange(1, dtype="<i8").tobytes(),
                grads=np.ones((1, 5), "<f4").tobytes(),
            ),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with StoreClient(ro.address, ClientConfig(retries=0)) as c:
        np.testing.assert_array_equal(c.lookup("plain", [1, 2]), before)
        with pytest.raises(Exception, match="read-only"):
            c.create_table(ENGRAM)
