"""What a shard server adds for operating it safely, in one place for service.create_server:
auth (tokens, TLS), Prometheus metrics, the snapshot gate and the StoreAdmin service.

    extras = server_extras(config, shard)
    server = grpc.server(executor, options=..., interceptors=extras.interceptors)
    ... add the MemoryStore servicer ...
    extras.register(server)                       # StoreAdmin.Snapshot, /metrics
    port = extras.add_port(server, "host:port")   # TLS when configured
    ...
    extras.close()                                # after server.stop()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from .auth import server_credentials, server_interceptors
from .config import ShardConfig
from .metrics import ServerMetrics
from .snapshot import SnapshotGate, SnapshotServicer

ADMIN_SERVICE = "engram.v1.StoreAdmin"


@dataclass
class ServerExtras:
    config: ShardConfig
    shard: object
    gate: SnapshotGate
    metrics: ServerMetrics | None
    interceptors: list = field(default_factory=list)
    metrics_port: int | None = None

    def register(self, server: grpc.Server) -> None:
        """Add the StoreAdmin service and start /metrics (when a metrics port is configured)."""
        SnapshotServicer(self.shard, self.gate).add_to_server(server)
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Listen on `address` with TLS if a certificate is configured; returns the port (0 when
        the address cannot be bound)."""
        creds = server_credentials(self.config.auth)
        if creds is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, creds)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def server_extras(config: ShardConfig, shard) -> ServerExtras:
    """The interceptors and services of a shard server: metrics (outermost, so they count
    refused calls too), then auth, then the snapshot gate."""
    gate = SnapshotGate()
    metrics = None
    if config.metrics_port is not None:
        metrics = ServerMetrics(step_of=lambda t: shard.table_stats(t).step, shard=shard)
    chain = ([metrics] if metrics else []) + server_interceptors(config.auth) + [gate]
    return ServerExtras(config, shard, gate, metrics, chain)
