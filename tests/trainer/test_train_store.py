"""Training against the store (2 shards, real gRPC, real LMDB) equals single-process training with
in-process tables; prefetch depth does not change sync results; bad configurations fail at start."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engram_store.engine.errors import ConfigError, ShardUnavailable
from tests.trainer.store_helpers import assert_matches, reference_run, shard_servers, tiny_config
from trainer.config import TrainConfig
from trainer.loop import train_worker


@pytest.fixture(scope="module")
def reference():
    return reference_run(tiny_config())


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_sync_training_equals_single_process(tmp_path, reference, depth):
    with shard_servers(tmp_path) as addresses:
        cfg = tiny_config(store=addresses, prefetch_depth=depth, out=str(tmp_path / "run"))
        summary = train_worker(cfg)
        assert summary["steps_run"] == cfg.steps
        if depth:
            assert summary["rows_refetched"] > 0  # prefetched batches did see pushes to patch
        assert_matches(summary["checkpoint"], addresses, cfg, reference)


def test_async_training_runs_and_pushes(tmp_path):
    with shard_servers(tmp_path) as addresses:
        cfg = tiny_config(
            store=addresses,
            update="async",
            prefetch_depth=2,
            max_inflight=2,
            cache_rows=4096,
            cache_staleness=2,
            out=str(tmp_path / "run"),
        )
        s = train_worker(cfg)
        assert np.isfinite(s["final_loss"]) and s["rows_per_token"] > 0
        assert 0 <= s["cache_hit_rate"] <= 1
        from engram_store.rpc.client import StoreClient

        with StoreClient(list(addresses)) as c:
            assert c.table_info("engram_l1").step == cfg.steps  # every push landed, in order


def test_engram_layer_beyond_depth():
    with pytest.raises(ConfigError, match="beyond the model depth"):
        train_worker(tiny_config(n_layer=2, engram_layers=(2,), store=("127.0.0.1:1",)))


def test_ngram_order_below_two():
    with pytest.raises(ConfigError, match="n-gram order 1 < 2"):
        train_worker(tiny_config(max_ngram=1, store=("127.0.0.1:1",)))


def test_store_unreachable():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ShardUnavailable, match="unreachable"):  # a runtime error: exit 1
        train_worker(tiny_config(store=(f"127.0.0.1:{port}",)))


def test_vocabulary_mismatch_on_resume(tmp_path):
    cfg = tiny_config(backend="local", steps=1, out=str(tmp_path / "a"))
    ckpt = train_worker(cfg)["checkpoint"]
    other = dataclasses.replace(cfg, vocab_size=96, resume=ckpt, steps=2, out=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        train_worker(other)
    data = torch.load(ckpt, weights_only=False)
    assert data["tokenizer"] == {"fingerprint": "synthetic-64", "vocab_size": 64}
    assert TrainConfig.from_dict(data["config"]) == cfg


def test_resume_continues_exactly(tmp_path, reference):
    """10 steps, checkpoint, resume to 20 on the same store == 20 steps in one go."""
    with shard_servers(tmp_path) as addresses:
        first = tiny_config(store=addresses, steps=10, out=str(tmp_path / "a"))
        ckpt = train_worker(first)["checkpoint"]
        second = dataclasses.replace(first, steps=20, resume=ckpt, out=str(tmp_path / "b"))
        summary = train_worker(second)
        assert summary["steps_run"] == 10
        assert_matches(summary["checkpoint"], addresses, second, reference)
