"""A shard server: the engine's Shard behind MemoryStoreServicer, with what operating it needs
(auth and TLS, Prometheus metrics, the snapshot gate and StoreAdmin, health, reflection).

    server, port, shard = create_server(ServerConfig(ShardConfig(data_dir="/tmp/s0")))  # tests: port 0
    serve(config)                                                           # blocks until SIGTERM
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engram_store.engine.shard import Shard
from engram_store.rpc.admin import SnapshotGate, SnapshotServicer
from engram_store.rpc.auth import server_credentials, server_interceptors
from engram_store.rpc.config import ServerConfig
from engram_store.rpc.metrics import ServerMetrics
from engram_store.rpc.servicer import SERVICE, MemoryStoreServicer, add_servicer

ADMIN_SERVICE = "engram.v1.StoreAdmin"


@dataclass
class ServerExtras:
    config: ServerConfig
    shard: Shard
    gate: SnapshotGate
    metrics: ServerMetrics | None
    interceptors: list = field(default_factory=list)
    metrics_port: int | None = None

    def register(self, server: grpc.Server) -> None:
        """Add the StoreAdmin service and start /metrics (when a metrics port is configured)."""
        SnapshotServicer(self.shard, self.gate).add_to_server(server)
        if self.metrics is not None and self.config.metrics_port is not None:
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


def server_extras(config: ServerConfig, shard: Shard) -> ServerExtras:
    """The interceptors and services of a shard server: metrics (outermost, so they count
    refused calls too), then auth, then the snapshot gate."""
    gate = SnapshotGate()
    metrics = None
    if config.metrics_port is not None:
        metrics = ServerMetrics(step_of=lambda t: shard.table_stats(t).step, shard=shard)
    chain = ([metrics] if metrics else []) + server_interceptors(config.auth) + [gate]
    return ServerExtras(config, shard, gate, metrics, chain)


def create_server(config: ServerConfig) -> tuple[grpc.Server, int, Shard]:
    """Open config.shard and start a server on config.host:config.port (0: any free port).

    Returns (server, bound port, shard). The caller stops the server and closes the shard.
    """
    config.validate()
    shard = Shard(config.served_shard())
    extras = None
    try:
        opts = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        extras = server_extras(config, shard)  # auth, metrics, snapshot gate
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers),
            options=opts,
            interceptors=extras.interceptors,
        )
        servicer = MemoryStoreServicer(shard, shard.config)
        add_servicer(servicer, server)
        server.servicer = servicer  # for tests and serve(); grpc.Server allows attributes
        health_servicer = health.HealthServicer()
        for name in ("", SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.health = health_servicer
        extras.register(server)
        server.extras = extras
        reflection.enable_server_reflection(
            (SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = extras.add_port(server, f"{config.host}:{config.port}")
        if port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}; pick another --port")
        server.start()
    except BaseException:
        if extras is not None:
            extras.close()
        shard.close()
        raise
    return server, port, shard


def stop_server(server: grpc.Server, shard: Shard, grace_s: float = 5.0) -> None:
    """Stop taking calls, let calls in flight finish (up to grace_s), then close the shard."""
    health_servicer = getattr(server, "health", None)
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    server.stop(grace_s).wait()
    if getattr(server, "extras", None) is not None:
        server.extras.close()
    shard.close()


def serve(config: ServerConfig, ready: Callable[[str, int], None] | None = None) -> None:
    """Serve one shard until SIGTERM or SIGINT, then stop gracefully and close the shard.

    `ready(host, port)` is called once the server listens (the CLI prints the address).
    """
    server, port, shard = create_server(config)
    done = threading.Event()
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            ready(config.host, port)
        while not done.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        stop_server(server, shard)
