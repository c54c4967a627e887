"""The `engram` command: one module per command group, composed here.

Importing this package (and building the parser) imports neither torch nor Ray: each command
imports what it needs when it runs, so `engram serve` works on a store node that has only the
base install. Groups whose layer is not installed still appear, and say which extra to install.
"""

from __future__ import annotations

import argparse
import os
import sys

from engram import __version__
from engram.cli import cluster, ops, query, serve, stats, table, train
from engram.cli.options import TOKEN_ENV
from engram_store.engine.errors import ConfigError, EngramError

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


def error_line(e: BaseException, args: argparse.Namespace | None = None) -> str:
    """The one-line message (a listing aside) of a command that failed: what happened, and the
    error class's hint unless the message says it already. A store that refused the call as
    unauthenticated is told apart by whether this command sent a token at all."""
    from engram_store.engine.errors import Unauthenticated

    text = str(e)
    # A plain ConfigError's hint only says "change the flags the message names": left out.
    hint = "" if type(e) is ConfigError else getattr(e, "hint", "")
    if isinstance(e, Unauthenticated) and args is not None and hasattr(args, "token"):
        sent = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
        hint = (
            f"the store refused the token this command sent (--token or ${TOKEN_ENV}); give one "
            "of its tokens (`read` or `write` in its --tokens-file)"
            if sent
            else f"the store requires a token and none was sent: pass --token or set ${TOKEN_ENV}"
        )
    if hint and hint.lower() not in text.lower():
        # after a listing, the hint gets a line of its own
        text = f"{text}\nhint: {hint}" if "\n" in text else f"{text} (hint: {hint})"
    return text


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run a command. Exit status 2: a usage error (argparse, or ConfigError: flags
    that do not fit together); 1: a runtime error (nothing answers, a refused token, a busy
    port, a locked directory, ...); both print one error line to stderr, no traceback."""
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"{parser.prog}: error: {error_line(e, args)}", file=sys.stderr)
        return 2
    except (EngramError, OSError) as e:  # OSError: a port or directory the OS refused
        print(f"{parser.prog}: error: {error_line(e, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `engram` console script and of `python -m engram`."""
    return run(build_parser(), argv)
