"""`engram snapshot | restore | export | import`: operations over a live store or a snapshot
directory, and a model checkpoint's Engram tables into a store."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from engram.cli.options import add_client_options, client_config, require
from engram.cli.options import store_client as _store_client
from engram_store.engine.config import DTYPES, OPTIMIZERS
from engram_store.engine.errors import ConfigError

# ---- commands ----


def cmd_snapshot(args: argparse.Namespace) -> int:
    from engram_store.ops.snapshot import load_manifest, snapshot

    with _store_client(args) as client:
        path = snapshot(client, args.to, lease_s=args.lease, timeout_s=args.timeout)
    m = load_manifest(os.path.dirname(path))
    print(
        json.dumps(
            {
                "manifest": path,
                "shards": m["num_shards"],
                "steps": m["steps"],
                "writes_paused_s": m["writes_paused_s"],
                "bytes": sum(s["bytes"] for s in m["shards"]),
            },
            indent=2,
        )
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from engram_store.ops.restore import restore

    addresses = [a for a in (args.addresses or "").split(",") if a] or None
    print(
        json.dumps(
            restore(
                args.source,
                args.data_root,
                shards=args.shards,
                addresses=addresses,
                num_slots=args.slots,
            ),
            indent=2,
        )
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from engram_store.ops.export import export_safetensors

    if args.format == "deepseek-v4.1":
        return _export_deepseek(args)
    hash_config = args.hash_config
    if hash_config and hash_config.startswith("@"):
        with open(hash_config[1:]) as f:
            hash_config = f.read()
    tables = [t for t in (args.tables or "").split(",") if t] or None
    if args.source:
        paths = export_safetensors(
            None, args.out, tables, args.dtype, hash_config, snapshot_dir=args.source
        )
    elif args.address:
        with _store_client(args) as client:
            paths = export_safetensors(client, args.out, tables, args.dtype, hash_config)
    else:
        raise ConfigError("give --address HOST:PORT (a live store) or --from SNAPSHOT_DIR")
    print(json.dumps({"files": paths}, indent=2))
    return 0


def _export_deepseek(args: argparse.Namespace) -> int:
    """`engram export --format deepseek-v4.1`: the engram_l<L> tables in the checkpoint's layout."""
    import re

    from engram_store.ops.deepseek import export_checkpoint

    if args.source or not args.address:
        raise ConfigError("--format deepseek-v4.1 exports from a live store: give --address")
    if args.hash_config or args.dtype != "float32":
        raise ConfigError(
            "--format deepseek-v4.1 writes F8_E4M3 rows + F8_E8M0 scales; drop --dtype and "
            "--hash-config"
        )
    with _store_client(args) as client:
        names = [t for t in (args.tables or "").split(",") if t] or [
            t.spec.name for t in client.list_tables()
        ]
        layers = {}
        for name in names:
            m = re.fullmatch(r"engram_l(\d+)", name)
            if m is None:
                if args.tables:
                    raise ConfigError(
                        f"table {name!r} is not named engram_l<layer>: the checkpoint names its "
                        "tensors by layer"
                    )
                continue
            layers[int(m.group(1))] = name
        if not layers:
            raise ConfigError("the store has no engram_l<layer> table to export")
        paths = export_checkpoint(client, args.out, dict(sorted(layers.items())))
    print(json.dumps({"files": paths}, indent=2))
    return 0


def _import_specs(args: argparse.Namespace, client) -> dict:
    """{layer: TableConfig} an import writes: the preset's tables in --dtype, or (without
    --preset) the store's existing engram_l<L> tables of the layers the checkpoint holds."""
    from engram_store.engine.config import OptimizerConfig
    from engram_store.ops.deepseek import checkpoint_layers
    from engram_store.ops.safetensors_io import Checkpoint

    if args.preset:
        require("trainer.presets", "train")
        from trainer.presets import get

        opt = OptimizerConfig(kind=args.optimizer, lr=args.lr) if args.optimizer else None
        return get(args.preset).table_configs(dtype=args.dtype, optimizer=opt)
    if args.dtype or args.optimizer:
        raise ConfigError("--dtype and --optimizer choose the preset's tables; give --preset")
    layers = checkpoint_layers(Checkpoint.open(args.checkpoint))
    if not layers:
        raise ConfigError(
            f"{args.checkpoint} holds no layers.<L>.engram.embed.weight tensor; is it a "
            "DeepSeek-V4.1-class checkpoint?"
        )
    return {layer: client.table_info(f"engram_l{layer}").spec for layer in layers}


class _Progress:
    """Progress lines on stderr, at most one every `every_s` seconds (and the last one)."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s, self.t0, self.last = every_s, time.monotonic(), 0.0

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        print(
            f"engram import: {table} {done:,}/{total:,} rows ({100 * done / total:.1f}%), "
            f"{rate / 1e6:.2f} M rows/s",
            file=sys.stderr,
            flush=True,
        )
        if done == total:
            self.t0 = now


def cmd_import(args: argparse.Namespace) -> int:
    from engram_store.ops.deepseek import import_checkpoint
    from engram_store.rpc.client import StoreClient

    progress = args.progress or (
        f".engram-import-{os.path.basename(os.path.abspath(args.checkpoint))}.json"
    )
    addresses = [a for a in args.address.split(",") if a]
    client = (
        StoreClient(addresses, client_config(args)) if len(addresses) > 1 else _store_client(args)
    )
    with client:
        specs = _import_specs(args, client)
        summary = import_checkpoint(
            client,
            args.checkpoint,
            specs,
            progress,
            restart=args.restart,
            chunk_rows=args.chunk_rows,
            segment_rows=args.segment_rows,
            on_progress=None if args.quiet else _Progress(),
        )
    print(json.dumps({"progress": progress, "tables": summary}, indent=2))
    return 0


def add_commands(sub) -> None:
    """Add snapshot, restore and export to the `engram` parser's subparsers."""
    s = sub.add_parser(
        "snapshot",
        help="consistent copy of every shard, while training runs",
        description="Pause writes on every shard for the time of a compacted "
        "LMDB copy (clients retry), copy, resume; write manifest.json.",
    )
    s.add_argument(
        "--address",
        required=True,
        help="any shard's HOST:PORT (the rest are found), or a Ray address",
    )
    s.add_argument(
        "--to",
        required=True,
        metavar="DIR",
        help="new directory; shards write DIR/shard-<i> (shared storage if remote)",
    )
    s.add_argument(
        "--lease",
        type=float,
        default=60.0,
        help="seconds after which a shard resumes writes on its own (default 60)",
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for half-applied pushes to complete",
    )
    add_client_options(s)
    s.set_defaults(func=cmd_snapshot)

    r = sub.add_parser("restore", help="restore a snapshot into shard data directories (offline)")
    r.add_argument("--from", dest="source", required=True, metavar="DIR", help="snapshot dir")
    r.add_argument(
        "--data-root",
        required=True,
        metavar="DIR",
        help="new or empty directory: DIR/shard-<j> and cluster.json",
    )
    r.add_argument(
        "--shards",
        type=int,
        default=None,
        help="number of shards to restore onto (default: as snapshotted)",
    )
    r.add_argument("--slots", type=int, default=None, help="hash slots of the new layout")
    r.add_argument(
        "--addresses",
        default=None,
        metavar="H:P,H:P",
        help="where the restored shards will be served (for `engram serve`)",
    )
    r.set_defaults(func=cmd_restore)

    e = sub.add_parser("export", help="write tables as safetensors for inference")
    e.add_argument(
        "--format",
        default="safetensors",
        choices=["safetensors", "deepseek-v4.1"],
        help="safetensors: one file per table, rows as float32/float16; deepseek-v4.1: the "
        "engram_l<L> tables as a V4.1 checkpoint's layers.<L>.engram.embed.weight (F8_E4M3) + "
        ".scale (F8_E8M0)",
    )
    e.add_argument("--address", default=None, help="any shard's HOST:PORT, or a Ray address")
    e.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="DIR",
        help="export a snapshot directory instead (offline, one training point)",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument("--tables", default=None, metavar="A,B", help="tables (default: all)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    e.add_argument(
        "--hash-config",
        default=None,
        metavar="JSON",
        help="HashConfig JSON (or @file) to embed in the metadata",
    )
    add_client_options(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser(
        "import",
        help="import a DeepSeek-V4.1-class checkpoint's Engram tables into a store",
        description="Stream each layer's layers.<L>.engram.embed.weight (F8_E4M3) and "
        ".scale (F8_E8M0) into the store's engram_l<L> table, routed to the owning shards in "
        "parallel; resumable (--progress), verified by count and checksum at the end.",
    )
    i.add_argument("--checkpoint", required=True, metavar="DIR", help="safetensors checkpoint")
    i.add_argument(
        "--address",
        required=True,
        metavar="HOST:PORT[,...]",
        help="any shard (the rest are found), the shards, or a Ray address",
    )
    i.add_argument(
        "--preset",
        metavar="NAME",
        help="create the model's tables (deepseek-v4.1-flash; needs engram[train]); without "
        "it, the store's existing engram_l<L> tables are filled",
    )
    i.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="with --preset: float8_e4m3 keeps the rows as shipped (serving, the default); "
        "bfloat16 / float16 / float32 dequantize them (training)",
    )
    i.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="with --preset: the tables' optimizer (default: the preset's for the dtype)",
    )
    i.add_argument("--lr", type=float, default=0.01, help="with --optimizer: its lr")
    i.add_argument(
        "--progress",
        metavar="FILE",
        default=None,
        help="progress record (default ./.engram-import-<checkpoint dir>.json); an "
        "interrupted import run again resumes from it",
    )
    i.add_argument("--restart", action="store_true", help="ignore the progress record")
    i.add_argument("--chunk-rows", type=int, default=1 << 15, help="rows read at a time")
    i.add_argument(
        "--segment-rows", type=int, default=1 << 20, help="rows committed between progress records"
    )
    i.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_client_options(i)
    i.set_defaults(func=cmd_import)
