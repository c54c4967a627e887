"""The one retry policy of the gRPC layer, used by StoreClient, cluster.admin.ShardAdmin and
anything else that retries a call.

Which errors are retried is decided by class, never by status code or message text:
ShardUnavailable and its subclasses (a shard restarting, slots being moved, a snapshot pausing
writes, a timeout) are retried after an exponential backoff; WrongShard means the caller's shard
map is stale, which a router fixes by refreshing the map and re-routing (StoreClient does);
every other error is final.

    policy = RetryPolicy.of(client_config)  # retries, backoff_s, backoff_max_s, retry_budget_s
    rows = policy.call(lambda: stub.Lookup(request, timeout=5.0))
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from engram_store.engine.errors import ConfigError, EngramError, ShardUnavailable, WrongShard
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.status import error_from_rpc

T = TypeVar("T")


def retryable(err: BaseException) -> bool:
    """Whether the same call may succeed later (ShardUnavailable and its subclasses)."""
    return isinstance(err, ShardUnavailable)


def stale_map(err: BaseException) -> bool:
    """Whether the shard said the caller's shard map is outdated: refresh it and re-route."""
    return isinstance(err, WrongShard)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry: up to `retries` attempts after the first (None:
    no limit), waiting backoff_s * 2**attempt (at most backoff_max_s) before each, and, with
    `deadline_s`, no retry whose wait would end more than deadline_s after the first attempt
    began."""

    retries: int | None = 8
    backoff_s: float = 0.05
    backoff_max_s: float = 2.0
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if (
            (self.retries is not None and self.retries < 0)
            or self.backoff_s < 0
            or self.backoff_max_s < 0
        ):
            raise ConfigError("retries, backoff_s and backoff_max_s must be >= 0")
        if self.retries is None and self.deadline_s is None:
            raise ConfigError("a retry policy without a retry limit needs a deadline_s")

    @classmethod
    def of(cls, config: ClientConfig) -> RetryPolicy:
        """The policy of a ClientConfig (its retries, backoff_s, backoff_max_s and
        retry_budget_s as the deadline)."""
        return cls(config.retries, config.backoff_s, config.backoff_max_s, config.retry_budget_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based)."""
        return min(self.backoff_s * 2**attempt, self.backoff_max_s)

    def start(self) -> Attempts:
        """The attempts of one operation, counted from now."""
        return Attempts(self)

    def call(self, fn: Callable[[], T]) -> T:
        """fn() until it succeeds, retrying retryable failures while the policy allows.

        A grpc.RpcError is converted to its project error (status.error_from_rpc); raises the
        error of the last attempt, or the first error that is not retryable."""
        attempts = self.start()
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                err = error_from_rpc(e)
            except EngramError as e:
                err = e
            if not retryable(err) or not attempts.can_retry():
                raise err from None
            attempts.backoff()


class Attempts:
    """The attempts of one operation under a RetryPolicy: the current attempt's number,
    whether another may follow, and the wait before it."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.number = 0
        self._started = time.monotonic()

    def can_retry(self) -> bool:
        """Whether another attempt may follow the current one."""
        p = self.policy
        if p.retries is not None and self.number >= p.retries:
            return False
        return p.deadline_s is None or (
            time.monotonic() + p.delay(self.number) < self._started + p.deadline_s
        )

    def backoff(self) -> None:
        """Wait before the next attempt and count it."""
        time.sleep(self.policy.delay(self.number))
        self.number += 1
