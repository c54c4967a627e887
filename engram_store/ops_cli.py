"""`engram snapshot | restore | export`, and the auth / TLS / metrics flags of `serve` and of the
commands that talk to a store (composed into the `engram` parser by engram_store/cli.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import os

from .config import AuthConfig, ClientConfig
from .errors import ConfigError

TOKEN_ENV = "ENGRAM_TOKEN"  # a launcher may hand the client token over this way, not via argv


# ---- serve ----

def add_serve_options(p: argparse.ArgumentParser) -> None:
    """Auth, TLS and metrics flags of `engram serve`."""
    g = p.add_argument_group("security and monitoring")
    g.add_argument("--read-token", action="append", default=[], metavar="TOKEN",
                   help="token allowed to look up and read stats (repeatable)")
    g.add_argument("--write-token", action="append", default=[], metavar="TOKEN",
                   help="token allowed to do everything (repeatable)")
    g.add_argument("--tokens-file", metavar="PATH",
                   help="file of `read TOKEN` / `write TOKEN` lines (keeps tokens out of ps)")
    g.add_argument("--tls-cert", default="", metavar="PEM", help="serve TLS with this cert chain")
    g.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--insecure", action="store_true",
                   help="allow serving a non-loopback --host without tokens")
    g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on this port (0: any free port)")


def auth_config(args: argparse.Namespace) -> AuthConfig:
    """The AuthConfig that `engram serve` flags describe."""
    from .auth import load_tokens_file

    read, write = list(args.read_token), list(args.write_token)
    if args.tokens_file:
        r, w = load_tokens_file(args.tokens_file)
        read += r
        write += w
    return AuthConfig(read_tokens=tuple(read), write_tokens=tuple(write),
                      tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure)


# ---- clients ----

def add_client_options(p: argparse.ArgumentParser) -> None:
    """--token / --tls-root-cert for a command that talks to a store."""
    p.add_argument("--token", default=None,
                   help=f"bearer token for a store that requires one (default ${TOKEN_ENV})")
    p.add_argument("--tls-root-cert", default="", metavar="PEM",
                   help="CA or self-signed certificate of a TLS store")


def client_config(args: argparse.Namespace, **fields) -> ClientConfig:
    """The ClientConfig of a command's --token / --tls-root-cert (and any other fields)."""
    token = getattr(args, "token", None)
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    return ClientConfig(token=token, tls_root_cert=getattr(args, "tls_root_cert", "") or "",
                        **fields)


def _store_client(args: argparse.Namespace):
    """A StoreClient for --address: a shard's host:port, or a Ray address when the cluster
    package is installed (its registry knows the shard map)."""
    from .client import StoreClient

    config = client_config(args)
    try:
        cluster_api = importlib.import_module("cluster.api")
    except ModuleNotFoundError:
        return StoreClient(args.address, config)
    return cluster_api.discover_store(args.address, config)


# ---- commands ----

def cmd_snapshot(args: argparse.Namespace) -> int:
    from .snapshot import load_manifest, snapshot

    with _store_client(args) as client:
        path = snapshot(client, args.to, lease_s=args.lease, timeout_s=args.timeout)
    m = load_manifest(os.path.dirname(path))
    print(json.dumps({"manifest": path, "shards": m["num_shards"], "steps": m["steps"],
                      "writes_paused_s": m["writes_paused_s"],
                      "bytes": sum(s["bytes"] for s in m["shards"])}, indent=2))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .snapshot import restore

    addresses = [a for a in (args.addresses or "").split(",") if a] or None
    print(json.dumps(restore(args.source, args.data_root, shards=args.shards,
                             addresses=addresses, num_slots=args.slots), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_safetensors

    if args.format != "safetensors":
        raise ConfigError(f"--format {args.format}: only safetensors is supported")
    hash_config = args.hash_config
    if hash_config and hash_config.startswith("@"):
        with open(hash_config[1:]) as f:
            hash_config = f.read()
    tables = [t for t in (args.tables or "").split(",") if t] or None
    if args.source:
        paths = export_safetensors(None, args.out, tables, args.dtype, hash_config,
                                   snapshot_dir=args.source)
    elif args.address:
        with _store_client(args) as client:
            paths = export_safetensors(client, args.out, tables, args.dtype, hash_config)
    else:
        raise ConfigError("give --address HOST:PORT (a live store) or --from SNAPSHOT_DIR")
    print(json.dumps({"files": paths}, indent=2))
    return 0


def add_commands(sub) -> None:
    """Add snapshot, restore and export to an argparse subparsers object."""
    s = sub.add_parser("snapshot", help="consistent copy of every shard, while training runs",
                       description="Pause writes on every shard for the time of a compacted "
                                   "LMDB copy (clients retry), copy, resume; write manifest.json.")
    s.add_argument("--address", required=True,
                   help="any shard's HOST:PORT (the rest are found), or a Ray address")
    s.add_argument("--to", required=True, metavar="DIR",
                   help="new directory; shards write DIR/shard-<i> (shared storage if remote)")
    s.add_argument("--lease", type=float, default=60.0,
                   help="seconds after which a shard resumes writes on its own (default 60)")
    s.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for half-applied pushes to complete")
    add_client_options(s)
    s.set_defaults(func=cmd_snapshot)

    r = sub.add_parser("restore", help="restore a snapshot into shard data directories (offline)")
    r.add_argument("--from", dest="source", required=True, metavar="DIR", help="snapshot dir")
    r.add_argument("--data-root", required=True, metavar="DIR",
                   help="new or empty directory: DIR/shard-<j> and cluster.json")
    r.add_argument("--shards", type=int, default=None,
                   help="number of shards to restore onto (default: as snapshotted)")
    r.add_argument("--slots", type=int, default=None, help="hash slots of the new layout")
    r.add_argument("--addresses", default=None, metavar="H:P,H:P",
                   help="where the restored shards will be served (for `engram serve`)")
    r.set_defaults(func=cmd_restore)

    e = sub.add_parser("export", help="write tables as safetensors for inference")
    e.add_argument("--format", default="safetensors", choices=["safetensors"])
    e.add_argument("--address", default=None, help="any shard's HOST:PORT, or a Ray address")
    e.add_argument("--from", dest="source", default=None, metavar="DIR",
                   help="export a snapshot directory instead (offline, one training point)")
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument("--tables", default=None, metavar="A,B", help="tables (default: all)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    e.add_argument("--hash-config", default=None, metavar="JSON",
                   help="HashConfig JSON (or @file) to embed in the metadata")
    add_client_options(e)
    e.set_defaults(func=cmd_export)
