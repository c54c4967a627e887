"""Prometheus endpoints of shards and trainers, and the reader for `cluster status`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engram_store.engine.errors import InvalidArgument
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.metrics import histogram_quantile, scrape, summarize
from tests.servers import table_spec
from trainer.metrics import TrainerMetrics


def _value(families: dict, name: str, **labels) -> float:
    return sum(
        v for lab, v in families.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_shard_metrics_endpoint(make_shard):
    s = make_shard(metrics_port=0)
    port = s.server.extras.metrics_port
    assert port
    with StoreClient(s.address, ClientConfig(retries=0)) as c:
        c.create_table(table_spec("t"))
        for _ in range(5):
            c.lookup("t", np.arange(100))
        for step in (1, 2, 3):
            c.push("t", np.arange(10), np.ones((10, 8)), step=step)
        c.push("t", [1], np.ones((1, 8)), step=1)  # two steps behind the table
        with pytest.raises(InvalidArgument):
            c.lookup("t", [10**9])
    f = scrape(f"127.0.0.1:{port}")
    assert _value(f, "engram_requests_total", method="Lookup", code="OK") == 5
    assert _value(f, "engram_requests_total", method="Lookup", code="INVALID_ARGUMENT") == 1
    assert _value(f, "engram_rows_total", method="Lookup") == 501
    assert _value(f, "engram_rows_total", method="PushGradients") == 31
    assert _value(f, "engram_bytes_total", method="Lookup", direction="out") >= 500 * 8 * 4
    assert _value(f, "engram_request_seconds_count", method="PushGradients") == 4
    assert _value(f, "engram_stored_rows") == 10 and _value(f, "engram_table_step", table="t") == 3
    # staleness = table step - request step: 0-1, 1-2, 2-3 -> -1 each; then 3-1 = 2
    assert _value(f, "engram_push_staleness_bucket", table="t", le="-1.0") == 3
    assert _value(f, "engram_push_staleness_bucket", table="t", le="1.0") == 3
    assert _value(f, "engram_push_staleness_bucket", table="t", le="2.0") == 4
    summary = summarize(f)
    lk = summary["methods"]["Lookup"]
    assert lk["requests"] == 6 and lk["errors"] == {"INVALID_ARGUMENT": 1} and lk["rows"] == 501
    assert 0 < lk["p50_ms"] <= lk["p99_ms"] < 10_000
    assert summary["staleness"]["t"]["p99"] <= 2
    assert summary["gauges"]["engram_stored_rows"] == 10


def test_no_metrics_port_means_no_endpoint(shard):
    assert shard.server.extras.metrics is None


def test_trainer_metrics():
    m = TrainerMetrics(rank=1)
    port = m.serve(0)
    try:
        for stall in (0.001, 0.002, 0.2):
            m.observe_stall(stall)
        m.observe_step(tokens=1024, rows=3000)
        m.observe_cache(hits=30, misses=10)
        m.observe_cache(hits=10, misses=0)
        f = scrape(f"127.0.0.1:{port}")
    finally:
        m.close()
    assert _value(f, "engram_trainer_stall_seconds_count", rank="1") == 3
    assert _value(f, "engram_trainer_rows_per_token", rank="1") == pytest.approx(3000 / 1024)
    assert _value(f, "engram_trainer_cache_hit_rate", rank="1") == pytest.approx(40 / 50)
    assert _value(f, "engram_trainer_tokens_total", rank="1") == 1024


def test_histogram_quantile_matches_promql():
    buckets = [(0.1, 10.0), (0.2, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert histogram_quantile(0.99, [(-1, 5.0), (0, 5.0), (math.inf, 5.0)]) == -1
