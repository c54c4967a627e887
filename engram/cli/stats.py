"""`engram stats`: every shard's counters and latencies."""

from __future__ import annotations

import argparse
import json

from engram.cli import options


def cmd_stats(args: argparse.Namespace) -> int:
    with options.shard_client(args) as c:
        print(json.dumps(c.stats(), indent=2))
    return 0


def add_commands(sub) -> None:
    """Add `stats` to the `engram` parser's subparsers."""
    s = sub.add_parser("stats", help="a shard's counters and latencies")
    s.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
    options.add_client_options(s)
    s.set_defaults(func=cmd_stats)
