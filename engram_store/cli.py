"""`engram serve | table | query | stats`: the store's subcommands (composed by cluster/cli.py).

Every command builds config dataclasses from its flags and calls service or client functions.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import ops_cli
from .config import DTYPES, INITS, OPTIMIZERS, OptimizerConfig, ShardConfig, TableConfig
from .errors import EngramError, InvalidArgument


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") \
            from None


def _size(text: str) -> int:
    """An integer with an optional K/M/G/T suffix (powers of 1024), e.g. 64G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1048576 or 64G") from None


# ---- serve ----

def shard_config(args: argparse.Namespace) -> ShardConfig:
    """The ShardConfig that `engram serve` flags describe."""
    d = ShardConfig(data_dir=args.data)
    return ShardConfig(
        data_dir=args.data, host=args.host, port=args.port,
        map_size=args.map_size or d.map_size,
        max_batch_rows=args.max_batch_rows or d.max_batch_rows,
        max_message_bytes=args.max_message_bytes or d.max_message_bytes,
        cache_rows=d.cache_rows if args.cache_rows is None else args.cache_rows,
        durable=args.durable, read_only=args.read_only, workers=args.workers or d.workers,
        auth=ops_cli.auth_config(args), metrics_port=args.metrics_port)


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import serve  # grpc is only needed by commands that use it

    def ready(host: str, port: int) -> None:
        print(f"serving on {host}:{port}", flush=True)

    serve(shard_config(args), ready=ready)
    return 0


def _add_serve(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve one shard (an LMDB data directory) over gRPC",
                       description="Serve one shard until SIGTERM/SIGINT. Prints 'serving on "
                                   "HOST:PORT' once it listens.")
    p.add_argument("--data", required=True, metavar="DIR", help="shard data directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--map-size", type=_size, help="LMDB map size, e.g. 64G (default 64G)")
    p.add_argument("--max-batch-rows", type=int, help="ids per request (default 1048576)")
    p.add_argument("--max-message-bytes", type=_size, help="gRPC message limit (default 512M)")
    p.add_argument("--cache-rows", type=int, help="rows mirrored in RAM per table")
    p.add_argument("--workers", type=int, help="gRPC server threads (default 8)")
    p.add_argument("--durable", action="store_true", help="fsync every commit")
    p.add_argument("--read-only", action="store_true", help="serve lookups only")
    ops_cli.add_serve_options(p)  # tokens, TLS, --insecure, --metrics-port
    p.set_defaults(func=cmd_serve)
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """`python -m engram_store.service ARGS`: `engram serve ARGS` without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m engram_store.service")
    sub = parser.add_subparsers(dest="command")
    _add_serve(sub)
    return run(parser, ["serve", *(sys.argv[1:] if argv is None else argv)])


# ---- table ----

def table_spec(args: argparse.Namespace) -> TableConfig:
    """The TableConfig that `engram table create` flags describe (validated)."""
    if bool(args.rows) == bool(args.head_rows):
        raise InvalidArgument("give exactly one of --rows N or --head-rows a,b,c")
    opt = OptimizerConfig(kind=args.optimizer, lr=args.lr, beta1=args.beta1, beta2=args.beta2,
                          eps=args.eps, initial_accumulator_value=args.initial_accumulator,
                          lr_decay=args.lr_decay)
    spec = TableConfig(name=args.name, num_rows=args.rows or 0, dim=args.dim,
                       head_rows=tuple(args.head_rows or ()), dtype=args.dtype, init=args.init,
                       init_std=args.std, seed=args.seed, optimizer=opt)
    spec.validate()
    return spec


def _client(args: argparse.Namespace, **config):
    from .client import StoreClient

    return StoreClient(args.address, ops_cli.client_config(args, **config))


def _info_dict(info) -> dict:
    return {"spec": info.spec.to_dict(), "stored_rows": info.stored_rows,
            "stored_bytes": info.stored_bytes, "step": info.step, "pushes": info.pushes}


def cmd_table(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.table_command == "create":
            out = _info_dict(c.create_table(table_spec(args)))
        elif args.table_command == "list":
            out = [_info_dict(t) for t in c.list_tables()]
        elif args.table_command == "info":
            out = _info_dict(c.table_info(args.name))
        else:
            out = {"name": args.name, "dropped": c.drop_table(args.name)}
    print(json.dumps(out, indent=2))
    return 0


def _add_table(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("table", help="create, list, describe or drop tables")
    tsub = p.add_subparsers(dest="table_command", required=True, metavar="{create,list,info,drop}")
    create = tsub.add_parser("create", help="create a table on every shard (idempotent)")
    lst = tsub.add_parser("list", help="every table with its stored rows")
    info = tsub.add_parser("info", help="one table's spec and stored rows")
    drop = tsub.add_parser("drop", help="drop a table and its rows on every shard")
    for q in (create, lst, info, drop):
        q.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
        ops_cli.add_client_options(q)
        q.set_defaults(func=cmd_table)
    for q in (create, info, drop):
        q.add_argument("--name", required=True, help="table name")
    d, o = TableConfig(name="x"), OptimizerConfig()
    create.add_argument("--rows", type=int, help="number of rows")
    create.add_argument("--head-rows", type=_ints, metavar="A,B,C",
                        help="rows per hash head (the row space is their concatenation)")
    create.add_argument("--dim", type=int, default=d.dim, help=f"row width (default {d.dim})")
    create.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="storage dtype")
    create.add_argument("--init", choices=INITS, default=d.init, help="initial rows")
    create.add_argument("--std", type=float, default=d.init_std, help="init std (normal)")
    create.add_argument("--seed", type=int, default=d.seed, help="init seed")
    create.add_argument("--optimizer", choices=OPTIMIZERS, default=o.kind)
    create.add_argument("--lr", type=float, default=o.lr)
    create.add_argument("--beta1", type=float, default=o.beta1)
    create.add_argument("--beta2", type=float, default=o.beta2)
    create.add_argument("--eps", type=float, default=None, help="adam 1e-8, adagrad 1e-10")
    create.add_argument("--initial-accumulator", type=float, default=o.initial_accumulator_value)
    create.add_argument("--lr-decay", type=float, default=o.lr_decay)
    return p


# ---- query / stats ----

def cmd_query(args: argparse.Namespace) -> int:
    if getattr(args, "text", None):
        from trainer.query import query_text  # the trainer owns text -> hashed rows

        return query_text(args) or 0
    if not args.rows:
        raise InvalidArgument("give --rows 0,5,7 (or --text with the trainer installed)")
    import numpy as np

    with _client(args, wire_dtype=args.dtype) as c:
        rows = c.lookup(args.table, np.asarray(args.rows, dtype=np.int64))
    if args.json:
        print(json.dumps({"table": args.table, "ids": args.rows, "rows": rows.tolist()}))
    else:
        with np.printoptions(precision=6, suppress=True, linewidth=10**6):
            for i, r in zip(args.rows, rows, strict=True):
                print(f"{i}: {r}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(c.stats(), indent=2))
    return 0


def add_commands(sub) -> dict[str, argparse.ArgumentParser]:
    """Add serve, table, query and stats to an argparse subparsers object.

    Returns the parsers by name, so other packages can add options (e.g. to `query`).
    """
    parsers = {"serve": _add_serve(sub), "table": _add_table(sub)}
    q = parsers["query"] = sub.add_parser("query", help="print rows of a table")
    q.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
    q.add_argument("--table", required=True, help="table name")
    q.add_argument("--rows", type=_ints, metavar="0,5,7", help="row ids")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--dtype", choices=DTYPES, default="float32", help="wire dtype of the rows")
    q.add_argument("--text", help="query the rows a text hashes to (needs the trainer package)")
    ops_cli.add_client_options(q)
    q.set_defaults(func=cmd_query)
    s = parsers["stats"] = sub.add_parser("stats", help="a shard's counters and latencies")
    s.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
    ops_cli.add_client_options(s)
    s.set_defaults(func=cmd_stats)
    ops_cli.add_commands(sub)  # snapshot, restore, export
    return parsers


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
