"""The `engram` command: composes the store's, the trainer's and the cluster's subcommands.

Importing this module imports neither ray nor torch; each package's commands import what they
need when they run, and packages that are not installed simply contribute no commands.
"""

from __future__ import annotations

import argparse
import importlib


def _optional(module: str):
    """`module` if it can be imported, else None (only when that module itself is missing)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    """The `engram` argument parser with every available package's subcommands."""
    from engram_store import cli as store_cli

    parser = argparse.ArgumentParser(
        prog="engram", description="Engram conditional memory: store, trainer and cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    store_cli.add_commands(sub)  # others reach e.g. the query parser as sub.choices["query"]
    for name in ("trainer.cli", "cluster.commands"):
        mod = _optional(name)
        if mod is not None:
            mod.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `engram` console script."""
    from engram_store.cli import run

    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
