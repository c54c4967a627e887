"""What several command groups share: value parsers, the auth / TLS / metrics flags of `serve`,
the --token / --tls-root-cert flags of every command that talks to a store, and the client."""

from __future__ import annotations

import argparse
import importlib
import os

from engram_store.engine.errors import ConfigError, ShardUnavailable
from engram_store.rpc.config import AuthConfig, ClientConfig

TOKEN_ENV = "ENGRAM_TOKEN"  # a launcher may hand the client token over this way, not via argv

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def ints(text: str) -> list[int]:
    """A comma-separated list of integers, e.g. `0,5,7`."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def size(text: str) -> int:
    """Bytes: an integer with an optional K/M/G/T suffix (powers of 1024), e.g. 64G."""
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in _UNITS:
            return int(float(t[:-1]) * _UNITS[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1048576 or 64G") from None


def require(module: str, extra: str) -> None:
    """Raise ConfigError naming the extra to install unless `module` (a layer) imports."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"this command needs the {module!r} layer ({e}); install it with "
            f"`pip install 'engram[{extra}]'`"
        ) from None


# ---- serve ----


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """Auth, TLS and metrics flags of `engram serve`."""
    g = p.add_argument_group("security and monitoring")
    g.add_argument(
        "--read-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="token allowed to look up and read stats (repeatable)",
    )
    g.add_argument(
        "--write-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="token allowed to do everything (repeatable)",
    )
    g.add_argument(
        "--tokens-file",
        metavar="PATH",
        help="file of `read TOKEN` / `write TOKEN` lines (keeps tokens out of ps)",
    )
    g.add_argument("--tls-cert", default="", metavar="PEM", help="serve TLS with this cert chain")
    g.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")
    g.add_argument(
        "--insecure", action="store_true", help="allow serving a non-loopback --host without tokens"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (0: any free port)",
    )


def auth_config(args: argparse.Namespace) -> AuthConfig:
    """The AuthConfig that `engram serve` flags describe."""
    from engram_store.rpc.auth import load_tokens_file

    read, write = list(args.read_token), list(args.write_token)
    if args.tokens_file:
        r, w = load_tokens_file(args.tokens_file)
        read += r
        write += w
    return AuthConfig(
        read_tokens=tuple(read),
        write_tokens=tuple(write),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure=args.insecure,
    )


# ---- clients ----


def add_client_options(p: argparse.ArgumentParser) -> None:
    """--token / --tls-root-cert for a command that talks to a store."""
    p.add_argument(
        "--token",
        default=None,
        help=f"bearer token for a store that requires one (default ${TOKEN_ENV})",
    )
    p.add_argument(
        "--tls-root-cert",
        default="",
        metavar="PEM",
        help="CA or self-signed certificate of a TLS store",
    )


def client_config(args: argparse.Namespace, **fields) -> ClientConfig:
    """The ClientConfig of a command's --token / --tls-root-cert (and any other fields)."""
    token = getattr(args, "token", None)
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    return ClientConfig(
        token=token, tls_root_cert=getattr(args, "tls_root_cert", "") or "", **fields
    )


def shard_client(args: argparse.Namespace, **fields):
    """A StoreClient for --address, a shard's HOST:PORT (the rest of the shards are found)."""
    from engram_store.rpc.client import StoreClient

    return StoreClient(args.address, client_config(args, **fields))


def store_client(args: argparse.Namespace):
    """A StoreClient for --address: a shard's HOST:PORT (the rest are found from its map), or
    a Ray address when the cluster layer is installed (its registry knows the shard map). A
    shard address never loads Ray."""
    from engram_store.rpc.client import StoreClient, probe_shard

    config = client_config(args)
    if args.address != "auto" and "://" not in args.address:
        try:
            is_shard = probe_shard(args.address, config)
        except ShardUnavailable:
            raise ShardUnavailable(
                f"nothing answers at {args.address!r}; give a shard's HOST:PORT or a Ray address"
            ) from None
        if is_shard:
            return StoreClient(args.address, config)
    require("cluster", "cluster")  # not a shard: a Ray address needs the cluster layer
    from cluster.api import discover_store

    return discover_store(args.address, config)
