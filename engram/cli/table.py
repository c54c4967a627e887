"""`engram table create | list | info | drop`: tables on every shard of a store."""

from __future__ import annotations

import argparse
import json

from engram.cli import options
from engram_store.engine.config import DTYPES, INITS, OPTIMIZERS, OptimizerConfig, TableConfig
from engram_store.engine.errors import InvalidArgument


def table_spec(args: argparse.Namespace) -> TableConfig:
    """The TableConfig that `engram table create` flags describe (validated)."""
    if bool(args.rows) == bool(args.head_rows):
        raise InvalidArgument("give exactly one of --rows N or --head-rows a,b,c")
    opt = OptimizerConfig(
        kind=args.optimizer,
        lr=args.lr,
        beta1=args.beta1,
        beta2=args.beta2,
        eps=args.eps,
        initial_accumulator_value=args.initial_accumulator,
        lr_decay=args.lr_decay,
    )
    spec = TableConfig(
        name=args.name,
        num_rows=args.rows or 0,
        dim=args.dim,
        head_rows=tuple(args.head_rows or ()),
        dtype=args.dtype,
        init=args.init,
        init_std=args.std,
        seed=args.seed,
        optimizer=opt,
    )
    spec.validate()
    return spec


def info_dict(info) -> dict:
    """A TableInfo as the JSON `engram table` prints."""
    return {
        "spec": info.spec.to_dict(),
        "stored_rows": info.stored_rows,
        "stored_bytes": info.stored_bytes,
        "step": info.step,
        "pushes": info.pushes,
    }


def cmd_table(args: argparse.Namespace) -> int:
    with options.shard_client(args) as c:
        if args.table_command == "create":
            out = info_dict(c.create_table(table_spec(args)))
        elif args.table_command == "list":
            out = [info_dict(t) for t in c.list_tables()]
        elif args.table_command == "info":
            out = info_dict(c.table_info(args.name))
        else:
            out = {"name": args.name, "dropped": c.drop_table(args.name)}
    print(json.dumps(out, indent=2))
    return 0


def add_commands(sub) -> None:
    """Add `table` with its subcommands to the `engram` parser's subparsers."""
    p = sub.add_parser("table", help="create, list, describe or drop tables")
    tsub = p.add_subparsers(dest="table_command", required=True, metavar="{create,list,info,drop}")
    create = tsub.add_parser("create", help="create a table on every shard (idempotent)")
    lst = tsub.add_parser("list", help="every table with its stored rows")
    info = tsub.add_parser("info", help="one table's spec and stored rows")
    drop = tsub.add_parser("drop", help="drop a table and its rows on every shard")
    for q in (create, lst, info, drop):
        q.add_argument("--address", required=True, metavar="HOST:PORT", help="any shard")
        options.add_client_options(q)
        q.set_defaults(func=cmd_table)
    for q in (create, info, drop):
        q.add_argument("--name", required=True, help="table name")
    d, o = TableConfig(name="x"), OptimizerConfig()
    create.add_argument("--rows", type=int, help="number of rows")
    create.add_argument(
        "--head-rows",
        type=options.ints,
        metavar="A,B,C",
        help="rows per hash head (the row space is their concatenation)",
    )
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
