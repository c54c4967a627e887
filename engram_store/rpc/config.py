"""Configuration of the gRPC layer, one frozen dataclass per concern: who may call a server
(AuthConfig), how a server listens around its shard (ServerConfig, which nests the engine's
ShardConfig), and how a client talks to the store (ClientConfig). The CLI builds them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engram_store.engine.config import DTYPES, ShardConfig
from engram_store.engine.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class AuthConfig:
    """Who may call a shard server: shared bearer tokens, and TLS (engram_store/rpc/auth.py).

    No tokens: every call is allowed, which a server accepts only on a loopback host unless
    `insecure`. A read token may call lookups and stats; a write token may call everything.
    """

    read_tokens: tuple[str, ...] = ()
    write_tokens: tuple[str, ...] = ()
    tls_cert: str = ""  # PEM certificate chain file; with tls_key the server speaks TLS only
    tls_key: str = ""
    insecure: bool = False  # allow no tokens on a non-loopback host

    @property
    def enabled(self) -> bool:
        return bool(self.read_tokens or self.write_tokens)

    def validate(self, host: str) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if any(not t or any(c.isspace() for c in t) for t in self.read_tokens + self.write_tokens):
            raise ConfigError("tokens must be non-empty and contain no whitespace")
        if not self.enabled and not self.insecure and host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"refusing to serve on {host} without authentication: give --write-token / "
                "--read-token (or --tokens-file), listen on 127.0.0.1, or pass --insecure to "
                "accept unauthenticated calls from the network"
            )


@dataclass(frozen=True)
class ServerConfig:
    """One shard server: the shard it opens and how it serves it."""

    shard: ShardConfig
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 512 << 20
    workers: int = 8  # gRPC server threads
    auth: AuthConfig = field(default_factory=AuthConfig)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free); None: off
    # Limits that keep hostile or stuck callers from holding the server (server.CallLimits):
    # a call waiting longer than this for its next request message, or for the caller to take
    # its next response message, is cancelled
    message_timeout_s: float = 30.0
    # calls admitted at once (more are refused RESOURCE_EXHAUSTED at once, never queued)
    max_concurrent_rpcs: int = 256
    max_streams_per_connection: int = 64  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
    # an ImportRows stream is staged whole before it is applied (all or nothing): its records
    # may total at most this many bytes
    max_import_bytes: int = 1 << 30

    def validate(self) -> None:
        self.shard.validate()
        self.auth.validate(self.host)
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics port {self.metrics_port} must be in [0, 65535]")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} must be in [0, 65535]")
        for name in (
            "max_message_bytes",
            "workers",
            "message_timeout_s",
            "max_concurrent_rpcs",
            "max_streams_per_connection",
            "max_import_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")

    def served_shard(self) -> ShardConfig:
        """The shard as this server opens it: every gRPC worker (and the snapshot copy) may hold
        an LMDB read transaction, so it gets reader slots for all of them."""
        readers = max(self.shard.max_readers, 4 * self.workers)
        return dataclasses.replace(self.shard, max_readers=readers)


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to the store."""

    timeout_s: float = 60.0
    # attempts after the first for UNAVAILABLE / stale shard map (None: as many as the budget
    # allows)
    retries: int | None = None
    backoff_s: float = 0.05  # first retry delay; doubles up to backoff_max_s
    backoff_max_s: float = 2.0
    # no retry starts later than this many seconds after the first attempt: long enough for a
    # shard to restart on a loaded machine (open, replay its log, listen: 10-20 s measured)
    retry_budget_s: float = 30.0
    wire_dtype: str = "float32"
    max_batch_rows: int = 1 << 20  # larger requests are split per shard into chunks of this size
    max_message_bytes: int = 512 << 20
    threads: int = 8  # futures: requests in flight at once
    token: str = ""  # sent as `authorization: Bearer <token>` on every call
    tls_root_cert: str = ""  # PEM file of the CA (or self-signed cert) to trust; "" = plaintext

    def validate(self) -> None:
        if self.wire_dtype not in DTYPES:
            raise ConfigError(f"wire dtype {self.wire_dtype!r} is unknown; use one of {DTYPES}")
        if self.timeout_s <= 0 or (self.retries is not None and self.retries < 0):
            raise ConfigError("timeout_s must be > 0 and retries >= 0 (or None)")
        if self.backoff_s < 0 or self.retry_budget_s <= 0:
            raise ConfigError("backoff_s must be >= 0 and retry_budget_s > 0")
