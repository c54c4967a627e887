"""`engram stats`: every shard's counters and latencies."""

from __future__ import annotations

import argparse
import json

from engram.cli import options
from engram_store.engine.errors import ShardUnavailable


def cmd_stats(args: argparse.Namespace) -> int:
    from engram_store.rpc.client import probe_shard

    # One call bounded by --timeout first: a dead address fails in about that time, not after
    # the client's retries.
    if not probe_shard(args.address, options.client_config(args), timeout_s=args.timeout):
        raise ShardUnavailable(f"{args.address} answers, but it is no engram shard")
    with options.shard_client(args) as c:
        print(json.dumps(c.stats(), indent=2))
    return 0


def add_commands(sub) -> None:
    """Add `stats` to the `engram` parser's subparsers."""
    s = sub.add_parser("stats", help="a shard's counters and latencies")
    s.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
    s.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long the address may take to answer (default 5)",
    )
    options.add_client_options(s)
    s.set_defaults(func=cmd_stats)
