"""`engram serve`: one shard (an LMDB data directory) over gRPC, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import socket
import threading

from engram.cli import options
from engram_store.engine.config import ShardConfig
from engram_store.rpc.config import ServerConfig


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig (and the ShardConfig it nests) that `engram serve` flags describe."""
    d = ServerConfig(shard=ShardConfig(data_dir=args.data))
    shard = ShardConfig(
        data_dir=args.data,
        map_size=args.map_size or d.shard.map_size,
        max_batch_rows=args.max_batch_rows or d.shard.max_batch_rows,
        memory_bytes=args.memory or d.shard.memory_bytes,
        durable=args.durable,
        read_only=args.read_only,
    )
    return ServerConfig(
        shard=shard,
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_bytes or d.max_message_bytes,
        workers=args.workers or d.workers,
        auth=options.auth_config(args),
        metrics_port=args.metrics_port,
        message_timeout_s=args.message_timeout or d.message_timeout_s,
        max_concurrent_rpcs=args.max_concurrent_rpcs or d.max_concurrent_rpcs,
        max_streams_per_connection=args.max_streams_per_connection or d.max_streams_per_connection,
        max_import_bytes=args.max_import_bytes or d.max_import_bytes,
    )


def _check_port(host: str, port: int) -> None:
    """OSError, one line, when host:port cannot be bound (another server has it): said before
    gRPC tries, which would log its own multi-line error first."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(
                f"cannot listen on {host}:{port}: {e.strerror}; another process has that port "
                "(pick another --port, or 0 for any free port)"
            ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. Prints `serving on HOST:PORT` once it listens, and
    `metrics on http://HOST:PORT/metrics` with the port it bound (--metrics-port 0: any free)."""
    # grpc is only needed by commands that use it
    from engram_store.rpc.server import create_server, stop_server

    config = server_config(args)
    _check_port(config.host, config.port)
    try:
        server, port, shard = create_server(config)
    except RuntimeError as e:  # grpc: "Failed to bind to address ..." (a race with the check)
        raise OSError(
            f"cannot listen on {config.host}:{config.port} ({e}); pick another --port "
            "(0: any free port)"
        ) from None
    done = threading.Event()
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"serving on {config.host}:{port}", flush=True)
        metrics_port = server.extras.metrics_port
        if metrics_port is not None:
            scheme = "https" if config.auth.tls_cert else "http"  # /metrics shares the TLS cert
            print(f"metrics on {scheme}://{config.host}:{metrics_port}/metrics", flush=True)
        while not done.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        stop_server(server, shard)
    return 0


def add_commands(sub) -> None:
    """Add `serve` to the `engram` parser's subparsers."""
    p = sub.add_parser(
        "serve",
        help="serve one shard (an LMDB data directory) over gRPC",
        description="Serve one shard until SIGTERM/SIGINT. Prints 'serving on "
        "HOST:PORT' once it listens.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="shard data directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--map-size", type=options.size, help="LMDB map size, e.g. 64G (default 64G)")
    p.add_argument("--max-batch-rows", type=int, help="ids per request (default 1048576)")
    p.add_argument(
        "--max-message-bytes", type=options.size, help="gRPC message limit (default 512M)"
    )
    p.add_argument(
        "--memory",
        type=options.size,
        help="RAM for the tables' rows and indexes, e.g. 32G (default 80%% of physical memory)",
    )
    p.add_argument("--workers", type=int, help="gRPC server threads (default 8)")
    p.add_argument(
        "--message-timeout",
        type=float,
        metavar="S",
        help="cancel a call that waits longer than S seconds for its next message (default 30)",
    )
    p.add_argument("--max-concurrent-rpcs", type=int, help="calls admitted at once (default 256)")
    p.add_argument(
        "--max-streams-per-connection", type=int, help="HTTP/2 streams per connection (default 64)"
    )
    p.add_argument(
        "--max-import-bytes",
        type=options.size,
        help="records one ImportRows stream may stage before it is stored (default 1G)",
    )
    p.add_argument("--durable", action="store_true", help="fsync every commit")
    p.add_argument("--read-only", action="store_true", help="serve lookups only")
    options.add_serve_options(p)  # tokens, TLS, --insecure, --metrics-port
    p.set_defaults(func=cmd_serve)
