"""`engram serve`: one shard (an LMDB data directory) over gRPC, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

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
        cache_rows=d.shard.cache_rows if args.cache_rows is None else args.cache_rows,
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
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from engram_store.rpc.server import serve  # grpc is only needed by commands that use it

    def ready(host: str, port: int) -> None:
        print(f"serving on {host}:{port}", flush=True)

    serve(server_config(args), ready=ready)
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
    p.add_argument("--cache-rows", type=int, help="rows mirrored in RAM per table")
    p.add_argument("--workers", type=int, help="gRPC server threads (default 8)")
    p.add_argument("--durable", action="store_true", help="fsync every commit")
    p.add_argument("--read-only", action="store_true", help="serve lookups only")
    options.add_serve_options(p)  # tokens, TLS, --insecure, --metrics-port
    p.set_defaults(func=cmd_serve)
