"""`engram train`: the main job.

With no arguments `engram train` starts a local Ray on 127.0.0.1, a store cluster of 2 shard actors,
trains a small Engram model on the built-in corpus with one trainer for a few minutes, evaluates,
checkpoints under runs/<timestamp>/ and prints a summary. Flags point it at an existing Ray cluster
(--address), existing shards (--store), more trainers or GPUs.

Every flag is checked, and the corpus loaded and checked against --seq-len / --batch-size, before
anything starts (Ray, the store, the run directory). The run's store cluster is its own: named
train-<run>-<id>, so no `engram cluster` command aimed at another cluster can stop it.
`engram runs list | clean` shows and removes old run directories.

`engram train --preset deepseek-v4.1-flash` trains a real model's Engram geometry instead: its
hashing and base tokenizer, its two full-height tables (384 M rows each, created lazily on the
store, or the ones `engram import --preset` put there) in its training format, a small backbone
for 20 steps; the summary says the rows touched, the store's bytes per parameter and step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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
    # The flags a --preset sets differently or fixes default to None here; train_config()
    # fills in TrainConfig's defaults (or the preset's), so it can tell a flag that was given.
    m = p.add_argument_group("model")
    m.add_argument(
        "--preset",
        default="",
        metavar="NAME",
        help="train a real model's Engram geometry (deepseek-v4.1-flash): its hashing, base "
        "tokenizer and full-height tables in its training format, with a small backbone for a "
        "few steps unless told otherwise; fixes the Engram and vocabulary flags",
    )
    m.add_argument("--layers", type=int, default=None, help=f"transformer blocks ({dm.n_layer})")
    m.add_argument("--width", type=int, default=None, help=f"model width ({dm.n_embd})")
    m.add_argument("--heads", type=int, default=None, help=f"attention heads ({dm.n_head})")
    m.add_argument(
        "--engram-layers",
        type=_layers,
        default=None,
        metavar="1[,3]",
        help=f"0-based blocks carrying an Engram ({','.join(map(str, dm.engram_layers))}; "
        "those of them that a smaller --layers keeps)",
    )
    m.add_argument("--no-engram", action="store_true", help="the baseline: no Engram, no store")
    m.add_argument("--max-ngram", type=int, default=None, help="largest n-gram order N")
    m.add_argument("--hash-heads", type=int, default=None, help="hash heads K per order")
    m.add_argument(
        "--memory-width",
        type=int,
        default=None,
        help="memory width per n-gram order (d_head = this / hash heads)",
    )
    m.add_argument(
        "--table-size",
        type=_table_size,
        default=None,
        help="rows per hash head (a prime just above), or auto (the default): a row per 32 "
        "tokens read while the run reads its corpus at most once, a row per 1000 corpus tokens "
        "divided by the passes from 1.5 passes on, geometrically between the two in between "
        '(README "Quality")',
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--corpus",
        default=d.corpus,
        help="builtin (Python's docstrings), a .txt/.jsonl/.parquet file or folder, or synthetic",
    )
    t.add_argument("--vocab-size", type=int, default=None, help=f"({d.vocab_size})")
    t.add_argument("--steps", type=int, default=None, help=f"({d.steps}; --preset: 20)")
    t.add_argument(
        "--minutes",
        type=float,
        default=4.0,
        help="stop early after this many minutes of training (0 = run every step)",
    )
    t.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per trainer ({d.batch_size}; --preset: 4)",
    )
    t.add_argument("--seq-len", type=int, default=None, help=f"({d.seq_len}; --preset: 64)")
    t.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help=f"backbone lr ({d.lr:g}); tables learn at --table-lr-mult x this (server-side Adam)",
    )
    t.add_argument(
        "--table-lr-mult",
        type=_table_lr_mult,
        default=d.table_lr_mult,
        help="table lr / backbone lr, or auto (the default): 100 up to 1.5 M tokens read, "
        "falling geometrically to 25 at 4 M and held there (benchmarks/quality.py's study, "
        'README "Quality"; the paper\'s is 5)',
    )
    t.add_argument(
        "--table-init-std",
        type=float,
        default=d.table_init_std,
        help=f"std of the tables' initial rows ({d.table_init_std:g})",
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
    t.add_argument(
        "--eval-batches", type=int, default=None, help=f"({d.eval_batches}; --preset: 2)"
    )
    t.add_argument("--eval-every", type=int, default=d.eval_every)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--json", action="store_true", help="print the summary as JSON too")
    t.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the trainer's Prometheus /metrics on 127.0.0.1:PORT (+ rank; 0: any free "
        "port, printed)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long --address may take to answer (default 5)",
    )
    p.set_defaults(func=cmd_train)
    _add_runs(subparsers)


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


def _table_size(text: str) -> int:
    """--table-size: "auto" (0: sized from the corpus) or rows per head >= 2."""
    if text.strip().lower() == "auto":
        return 0
    try:
        rows = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give rows per head (an integer >= 2) or auto"
        ) from None
    if rows < 2:
        raise argparse.ArgumentTypeError(f"{rows}: rows per head must be >= 2 (or auto)")
    return rows


def _table_lr_mult(text: str) -> float:
    """--table-lr-mult: "auto" (0: by the tokens the run reads) or a positive number."""
    if text.strip().lower() == "auto":
        return 0.0
    try:
        mult = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number or auto") from None
    if not (mult > 0 and math.isfinite(mult)):
        raise argparse.ArgumentTypeError(f"{text}: the table lr multiplier must be > 0 (or auto)")
    return mult


def _or(value, default):
    """A flag's value, or the default when it was not given (its parser default is None)."""
    return default if value is None else value


#: the flags a --preset fixes: its hashing and its tokenizer's vocabulary
_PRESET_FIXED = (
    ("engram_layers", "--engram-layers"),
    ("max_ngram", "--max-ngram"),
    ("hash_heads", "--hash-heads"),
    ("memory_width", "--memory-width"),
    ("table_size", "--table-size"),
    ("vocab_size", "--vocab-size"),
)


def _base_config(args: argparse.Namespace):
    """The TrainConfig the flags start from: TrainConfig's defaults with the model flags, or
    with --preset the preset's (Preset.train_config: its hashing, a small backbone, few steps).
    A flag that the preset fixes is a ConfigError naming it."""
    from trainer.config import ArchConfig, TrainConfig

    if args.preset:
        from engram_store.engine.errors import ConfigError
        from trainer.presets import get

        given = [flag for name, flag in _PRESET_FIXED if getattr(args, name) is not None]
        given += ["--no-engram"] if args.no_engram else []
        if given:
            raise ConfigError(
                f"--preset {args.preset} fixes the Engram geometry and the tokenizer; "
                f"drop {', '.join(given)}"
            )
        return get(args.preset).train_config(
            n_layer=args.layers or 0, n_head=args.heads or 0, n_embd=args.width or 0
        )
    d, dm = TrainConfig(), ArchConfig()
    n_layer = _or(args.layers, dm.n_layer)
    # the default Engram blocks that the backbone has (--layers 2 keeps block 1 only); blocks
    # given with --engram-layers are checked as given
    default_layers = tuple(x for x in dm.engram_layers if x < n_layer) or (
        max(0, min(1, n_layer - 1)),
    )
    model = ArchConfig(
        n_layer=n_layer,
        n_head=_or(args.heads, dm.n_head),
        n_embd=_or(args.width, dm.n_embd),
        engram_layers=() if args.no_engram else _or(args.engram_layers, default_layers),
        max_ngram=_or(args.max_ngram, dm.max_ngram),
        hash_heads=_or(args.hash_heads, dm.hash_heads),
        n_embed_per_ngram=_or(args.memory_width, dm.n_embed_per_ngram),
        table_base_size=_or(args.table_size, 0),  # 0: auto, sized once the corpus is read
    )
    return dataclasses.replace(d, model=model, vocab_size=_or(args.vocab_size, d.vocab_size))


def train_config(args: argparse.Namespace):
    """The TrainConfig that `engram train` flags describe (store addresses filled in later)."""
    from trainer.config import PrefetchConfig, default_out

    base = _base_config(args)
    prefetch = PrefetchConfig(
        depth=args.prefetch_depth,
        update=args.update,
        max_inflight=args.max_inflight,
        cache_rows=args.cache_rows,
        cache_staleness=args.cache_staleness,
        cache_drop_pushed=not args.cache_keep_pushed,
    )
    return dataclasses.replace(
        base,
        prefetch=prefetch,
        corpus=args.corpus,
        seq_len=_or(args.seq_len, base.seq_len),
        batch_size=_or(args.batch_size, base.batch_size),
        seed=args.seed,
        steps=_or(args.steps, base.steps),
        max_minutes=args.minutes,
        lr=args.lr,
        table_lr_mult=args.table_lr_mult,
        table_init_std=args.table_init_std,
        trainers=args.trainers,
        ray_train=args.ray_train or args.address is not None,
        device=args.device,
        trainer_resource=args.trainer_resource,
        eval_batches=_or(args.eval_batches, base.eval_batches),
        eval_every=args.eval_every,
        out=str(pathlib.Path(args.out or default_out()).resolve()),
        resume=args.resume,
        metrics_port=args.metrics_port,
    )


def _start_ray(args: argparse.Namespace, cfg) -> bool:
    """Connect to Ray (an --address, probed first: a dead one or a missing token fails within
    --timeout) or start a local one on 127.0.0.1; True if started here."""
    import ray

    from cluster.api import attach_ray
    from cluster.runtime import start_local_ray

    if ray.is_initialized():
        return False
    if args.address is not None:  # "auto": the only Ray on this machine, never any one
        _, chosen = attach_ray(args.address, "engram", args.timeout, log_to_driver=True)
        if chosen:
            print(f"[engram] {chosen}", file=sys.stderr, flush=True)
        return False
    need = args.shards + (cfg.trainers if cfg.ray_train or cfg.trainers > 1 else 0) + 1
    start_local_ray(
        num_cpus=need, resources={"engram_store": 1000}, namespace="engram", log_to_driver=True
    )
    return True


def _check_flags(args: argparse.Namespace, cfg) -> None:
    """Every check that needs no Ray, store or run directory: the flags, the device, --store
    addresses, the extras this run needs, a --data root in use. ConfigError names the flag to
    change (DataDirLocked: the --data directory)."""
    from engram_store.engine.errors import ConfigError

    # The store addresses are filled in later; a placeholder stands for them here.
    dataclasses.replace(cfg, store=cfg.store or ("-",)).validate()
    if args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: the store needs at least 1 shard")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout} must be > 0 seconds")
    for address in filter(None, (a.strip() for a in args.store.split(","))):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--store {address!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    if (cfg.model.engram_layers and not args.store) or cfg.ray_train or cfg.trainers > 1:
        options.require("cluster", "cluster")  # a store cluster, or Ray Train: both need Ray
    if args.address is None:  # the trainers run on this machine: its device must exist
        from trainer.loop import resolve_device

        resolve_device(cfg.device)
    if (
        args.data
        and cfg.model.engram_layers
        and not args.store
        and _in_use(pathlib.Path(args.data))
    ):
        from engram_store.engine.errors import DataDirLocked

        raise DataDirLocked(
            f"--data {args.data} is served by a live cluster or run; give this run another --data "
            "directory (or none: <out>/store)"
        )


def _probe_store(args: argparse.Namespace, cfg) -> None:
    """Each --store address answers as a shard within --timeout (ShardUnavailable, a runtime
    error, when one does not), before the run starts anything."""
    from engram_store.engine.errors import ShardUnavailable
    from engram_store.rpc.client import probe_shard
    from engram_store.rpc.config import ClientConfig

    for address in filter(None, (a.strip() for a in args.store.split(","))):
        try:
            is_shard = probe_shard(address, ClientConfig(token=cfg.store_token), args.timeout)
        except ShardUnavailable as e:
            raise ShardUnavailable(f"--store {address}: no shard answers ({e})") from None
        if not is_shard:
            raise ShardUnavailable(f"--store {address} answers, but it is no engram shard")


def _store_cluster_name(out: str) -> str:
    """The run's own store cluster name: train-<run directory>-<random>, never `engram`."""
    import re
    import uuid

    stem = re.sub(r"[^A-Za-z0-9_-]", "-", pathlib.Path(out).name)[:40] or "run"
    return f"train-{stem}-{uuid.uuid4().hex[:6]}"


def cmd_train(args: argparse.Namespace) -> int:
    """Run the main job; see the module docstring."""
    import json

    from engram_store.ops.layout import lock_data_root
    from trainer.checkpoint import check_resume
    from trainer.launch import train
    from trainer.loop import check_corpus, train_worker
    from trainer.preset_data import run_corpus
    from trainer.summary import print_summary
    from trainer.tables import table_specs

    cfg = train_config(args)
    _check_flags(args, cfg)
    if cfg.model.engram_layers:
        _probe_store(args, cfg)
    corpus = run_corpus(cfg)
    check_corpus(cfg, corpus)
    ckpt = check_resume(cfg, corpus)
    if cfg.needs_sizing:
        auto_rows, auto_lr = not cfg.model.table_base_size, not cfg.table_lr_mult
        cfg = cfg.sized(corpus.train_tokens, ckpt["config"] if ckpt is not None else None)
        if auto_rows:
            print(
                f"[engram] tables: {cfg.model.table_base_size:,} rows a hash head (--table-size "
                f"auto: {corpus.train_tokens or cfg.run_tokens:,} training tokens, "
                f"{cfg.run_tokens:,} read)",
                file=sys.stderr,
            )
        if auto_lr:
            print(
                f"[engram] tables: Adam lr {cfg.table_lr:.3g} = {cfg.table_lr_mult:.3g} x --lr "
                f"(--table-lr-mult auto: {cfg.run_tokens:,} tokens read"
                f"{', as the resumed run' if ckpt is not None else ''})",
                file=sys.stderr,
            )
    # Checked: from here on things start. The lock tells `engram runs clean` the run is live.
    print(f"[engram] run directory {cfg.out}", file=sys.stderr)
    run_lock = lock_data_root(cfg.out, {"train": cfg.out})
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
            ccfg = ClusterConfig(
                num_shards=args.shards, data_root=data_root, name=_store_cluster_name(cfg.out)
            )
            # a preset run's tables may be on the data root already (imported, in another row
            # format): the trainer creates or adopts them (trainer.tables.open_tables)
            cluster = EngramCluster.up(ccfg, address=None, tables=[] if cfg.preset else specs)
            print(
                f"[engram] store cluster {ccfg.name}: {args.shards} shards (data {data_root}) "
                f"in Ray namespace {ccfg.namespace} at {cluster.ray_address}",
                file=sys.stderr,
                flush=True,
            )
            shards = cluster.status(interval_s=0, metrics=False).shards
            cfg = dataclasses.replace(
                cfg,
                store=tuple(cluster.shard_map().addresses),
                store_data_root=data_root,
                store_metrics=tuple(s.metrics_address for s in shards if s.metrics_address),
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
        run_lock.release()
    print_summary(summary)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, default=str))
    return 0


# ---- engram runs list | clean ----


def _add_runs(subparsers) -> None:
    """`engram runs list | clean`: the run directories `engram train` leaves (one per run,
    hundreds of MB with the store)."""
    p = subparsers.add_parser("runs", help="list or remove old `engram train` run directories")
    sub = p.add_subparsers(dest="runs_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    ls = sub.add_parser("list", help="run directories, newest first: size, age, state")
    ls.add_argument("--dir", default="runs", help="where the runs are (default runs/)")
    ls.set_defaults(func=cmd_runs_list)
    cl = sub.add_parser(
        "clean",
        help="remove all but the newest --keep run directories (never a run in progress)",
    )
    cl.add_argument("--dir", default="runs", help="where the runs are (default runs/)")
    cl.add_argument("--keep", type=int, default=5, help="newest runs to keep (default 5)")
    cl.add_argument(
        "--older-than",
        type=float,
        default=0.0,
        metavar="DAYS",
        help="remove only runs older than this many days (default: any age)",
    )
    cl.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    cl.set_defaults(func=cmd_runs_clean)


def _is_run(d: pathlib.Path) -> bool:
    """Whether `d` is a run directory of `engram train`: it holds a checkpoint or a summary,
    or its lock names a training run (one that ended before its checkpoint). A cluster's data
    root (cluster.json, shard-<i>/, its lock naming a cluster) is none."""
    import json

    from engram_store.ops.layout import LOCK_FILE

    if (d / "checkpoint.pt").exists() or (d / "summary.json").exists():
        return True
    try:
        holder = json.loads((d / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return False
    return isinstance(holder, dict) and "train" in holder


def _runs(root: str) -> list[pathlib.Path]:
    """Run directories directly under `root`, newest (last modified) first."""
    base = pathlib.Path(root)
    if not base.is_dir():
        return []
    runs = [d for d in base.iterdir() if d.is_dir() and _is_run(d)]
    return sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)


def _size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _in_use(run: pathlib.Path) -> bool:
    """Whether a live `engram train` (or a cluster) holds the lock of the directory or of its
    store/ (engram_store/ops/layout.py's flock); looks without writing anything."""
    import fcntl
    import os

    from engram_store.ops.layout import LOCK_FILE

    for lock in (run / LOCK_FILE, run / "store" / LOCK_FILE):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:  # no lock file: nobody ever held it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # drops the flock if we got it
    return False


def _age_days(run: pathlib.Path) -> float:
    import time

    return (time.time() - run.stat().st_mtime) / 86400


def cmd_runs_list(args: argparse.Namespace) -> int:
    runs = _runs(args.dir)
    if not runs:
        print(f"no run directories under {args.dir}/")
        return 0
    for run in runs:
        state = (
            "in use"
            if _in_use(run)
            else ("checkpoint" if (run / "checkpoint.pt").exists() else "no checkpoint")
        )
        print(f"{run}  {_size(run) / 2**20:9.1f} MB  {_age_days(run):6.1f} days  {state}")
    return 0


def cmd_runs_clean(args: argparse.Namespace) -> int:
    """Remove old run directories: all but the newest --keep, only those older than
    --older-than days, never one in use. Prints each one removed and the space freed."""
    import shutil

    from engram_store.engine.errors import ConfigError

    if args.keep < 0 or args.older_than < 0:
        raise ConfigError("--keep and --older-than must be >= 0")
    freed = removed = 0
    for run in _runs(args.dir)[args.keep :]:
        if args.older_than and _age_days(run) < args.older_than:
            continue
        if _in_use(run):
            print(f"keeping {run}: a run or cluster is using it")
            continue
        size = _size(run)
        print(f"{'would remove' if args.dry_run else 'removing'} {run} ({size / 2**20:.1f} MB)")
        if not args.dry_run:
            shutil.rmtree(run)
        freed += size
        removed += 1
    verb = "would free" if args.dry_run else "freed"
    print(f"{removed} run director{'y' if removed == 1 else 'ies'}, {verb} {freed / 2**20:.1f} MB")
    return 0
