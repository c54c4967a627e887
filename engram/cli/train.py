"""`engram train`: the main job.

With no arguments `engram train` starts a local Ray on 127.0.0.1, a store cluster of 2 shard actors,
trains a small Engram model on the built-in corpus with one trainer for a few minutes, evaluates,
checkpoints under runs/<timestamp>/ and prints a summary. Flags point it at an existing Ray cluster
(--address), existing shards (--store), more trainers or GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from engram.cli import options


def _layers(text: str) -> tuple[int, ...]:
    """0-based block indices, e.g. `1` or `1,3`."""
    return tuple(options.ints(text))


def add_commands(subparsers) -> None:
    """Add `train` to the `engram` parser's subparsers (the flags' defaults: trainer.config,
    which imports no torch). Without the trainer layer, `train` says which extra to install."""
    try:
        from trainer.config import DEVICES, UPDATES, TrainConfig
    except ImportError:  # a store node: no torch / tokenizers
        _add_unavailable(subparsers)
        return
    d = TrainConfig()
    dm, dp = d.model, d.prefetch
    p = subparsers.add_parser(
        "train",
        help="train an Engram model against the store (no flags: a local demo run)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("where")
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to use (head host:port or 'auto'); default: start a local "
        "Ray on 127.0.0.1. With --address trainers run as Ray Train workers",
    )
    g.add_argument(
        "--store",
        default="",
        metavar="HOST:PORT[,...]",
        help="use these running shards instead of starting a store cluster",
    )
    g.add_argument("--shards", type=int, default=2, help="shards of the store cluster to start")
    g.add_argument(
        "--data",
        default="",
        help="store data root (default: <out>/store); reopening one resumes its tables",
    )
    g.add_argument(
        "--trainers",
        type=int,
        default=d.trainers,
        help="data-parallel trainer workers (Ray Train, DDP)",
    )
    g.add_argument("--device", choices=DEVICES, default=d.device)
    g.add_argument(
        "--trainer-resource",
        default=d.trainer_resource,
        metavar="NAME",
        help="custom Ray resource every trainer worker needs (e.g. engram_trainer on "
        "CPU clusters); default none",
    )
    g.add_argument(
        "--ray-train", action="store_true", help="run even a single trainer as a Ray Train worker"
    )
    g.add_argument("--out", default="", help="run directory (default runs/<timestamp>)")
    g.add_argument("--resume", default="", help="checkpoint (or run directory) to continue")
    m = p.add_argument_group("model")
    m.add_argument("--layers", type=int, default=dm.n_layer, help="transformer blocks")
    m.add_argument("--width", type=int, default=dm.n_embd, help="model width")
    m.add_argument("--heads", type=int, default=dm.n_head, help="attention heads")
    m.add_argument(
        "--engram-layers",
        type=_layers,
        default=dm.engram_layers,
        metavar="1[,3]",
        help="0-based blocks carrying an Engram",
    )
    m.add_argument("--no-engram", action="store_true", help="the baseline: no Engram, no store")
    m.add_argument("--max-ngram", type=int, default=dm.max_ngram, help="largest n-gram order N")
    m.add_argument("--hash-heads", type=int, default=dm.hash_heads, help="hash heads K per order")
    m.add_argument(
        "--memory-width",
        type=int,
        default=dm.n_embed_per_ngram,
        help="memory width per n-gram order (d_head = this / hash heads)",
    )
    m.add_argument(
        "--table-size",
        type=int,
        default=dm.table_base_size,
        help="rows per hash head (a prime just above)",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--corpus",
        default=d.corpus,
        help="builtin (Python's docstrings), a .txt/.jsonl/.parquet file or folder, or synthetic",
    )
    t.add_argument("--vocab-size", type=int, default=d.vocab_size)
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument(
        "--minutes",
        type=float,
        default=4.0,
        help="stop early after this many minutes of training (0 = run every step)",
    )
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per trainer")
    t.add_argument("--seq-len", type=int, default=d.seq_len)
    t.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help=f"backbone lr; tables learn at {d.table_lr_mult:g}x (server-side Adam)",
    )
    t.add_argument(
        "--update",
        choices=UPDATES,
        default=dp.update,
        help="sync: exact (pushes acknowledged before rows are reused); async: "
        "bounded staleness depth + max-inflight steps",
    )
    t.add_argument(
        "--prefetch-depth",
        type=int,
        default=dp.depth,
        help="batches whose rows are fetched ahead (0 = on demand)",
    )
    t.add_argument(
        "--max-inflight",
        type=int,
        default=dp.max_inflight,
        help="async: pushes outstanding at once",
    )
    t.add_argument(
        "--cache-rows",
        type=int,
        default=dp.cache_rows,
        help="async: hot-row cache per layer (0 = off)",
    )
    t.add_argument(
        "--cache-staleness",
        type=int,
        default=dp.cache_staleness,
        help="async: steps a cached row may be reused",
    )
    t.add_argument(
        "--cache-keep-pushed",
        action="store_true",
        help="async: keep rows this trainer pushed in the cache until they are stale "
        "(by default a push evicts them)",
    )
    t.add_argument("--eval-batches", type=int, default=d.eval_batches)
    t.add_argument("--eval-every", type=int, default=d.eval_every)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--json", action="store_true", help="print the summary as JSON too")
    p.set_defaults(func=cmd_train)


def _add_unavailable(subparsers) -> None:
    """`train` without the trainer layer: any arguments, one error naming the extra."""
    # prefix_chars="+": no argument parses as a flag, so `engram train --steps 3` reaches the
    # install hint instead of an "unrecognized arguments" error.
    p = subparsers.add_parser(
        "train",
        help="train an Engram model (needs the train extra: pip install 'engram[train]')",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda args: options.require("trainer", "train"))


def train_config(args: argparse.Namespace):
    """The TrainConfig that `engram train` flags describe (store addresses filled in later)."""
    from trainer.config import ArchConfig, PrefetchConfig, TrainConfig, default_out

    model = ArchConfig(
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.width,
        engram_layers=() if args.no_engram else args.engram_layers,
        max_ngram=args.max_ngram,
        hash_heads=args.hash_heads,
        n_embed_per_ngram=args.memory_width,
        table_base_size=args.table_size,
    )
    prefetch = PrefetchConfig(
        depth=args.prefetch_depth,
        update=args.update,
        max_inflight=args.max_inflight,
        cache_rows=args.cache_rows,
        cache_staleness=args.cache_staleness,
        cache_drop_pushed=not args.cache_keep_pushed,
    )
    return TrainConfig(
        model=model,
        prefetch=prefetch,
        corpus=args.corpus,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        steps=args.steps,
        max_minutes=args.minutes,
        lr=args.lr,
        trainers=args.trainers,
        ray_train=args.ray_train or args.address is not None,
        device=args.device,
        trainer_resource=args.trainer_resource,
        eval_batches=args.eval_batches,
        eval_every=args.eval_every,
        out=str(pathlib.Path(args.out or default_out()).resolve()),
        resume=args.resume,
    )


def _start_ray(args: argparse.Namespace, cfg) -> bool:
    """Connect to Ray (an --address) or start a local one on 127.0.0.1; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    if args.address is not None:
        ray.init(address=args.address, namespace="engram", log_to_driver=True)
        return False
    from cluster.runtime import start_local_ray

    need = args.shards + (cfg.trainers if cfg.ray_train or cfg.trainers > 1 else 0) + 1
    start_local_ray(
        num_cpus=need, resources={"engram_store": 1000}, namespace="engram", log_to_driver=True
    )
    return True


def cmd_train(args: argparse.Namespace) -> int:
    """Run the main job; see the module docstring."""
    import json

    from engram_store.engine.errors import ConfigError
    from trainer.corpus import load_corpus
    from trainer.launch import train
    from trainer.loop import train_worker
    from trainer.summary import print_summary
    from trainer.tables import table_specs

    cfg = train_config(args)
    # Fail on bad configs before starting anything (the store check comes once it exists).
    dataclasses.replace(cfg, store=cfg.store or ("-",)).validate()
    if args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: the store needs at least 1 shard")
    if (cfg.model.engram_layers and not args.store) or cfg.ray_train or cfg.trainers > 1:
        options.require("cluster", "cluster")  # a store cluster, or Ray Train: both need Ray
    print(f"[engram] run directory {cfg.out}", file=sys.stderr)
    corpus = load_corpus(cfg)
    cluster = None
    started_ray = False
    try:
        if cfg.model.engram_layers and args.store:
            cfg = dataclasses.replace(cfg, store=tuple(a.strip() for a in args.store.split(",")))
        elif cfg.model.engram_layers:
            from cluster.api import EngramCluster
            from cluster.config import ClusterConfig
            from trainer.hashing import NgramHasher

            started_ray = _start_ray(args, cfg)
            hasher = NgramHasher(
                cfg.model.hash_config(corpus.pad_id), corpus.lookup, corpus.compressed_vocab
            )
            specs = list(table_specs(cfg, hasher).values())
            data_root = args.data or str(pathlib.Path(cfg.out) / "store")
            ccfg = ClusterConfig(num_shards=args.shards, data_root=data_root)
            print(
                f"[engram] starting {args.shards} store shards (data {data_root})", file=sys.stderr
            )
            cluster = EngramCluster.up(ccfg, address=None, tables=specs)
            cfg = dataclasses.replace(
                cfg, store=tuple(cluster.shard_map().addresses), store_data_root=data_root
            )
        elif cfg.ray_train or cfg.trainers > 1:
            started_ray = _start_ray(args, cfg)
        if cfg.trainers > 1 or cfg.ray_train:
            summary = train(cfg)
        else:
            summary = train_worker(cfg, corpus=corpus)
    finally:
        if cluster is not None:
            cluster.down()  # the shards stop; their LMDB data stays under the data root
        if started_ray:
            import ray

            ray.shutdown()
    print_summary(summary)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, default=str))
    return 0
