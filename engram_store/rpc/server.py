"""A shard server: the engine's Shard behind MemoryStoreServicer, with what operating it needs
(auth and TLS, Prometheus metrics, the snapshot gate and StoreAdmin, health, reflection), and the
limits that keep a hostile or stuck caller from holding it (CallLimits):

- every call is bounded in time between messages: one that waits longer than
  ServerConfig.message_timeout_s for its (next) request message, or for its caller to take its
  next response message, is cancelled (an idle stream, a headers-only call, an unread ExportRows);
- a call waiting on the network holds no work slot: the thread pool has a thread for every
  admitted call (max_concurrent_rpcs; more are refused RESOURCE_EXHAUSTED at once), and at most
  `workers` of them run handler code at a time, so idle streams never delay authorised traffic;
- HTTP/2 streams per connection are capped (max_streams_per_connection), idle connections closed;
- the auth interceptor refuses a call from its headers, before its body is read (auth.py), and
  requests may not be compressed (a small compressed body cannot inflate into a large one).

    server, port, shard = create_server(ServerConfig(ShardConfig(data_dir="/tmp/s0")))  # tests: port 0
    serve(config)                                                           # blocks until SIGTERM
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engram_store.engine.errors import InvalidArgument
from engram_store.engine.shard import Shard
from engram_store.rpc.admin import SnapshotGate, SnapshotServicer
from engram_store.rpc.auth import server_credentials, server_interceptors
from engram_store.rpc.config import ServerConfig
from engram_store.rpc.metrics import ServerMetrics
from engram_store.rpc.servicer import SERVICE, MemoryStoreServicer, add_servicer
from engram_store.rpc.status import abort

ADMIN_SERVICE = "engram.v1.StoreAdmin"
#: grpc's compression bit set with only "identity" enabled: compressed requests are refused
IDENTITY_ONLY = 1


class CallLimits(grpc.ServerInterceptor):
    """The outermost interceptor: bounds every call in time between messages and limits how
    many run handler code at once.

    Each handler becomes request-streaming (grpc then calls it as soon as the call arrives, not
    after its message), so the wait for the first request message is timed here like every later
    one; a response-streaming handler's wait for the caller to take each response is timed too.
    A wait longer than `message_timeout_s` cancels the call (the caller sees CANCELLED), which
    frees its thread. `workers` MemoryStore calls at most run handler code at a time (a
    semaphore taken once the request has arrived, and per response of a stream while it is
    computed), so a call waiting on the network never takes a work slot from another."""

    def __init__(self, message_timeout_s: float, workers: int) -> None:
        self.timeout_s = message_timeout_s
        self.cancelled = 0  # calls cancelled for waiting too long (tests and the adversarial suite)
        self._work = threading.BoundedSemaphore(workers)
        self._armed: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engram-call-limits", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    # ---- the watchdog ----

    def _arm(self, context: grpc.ServicerContext) -> int:
        key = next(self._keys)
        with self._lock:
            self._armed[key] = (time.monotonic() + self.timeout_s, context)
        return key

    def _disarm(self, key: int) -> None:
        with self._lock:
            self._armed.pop(key, None)

    def _watch(self) -> None:
        tick = min(max(self.timeout_s / 10, 0.02), 1.0)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                late = [k for k, (deadline, _) in self._armed.items() if deadline <= now]
                contexts = [self._armed.pop(k)[1] for k in late]
            for context in contexts:
                self.cancelled += 1
                context.cancel()

    # ---- timed messages ----

    def _requests(self, requests: Iterator, context: grpc.ServicerContext) -> Iterator:
        while True:
            key = self._arm(context)
            try:
                request = next(requests)
            except StopIteration:
                return
            finally:
                self._disarm(key)
            yield request

    def _responses(
        self,
        responses: Iterator,
        context: grpc.ServicerContext,
        slot: contextlib.AbstractContextManager,
    ) -> Iterator:
        while True:
            with slot:
                try:
                    response = next(responses)
                except StopIteration:
                    return
            key = self._arm(context)
            try:
                yield response  # grpc sends it, then asks for the next
            finally:
                self._disarm(key)

    def _one(self, requests: Iterator, context: grpc.ServicerContext, method: str) -> object:
        """The single request message of a unary-request call, waited for with the timer."""
        for request in self._requests(requests, context):
            return request
        abort(context, InvalidArgument(f"{method} needs exactly one request message"))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        out, behaviour = handler.response_streaming, None
        # the store's own calls take a work slot; StoreAdmin (a FREEZE waits for writes in
        # flight, which need slots), health and reflection do not
        slot = self._work if method.startswith(f"/{SERVICE}/") else contextlib.nullcontext()
        if handler.request_streaming:
            behaviour = handler.stream_stream if out else handler.stream_unary

            def take(requests, context):
                return self._requests(requests, context)
        else:
            behaviour = handler.unary_stream if out else handler.unary_unary

            def take(requests, context):
                return self._one(requests, context, method)

        if out:

            def stream(requests, context):
                request = take(requests, context)
                yield from self._responses(iter(behaviour(request, context)), context, slot)

            return grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        def unary(requests, context):
            request = take(requests, context)
            if handler.request_streaming:
                return behaviour(request, context)  # waits on the network: no work slot
            with slot:
                return behaviour(request, context)

        return grpc.stream_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class ServerExtras:
    config: ServerConfig
    shard: Shard
    gate: SnapshotGate
    metrics: ServerMetrics | None
    limits: CallLimits
    interceptors: list = field(default_factory=list)
    metrics_port: int | None = None

    def register(self, server: grpc.Server) -> None:
        """Add the StoreAdmin service and start /metrics (when a metrics port is configured:
        with the server's TLS certificate, and asking for one of its tokens when it has any)."""
        SnapshotServicer(self.shard, self.gate).add_to_server(server)
        if self.metrics is not None and self.config.metrics_port is not None:
            auth = self.config.auth
            self.metrics_port = self.metrics.serve(
                self.config.metrics_port,
                self.config.host,
                tokens=auth.read_tokens + auth.write_tokens,
                tls_cert=auth.tls_cert,
                tls_key=auth.tls_key,
            )

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
        self.limits.close()


def server_extras(config: ServerConfig, shard: Shard) -> ServerExtras:
    """The interceptors and services of a shard server: the call limits (outermost: they time
    every call, refused ones too), metrics (so they count refused calls), then auth, then the
    snapshot gate."""
    gate = SnapshotGate()
    metrics = None
    if config.metrics_port is not None:
        metrics = ServerMetrics(step_of=lambda t: shard.table_stats(t).step, shard=shard)
    limits = CallLimits(config.message_timeout_s, config.workers)
    chain = [limits] + ([metrics] if metrics else []) + server_interceptors(config.auth) + [gate]
    return ServerExtras(config, shard, gate, metrics, limits, chain)


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
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            ("grpc.compression_enabled_algorithms_bitset", IDENTITY_ONLY),
            ("grpc.max_connection_idle_ms", 300_000),  # a connection without calls, 5 min
            ("grpc.keepalive_time_ms", 60_000),  # ping a quiet connection, drop a dead peer
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        extras = server_extras(config, shard)  # limits, metrics, auth, snapshot gate
        server = grpc.server(
            # a thread per admitted call (CallLimits lets `workers` of them work at a time)
            futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs),
            options=opts,
            interceptors=extras.interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        servicer = MemoryStoreServicer(
            shard,
            shard.config,
            max_response_bytes=config.max_message_bytes,
            max_import_bytes=config.max_import_bytes,
        )
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
