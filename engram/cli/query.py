"""`engram query`: rows of a table by id (`--rows`, store only), or the rows a text hashes to
(`--text`, which needs the trainer layer for the tokenizer and the run's hashing)."""

from __future__ import annotations

import argparse
import json

from engram.cli import options
from engram_store.engine.config import DTYPES
from engram_store.engine.errors import InvalidArgument


def cmd_query(args: argparse.Namespace) -> int:
    if args.text:
        options.require("trainer", "train")
        from trainer.query import query_text  # the trainer owns text -> hashed rows

        return query_text(args) or 0
    if not args.rows:
        raise InvalidArgument("give --rows 0,5,7 (or --text)")
    if not args.table:
        raise InvalidArgument("--rows needs --table NAME")
    import numpy as np

    with options.shard_client(args, wire_dtype=args.dtype) as c:
        rows = c.lookup(args.table, np.asarray(args.rows, dtype=np.int64))
    if args.json:
        print(json.dumps({"table": args.table, "ids": args.rows, "rows": rows.tolist()}))
    else:
        with np.printoptions(precision=6, suppress=True, linewidth=10**6):
            for i, r in zip(args.rows, rows, strict=True):
                print(f"{i}: {r}")
    return 0


def add_commands(sub) -> None:
    """Add `query` to the `engram` parser's subparsers."""
    q = sub.add_parser("query", help="print rows of a table, or the rows a text hashes to")
    q.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
    q.add_argument("--table", default=None, help="table name (with --rows)")
    q.add_argument("--rows", type=options.ints, metavar="0,5,7", help="row ids")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--dtype", choices=DTYPES, default="float32", help="wire dtype of the rows")
    q.add_argument(
        "--text",
        help="query the rows a text hashes to (needs engram[train]); the "
        "Engram tables are named by the run",
    )
    q.add_argument(
        "--checkpoint",
        default="",
        help="with --text: the run whose hashing to use (default: newest under "
        "runs/, else the `engram train` defaults)",
    )
    options.add_client_options(q)
    q.set_defaults(func=cmd_query)
