"""The `engram` command: one module per command group, composed here.

Importing this package (and building the parser) imports neither torch nor Ray: each command
imports what it needs when it runs, so `engram serve` works on a store node that has only the
base install. Groups whose layer is not installed still appear, and say which extra to install.
"""

from __future__ import annotations

import argparse
import sys

from engram import __version__
from engram.cli import cluster, ops, query, serve, stats, table, train
from engram_store.engine.errors import EngramError

#: every command group, in the order `engram --help` lists them
GROUPS = (serve, table, query, stats, ops, cluster, train)


def build_parser() -> argparse.ArgumentParser:
    """The `engram` argument parser with every command group."""
    parser = argparse.ArgumentParser(
        prog="engram", description="Engram conditional memory: store, cluster and trainer."
    )
    parser.add_argument("--version", action="version", version=f"engram {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run a command; project errors print one line to stderr and exit 2."""
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (EngramError, OSError) as e:  # OSError: a port or directory the OS refused
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `engram` console script and of `python -m engram`."""
    return run(build_parser(), argv)
