"""`engram table create | list | info | drop`: tables on every shard of a store."""

from __future__ import annotations

import argparse
import json

from engram.cli import options
from engram_store.engine.config import DTYPES, INITS, OPTIMIZERS, OptimizerConfig, TableConfig
from engram_store.engine.errors import InvalidArgument


def _optimizer(args: argparse.Namespace, kind: str) -> OptimizerConfig:
    return OptimizerConfig(
        kind=kind,
        lr=args.lr,
        beta1=args.beta1,
        beta2=args.beta2,
        eps=args.eps,
        initial_accumulator_value=args.initial_accumulator,
        lr_decay=args.lr_decay,
    )


def preset_specs(args: argparse.Namespace) -> list[TableConfig]:
    """The full-height tables of `--preset` (one per Engram layer), validated.

    --dtype picks the storage format (default the preset's serving format, fp8 e4m3 + e8m0
    scales); --optimizer defaults to the preset's choice for that format."""
    if args.name or args.rows or args.head_rows:
        raise InvalidArgument(
            "--preset fixes the tables' names and rows; drop --name, --rows and --head-rows"
        )
    options.require("trainer.presets", "train")
    from trainer.presets import get

    preset = get(args.preset)
    opt = _optimizer(args, args.optimizer) if args.optimizer else None
    specs = preset.table_configs(
        dtype=args.dtype, optimizer=opt, init=args.init, init_std=args.std, seed=args.seed
    )
    return list(specs.values())


def table_spec(args: argparse.Namespace) -> TableConfig:
    """The TableConfig that `engram table create` flags describe (validated)."""
    if not args.name:
        raise InvalidArgument("give --name NAME (or --preset NAME for a model's tables)")
    if bool(args.rows) == bool(args.head_rows):
        raise InvalidArgument("give exactly one of --rows N or --head-rows a,b,c")
    opt = _optimizer(args, args.optimizer or OptimizerConfig().kind)
    spec = TableConfig(
        name=args.name,
        num_rows=args.rows or 0,
        dim=args.dim,
        head_rows=tuple(args.head_rows or ()),
        dtype=args.dtype or TableConfig(name="x").dtype,
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
        if args.table_command == "create" and args.preset:
            out = [info_dict(c.create_table(spec)) for spec in preset_specs(args)]
        elif args.table_command == "create":
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
    for q in (info, drop):
        q.add_argument("--name", required=True, help="table name")
    create.add_argument("--name", help="table name (not with --preset)")
    create.add_argument(
        "--preset",
        metavar="NAME",
        help="create a model's Engram tables at full height, one per layer "
        "(deepseek-v4.1-flash; needs engram[train])",
    )
    d, o = TableConfig(name="x"), OptimizerConfig()
    create.add_argument("--rows", type=int, help="number of rows")
    create.add_argument(
        "--head-rows",
        type=options.ints,
        metavar="A,B,C",
        help="rows per hash head (the row space is their concatenation)",
    )
    create.add_argument("--dim", type=int, default=d.dim, help=f"row width (default {d.dim})")
    create.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help=f"storage dtype (default {d.dtype}; with --preset its serving format)",
    )
    create.add_argument("--init", choices=INITS, default=d.init, help="initial rows")
    create.add_argument("--std", type=float, default=d.init_std, help="init std (normal)")
    create.add_argument("--seed", type=int, default=d.seed, help="init seed")
    create.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help=f"default {o.kind}; with --preset sgd for serving, rowwise_adagrad for training",
    )
    create.add_argument("--lr", type=float, default=o.lr)
    create.add_argument("--beta1", type=float, default=o.beta1)
    create.add_argument("--beta2", type=float, default=o.beta2)
    create.add_argument("--eps", type=float, default=None, help="adam 1e-8, adagrad 1e-10")
    create.add_argument("--initial-accumulator", type=float, default=o.initial_accumulator_value)
    create.add_argument("--lr-decay", type=float, default=o.lr_decay)
