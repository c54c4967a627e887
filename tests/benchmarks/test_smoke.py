"""The benchmarks' own logic on tiny real inputs: wire economy and the Redis baseline's Adam
(quality.py's own logic: tests/benchmarks/test_quality.py).

No timing assertions: these check that the numbers the benchmarks report mean what they say.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_redis  # noqa: E402
import bench_wire  # noqa: E402
import quality  # noqa: E402

from engram_store.engine.config import OptimizerConfig, TableConfig  # noqa: E402
from engram_store.engine.init import initial_rows  # noqa: E402
from engram_store.engine.optimizers import apply, coalesce  # noqa: E402
from trainer.config import ArchConfig, PrefetchConfig, TrainConfig  # noqa: E402
from trainer.data import Document  # noqa: E402


def _real_docs() -> list:
    """A few stdlib module docstrings: small, real English text."""
    import argparse
    import collections
    import json
    import logging
    import subprocess
    import textwrap
    import unittest

    mods = (argparse, collections, json, logging, subprocess, textwrap, unittest)
    return [Document(m.__name__, m.__doc__ * 3) for m in mods]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """The trainer's Corpus of quality.load_data's Data (tokenizer trained on the train split)."""
    d = quality.load_data(
        None, 512, docs=_real_docs(), cache_dir=str(tmp_path_factory.mktemp("tok"))
    )
    assert d.docs["train"] and d.docs["tune"] and d.docs["val"]
    return d.corpus


def test_wire_dedup_and_cache_send_fewer_rows_than_naive(tiny_corpus):
    cfg = TrainConfig(
        model=ArchConfig(table_base_size=1000, engram_layers=(1,)),
        backend="local",
        batch_size=4,
        seq_len=64,
        vocab_size=512,
        progress=False,
    )
    dedup = bench_wire.measure(cfg, tiny_corpus, 4, PrefetchConfig(depth=1, update="async"))
    assert dedup["naive_rows_per_token"] == 8  # (N-1) * K = 2 * 4 rows per token, one layer
    assert dedup["tokens"] == 4 * 4 * 64
    assert 0 < dedup["lookup_ratio_vs_naive"] < 1
    # the Prefetcher's counter agrees with counting unique hashed ids directly
    assert dedup["lookup_ratio_vs_naive"] == pytest.approx(
        bench_wire.independent_dedup(cfg, tiny_corpus, 4)
    )
    assert dedup["push_rows_per_token"] == pytest.approx(dedup["lookup_rows_per_token"])

    cached = bench_wire.measure(
        cfg,
        tiny_corpus,
        4,
        PrefetchConfig(depth=1, update="async", cache_rows=1 << 16, cache_staleness=1),
    )
    assert cached["lookup_ratio_vs_naive"] <= dedup["lookup_ratio_vs_naive"]
    assert cached["lookup_ratio_vs_naive"] < 1


# ------------------------------------------------------------------------------ Redis baseline


@pytest.fixture(scope="module")
def redis_port():
    pytest.importorskip("redis", reason="the redis Python client is not installed")
    binary, why = bench_redis.find_redis_server(install=False)
    if binary is None:
        pytest.skip(f"Redis parts skipped: {why}")
    with bench_redis.redis_server(binary) as port:
        yield port


@pytest.fixture
def engine_shard(tmp_path):
    """The storage engine itself (no server): what the Redis baseline is compared against."""
    from engram_store.engine.config import ShardConfig
    from engram_store.engine.shard import Shard

    with Shard(ShardConfig(data_dir=str(tmp_path / "shard"), map_size=64 << 20)) as s:
        yield s


def test_redis_rmw_adam_matches_the_store(redis_port, engine_shard):
    import redis

    shard = engine_shard

    spec = TableConfig(
        "t", num_rows=1000, dim=8, seed=3, optimizer=OptimizerConfig(kind="adam", lr=0.05)
    )
    table = bench_redis.RedisTable(redis.Redis(port=redis_port), spec, chunk=7)
    table.r.flushall()
    shard.create_table(spec)
    rng = np.random.default_rng(0)
    ids_all = np.arange(1000)
    ref_rows = initial_rows(spec, ids_all)
    ref_state = np.zeros((1000, 16), np.float32)
    for step in range(1, 4):
        ids = rng.integers(0, 40, size=30)  # duplicates: summed before the optimizer
        grads = rng.standard_normal((30, 8)).astype(np.float32)
        assert table.push(ids, grads) == step
        shard.push("t", ids, grads)
        u, g = coalesce(ids, grads)
        ref_rows[u], ref_state[u] = apply(spec.optimizer, ref_rows[u], ref_state[u], g, step)

    probe = np.arange(50)  # pushed rows and never-pushed rows
    # the baseline runs the numpy reference, the store its fused kernel: equal to rounding
    tol = {"rtol": 1e-6, "atol": 1e-7}
    np.testing.assert_allclose(table.lookup(probe), shard.lookup("t", probe), **tol)
    np.testing.assert_allclose(table.state(probe), shard.optimizer_state("t", probe), **tol)
    np.testing.assert_array_equal(table.lookup(probe), ref_rows[probe])
    assert not np.array_equal(table.lookup(probe[:40]), initial_rows(spec, probe[:40]))


def test_readme_results_block_is_replaced_in_place(tmp_path):
    import run_all

    readme = tmp_path / "README.md"
    readme.write_text("# project\n\ntext\n")
    run_all.update_readme("# Benchmark results\n\n| a |\n\n![f](quality_loss.png)\n", readme)
    run_all.update_readme("# Benchmark results\n\n| b |\n", readme)
    text = readme.read_text()
    assert text.startswith("# project\n\ntext\n")
    assert text.count(run_all.START) == text.count(run_all.END) == 1
    assert "| b |" in text and "| a |" not in text


def test_a_merged_budget_run_gets_its_own_quality_rows():
    import run_all

    def entry(mean: float, hi: float) -> dict:
        ci = {"mean": mean, "lo": mean - 0.01, "hi": hi, "n": 3, "confidence": 0.95}
        return {"ratio_vs_dense_isoflop": ci, "meets_target": mean <= 0.97 and hi < 1.0}

    report = {
        "benchmark": "quality",
        "corpora": {"stdlib": entry(0.99, 1.01)},
        "budget": {"mode": "budget", "corpora": {"libdocs": entry(0.90, 0.92)}},
    }
    rows = run_all.rows_quality(report)
    budget = [r for r in rows if r[0].startswith("libdocs --budget: validation loss")]
    assert len(budget) == 1 and budget[0][1] == "0.900 [0.890, 0.920]" and budget[0][3] == "PASS"
    assert any(r[0].startswith("stdlib: validation loss") and r[3] == "MISS" for r in rows)
    assert "budget" not in run_all.rows_quality({"corpora": {"stdlib": entry(0.9, 0.95)}})[0][0]
    # a --no-dense run (no same-width arm: n = 0) gets no "vs dense" row; a run with it does
    assert not any("same backbone" in r[0] for r in rows)
    with_dense = {**entry(0.9, 0.95), "ratio_vs_dense": entry(0.95, 0.96)["ratio_vs_dense_isoflop"]}
    rows = run_all.rows_quality({"corpora": {"stdlib": with_dense}})
    assert [r[1] for r in rows if "same backbone" in r[0]] == ["0.950 [0.940, 0.960]"]
