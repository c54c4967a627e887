"""Fixtures for the storage tests: real LMDB directories under pytest's tmp_path."""

import pytest

from engram_store.engine.config import ShardConfig
from engram_store.engine.shard import Shard


@pytest.fixture
def shard_config(tmp_path):
    # a small map keeps the sparse data file small; tests store little
    return ShardConfig(data_dir=str(tmp_path / "shard"), map_size=64 << 20)


@pytest.fixture
def shard(shard_config):
    with Shard(shard_config) as s:
        yield s
