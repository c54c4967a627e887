"""`engram cluster up | status | scale | down`: the cluster's subcommands (composed by cli.py).

`up` without --address starts a Ray on this machine (listening on 127.0.0.1 only) and blocks,
serving, until Ctrl-C or a `down` from elsewhere (then the shards stop; their data stays in
--data). With --address it joins a running Ray cluster (`ray start --head`), starts the shards
there and returns: the cluster lives on in Ray, and `status`, `scale` and `down` reach it with the
same --address. Without --address those three use the Ray of this machine only when exactly one
runs (they say which), and refuse, listing them, when several do; they act on the cluster --name
only (default `engram`; every `engram train` run names its own store cluster `train-...`).

Building the parser imports nothing of the cluster layer (nor Ray): each command imports it when
it runs, and says which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from engram.cli import options


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray address (the head's host:port). Without it `up` starts a local Ray and blocks "
        "until Ctrl-C; status/scale/down use the Ray of this machine if only one runs ('auto': "
        "the same)",
    )
    p.add_argument("--name", default="engram", help="cluster name (registry actor name)")
    p.add_argument("--namespace", default="engram", help="Ray namespace")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long the Ray address may take to answer (default 5)",
    )


def add_commands(subparsers) -> None:
    """Add `cluster` with its subcommands to the `engram` parser's subparsers."""
    cluster = subparsers.add_parser("cluster", help="run the store as shard actors on Ray")
    sub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    cluster.set_defaults(func=lambda args: (cluster.print_help(), 2)[1])

    up = sub.add_parser("up", help="start (or reopen) a cluster of shards")
    _common(up)
    up.add_argument("--shards", type=int, required=True, help="number of shards")
    up.add_argument(
        "--data",
        default="data/cluster",
        help="data root: shard-<i>/ LMDB dirs and cluster.json (on every store node)",
    )
    up.add_argument("--slots", type=int, default=None, help="hash slots (fixed per layout)")
    up.add_argument("--cpus-per-shard", type=float, default=1.0)
    up.add_argument(
        "--memory-per-shard",
        type=options.size,
        default=0,
        help="memory reserved in Ray per shard, e.g. 64G (0: none)",
    )
    up.add_argument(
        "--shared-storage",
        action="store_true",
        help="--data is one shared filesystem: shards may move between store nodes",
    )
    up.add_argument(
        "--store-resource",
        default="engram_store",
        help="custom Ray resource that marks store nodes",
    )
    up.add_argument(
        "--host",
        default="",
        help="address shards listen on: '' auto (127.0.0.1 on one machine), "
        "'node' (the node's IP), or an explicit address",
    )
    up.add_argument(
        "--shard-memory",
        type=options.size,
        default=None,
        help="RAM each shard may use for its tables' rows and indexes, e.g. 32G (default 80%% "
        "of the node's memory)",
    )
    up.add_argument(
        "--tokens-file",
        default=None,
        help="file of `read TOKEN` / `write TOKEN` lines: shards require a token, and "
        "the cluster's own client uses the first write token",
    )
    up.add_argument(
        "--insecure",
        action="store_true",
        help="let shards listen on a node IP without tokens (trusted networks only)",
    )
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="shards, nodes, addresses, rows, bytes, requests/s")
    _common(st)
    st.add_argument("--interval", type=float, default=1.0, help="seconds to measure requests/s")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    sc = sub.add_parser("scale", help="reshard live to another number of shards")
    _common(sc)
    sc.add_argument("--shards", type=int, required=True)
    sc.set_defaults(func=cmd_scale)

    dn = sub.add_parser("down", help="stop the shards and the registry (data stays)")
    _common(dn)
    dn.set_defaults(func=cmd_down)


def _require_cluster() -> None:
    """ConfigError naming `pip install 'engram[cluster]'` unless the cluster layer (Ray)
    imports."""
    options.require("cluster", "cluster")


def cluster_config(args: argparse.Namespace):
    """The ClusterConfig that `engram cluster up` flags describe."""
    import dataclasses

    _require_cluster()
    from cluster.config import ClusterConfig
    from engram_store.engine.errors import ConfigError
    from engram_store.rpc.config import AuthConfig

    d = ClusterConfig()
    server, client = d.server, d.client
    if args.shard_memory is not None:
        shard = dataclasses.replace(server.shard, memory_bytes=args.shard_memory)
        server = dataclasses.replace(server, shard=shard)
    if args.tokens_file or args.insecure:
        read, write = (), ()
        if args.tokens_file:
            from engram_store.rpc.auth import load_tokens_file

            read, write = load_tokens_file(args.tokens_file)
            if not write:
                raise ConfigError(
                    f"{args.tokens_file} holds no write token; the cluster needs "
                    "one to move rows and set shard state"
                )
            client = dataclasses.replace(client, token=write[0])
        server = dataclasses.replace(
            server, auth=AuthConfig(read_tokens=read, write_tokens=write, insecure=args.insecure)
        )
    return ClusterConfig(
        num_shards=args.shards,
        data_root=os.path.abspath(args.data),
        store_resource=args.store_resource,
        cpus_per_shard=args.cpus_per_shard,
        memory_per_shard=args.memory_per_shard,
        shared_storage=args.shared_storage,
        num_slots=args.slots or d.num_slots,
        namespace=args.namespace,
        name=args.name,
        host=args.host,
        server=server,
        client=client,
    )


def cmd_up(args: argparse.Namespace) -> int:
    _require_cluster()
    from cluster.api import EngramCluster

    cluster = EngramCluster.up(cluster_config(args), address=args.address, timeout_s=args.timeout)
    print(cluster.status(interval_s=0).format(), flush=True)
    if args.address is not None:
        print(f"up; reach it with --address {cluster.ray_address}", flush=True)
        cluster.close()
        return 0
    # A Ray started by this process ends with it, so serve until told to stop.
    # A Ray that ray.init() starts requires its token (~/.ray/auth_token); Ray sends it to an
    # explicit --address only when RAY_AUTH_MODE=token says so.
    print(
        f"serving until Ctrl-C; from another shell: RAY_AUTH_MODE=token engram cluster status "
        f"--address {cluster.ray_address} --name {args.name}",
        flush=True,
    )
    done = threading.Event()
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(2.0):
            if not cluster.alive():
                print(
                    f"cluster {args.name!r} was stopped from elsewhere (`engram cluster down`); "
                    f"exiting (data stays in {args.data})",
                    flush=True,
                )
                cluster.close()
                return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    print(f"stopping shards (data stays in {args.data})", flush=True)
    cluster.down()
    return 0


def _connect(args: argparse.Namespace):
    """The cluster --name on the Ray that --address (or the only local Ray) names; says on
    stderr which local Ray it picked."""
    _require_cluster()
    from cluster.api import EngramCluster

    cluster = EngramCluster.connect(
        args.address, name=args.name, namespace=args.namespace, timeout_s=args.timeout
    )
    if cluster.chosen:
        print(f"engram: {cluster.chosen}", file=sys.stderr, flush=True)
    return cluster


def cmd_status(args: argparse.Namespace) -> int:
    status = _connect(args).status(interval_s=args.interval)
    print(json.dumps(status.to_dict(), indent=1) if args.json else status.format())
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from engram_store.engine.errors import ConfigError

    if args.shards < 1:  # say so before connecting anywhere
        raise ConfigError(
            f"cannot scale to {args.shards} shards; a cluster keeps at least 1 "
            "(use `engram cluster down` to stop it)"
        )
    print(json.dumps(_connect(args).scale(args.shards)))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the one cluster --name names, saying which (name, shards, data root, Ray) first."""
    cluster = _connect(args)
    what = cluster.describe()
    print(f"stopping {what}", flush=True)
    cluster.down()
    print(f"down: {what}; its data stays in {cluster.config.data_root}", flush=True)
    return 0
