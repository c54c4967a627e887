"""`engram snapshot | restore | export`: operations over a live store or a snapshot directory."""

from __future__ import annotations

import argparse
import json
import os

from engram.cli.options import add_client_options
from engram.cli.options import store_client as _store_client
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

    if args.format != "safetensors":
        raise ConfigError(f"--format {args.format}: only safetensors is supported")
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
    e.add_argument("--format", default="safetensors", choices=["safetensors"])
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
