"""The one retry policy: which errors are retried (by class), how often, how long it waits."""

from __future__ import annotations

import time

import pytest

from engram_store.engine import errors
from engram_store.engine.errors import SnapshotInProgress
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.retry import RetryPolicy, retryable, stale_map


def test_backoff_doubles_up_to_the_cap():
    p = RetryPolicy.of(ClientConfig(retries=8, backoff_s=0.05, backoff_max_s=0.3))
    assert (p.retries, p.backoff_s, p.backoff_max_s) == (8, 0.05, 0.3)
    assert [p.delay(a) for a in range(5)] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])


def test_which_classes_are_retried():
    for cls in (errors.ShardUnavailable, errors.DeadlineExceeded, SnapshotInProgress):
        assert retryable(cls("x")) and not stale_map(cls("x"))
    assert stale_map(errors.WrongShard("x")) and not retryable(errors.WrongShard("x"))
    for cls in (
        errors.LayoutMismatch,
        errors.DataDirLocked,
        errors.InvalidArgument,
        errors.EngramError,
    ):
        assert not retryable(cls("x")) and not stale_map(cls("x"))


def _failing(n: int, err: Exception, calls: list[float]):
    def fn() -> str:
        calls.append(time.monotonic())
        if len(calls) <= n:
            raise err
        return "ok"

    return fn


def test_call_retries_up_to_the_limit():
    calls: list[float] = []
    assert (
        RetryPolicy(retries=3, backoff_s=0.0).call(_failing(3, SnapshotInProgress("paused"), calls))
        == "ok"
    )
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(SnapshotInProgress, match="paused"):
        RetryPolicy(retries=2, backoff_s=0.0).call(_failing(9, SnapshotInProgress("paused"), calls))
    assert len(calls) == 3  # the first attempt and 2 retries
    calls.clear()
    with pytest.raises(errors.TableNotFound):  # final: not retried
        RetryPolicy(retries=5, backoff_s=0.0).call(_failing(9, errors.TableNotFound("t"), calls))
    assert len(calls) == 1


def test_a_deadline_bounds_an_unlimited_policy():
    calls: list[float] = []
    p = RetryPolicy(retries=None, backoff_s=0.01, backoff_max_s=0.04, deadline_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(errors.ShardUnavailable):
        p.call(_failing(10**6, errors.ShardUnavailable("down"), calls))
    assert time.monotonic() - t0 < 0.3 + 0.1
    assert len(calls) >= 5  # waits 0.01, 0.02, 0.04, 0.04, ...
    with pytest.raises(errors.ConfigError):
        RetryPolicy(retries=None)


def test_client_waits_out_a_snapshot(make_shard, monkeypatch):
    s = make_shard()
    real, fails = s.servicer.shard.stats, [SnapshotInProgress("paused")] * 2

    def stats():
        if fails:
            raise fails.pop()
        return real()

    with StoreClient(s.address, ClientConfig(retries=2, backoff_s=0.01)) as c:
        monkeypatch.setattr(s.servicer.shard, "stats", stats)
        assert c.stats()[0]["address"] == s.address
        fails.extend([SnapshotInProgress("paused")] * 3)
        with pytest.raises(
            SnapshotInProgress, match=f"{s.address} failed after 2 retries: UNAVAILABLE: paused"
        ):
            c.stats()
