"""Aggregate lookup throughput of a Ray-hosted store at 1, 2 and 4 shards, and the dip while it
reshards live.

Concurrent client processes (no Ray in them: they find the shards from one shard's address)
look up random batches as fast as they can; each records (time, rows) per batch. Prints a table
and, as its last line, JSON:

    python benchmarks/bench_scale.py [--clients 4] [--seconds 5] [--batch 4096] [--shards 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TABLE = "bench"


def _client(
    address: str, num_rows: int, batch: int, start: float, stop, max_s: float, seed: int, out
) -> None:
    """Look up random batches from wall-clock `start` until `stop` is set (or max_s passed);
    report [(t, rows, latency), ...] on `out`."""
    from engram_store.rpc.client import StoreClient

    rng = np.random.default_rng(seed)
    marks: list[tuple[float, int, float]] = []
    with StoreClient(address) as c:
        c.lookup(TABLE, np.arange(4))  # connect before the clock starts
        while time.time() < start:
            time.sleep(0.001)
        while not stop.is_set() and time.time() < start + max_s:
            t = time.time()
            rows = c.lookup(TABLE, rng.integers(0, num_rows, batch))
            marks.append((time.time(), rows.shape[0], time.time() - t))
    out.put(marks)


def drive(
    address: str, args: argparse.Namespace, seconds: float, during=None
) -> tuple[list[tuple[float, int]], float, float, object]:
    """Run args.clients lookup processes; without `during`, for `seconds`; with it, call during()
    2 s in and stop `seconds` after it returns. Returns all marks, start and end time, and
    during()'s result."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = ctx.Event()
    start = time.time() + 3.0  # spawn + import + connect before the clock starts
    procs = [
        ctx.Process(
            target=_client, args=(address, args.rows, args.batch, start, stop, seconds + 300, i, q)
        )
        for i in range(args.clients)
    ]
    for p in procs:
        p.start()
    result = None
    if during is not None:
        time.sleep(max(0.0, start + 2.0 - time.time()))
        result = during()
        time.sleep(seconds)
    else:
        time.sleep(max(0.0, start + seconds - time.time()))
    end = time.time()
    stop.set()
    marks = []
    for _ in procs:
        marks += q.get(timeout=120)  # (time, rows, batch latency)
    for p in procs:
        p.join(timeout=30)
    return sorted(marks), start, end, result


def rate(marks, t0: float, t1: float) -> float:
    """Rows per second completed in [t0, t1)."""
    return sum(m[1] for m in marks if t0 <= m[0] < t1) / max(t1 - t0, 1e-9)


def slowest(marks, t0: float, t1: float) -> float:
    """The longest single lookup (seconds) that finished in [t0, t1)."""
    return max((m[2] for m in marks if t0 <= m[0] < t1), default=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--stored", type=int, default=200_000, help="rows pushed before measuring")
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--data", default=None, help="data root (default: a temp dir)")
    args = ap.parse_args()

    from cluster.api import EngramCluster
    from cluster.config import ClusterConfig
    from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
    from engram_store.rpc.config import ServerConfig

    counts = [int(x) for x in args.shards.split(",")]
    root = args.data or tempfile.mkdtemp(prefix="bench-scale-")
    spec = TableConfig(
        name=TABLE,
        num_rows=args.rows,
        dim=args.dim,
        optimizer=OptimizerConfig(kind="adam", lr=1e-3),
    )
    config = ClusterConfig(
        num_shards=counts[0],
        data_root=root,
        cpus_per_shard=0.5,
        server=ServerConfig(ShardConfig(data_dir="-"), workers=8),
    )
    cluster = EngramCluster.up(config, tables=[spec])
    try:
        with cluster.client() as c:  # stored rows, so a reshard has rows to move
            rng = np.random.default_rng(0)
            ids = rng.choice(args.rows, size=min(args.stored, args.rows), replace=False)
            for lo in range(0, len(ids), 65536):
                part = ids[lo : lo + 65536]
                c.push(TABLE, part, rng.standard_normal((len(part), args.dim)).astype(np.float32))
        by_shards = {}
        for n in counts:
            cluster.scale(n)
            address = cluster.shard_map().addresses[0]
            marks, start, end, _ = drive(address, args, args.seconds)
            by_shards[n] = rate(marks, start, end)
            print(
                f"{n} shard(s): {by_shards[n]:,.0f} lookup rows/s "
                f"({args.clients} clients, batch {args.batch})",
                flush=True,
            )

        # live reshard 2 -> 4 under the same load, throughput in 0.25 s bins
        cluster.scale(2)
        address = cluster.shard_map().addresses[0]
        times: dict = {}

        def reshard() -> dict:
            times["t0"] = time.time()
            r = cluster.scale(4)
            times["t1"] = time.time()
            return r

        marks, start, end, moved = drive(address, args, 2.0, during=reshard)
        baseline = rate(marks, start, times["t0"])
        bins = [rate(marks, t, t + 0.25) for t in np.arange(times["t0"], times["t1"], 0.25)] or [
            rate(marks, times["t0"], times["t1"])
        ]
        after = rate(marks, times["t1"], end)
        lowest = min(bins)
        stalled = 0.25 * sum(b < 0.1 * baseline for b in bins)  # seconds below 10% of before
        print(
            f"reshard 2->4: {moved['moved_rows']:,} rows in {moved['duration_s']:.2f} s "
            f"({moved['start_s']:.2f} s starting 2 actors, longest freeze "
            f"{moved['longest_freeze_s']:.2f} s); "
            f"{baseline:,.0f} rows/s before, lowest 0.25 s bin {lowest:,.0f}, "
            f"{after:,.0f} after",
            flush=True,
        )
        result = {
            "bench": "scale",
            "cpu_count": os.cpu_count(),
            "clients": args.clients,
            "batch": args.batch,
            "dim": args.dim,
            "rows": args.rows,
            "stored_rows": args.stored,
            "lookup_rows_per_s": {str(k): round(v) for k, v in by_shards.items()},
            "reshard": {
                "from": 2,
                "to": 4,
                "moved_rows": moved["moved_rows"],
                "moved_slots": moved["moved_slots"],
                "duration_s": round(times["t1"] - times["t0"], 3),
                "actor_start_s": moved["start_s"],
                "longest_freeze_s": moved["longest_freeze_s"],
                "rows_per_s_during": round(rate(marks, times["t0"], times["t1"])),
                "rows_per_s_before": round(baseline),
                "rows_per_s_lowest_bin": round(lowest),
                "rows_per_s_after": round(after),
                "seconds_below_10pct": stalled,
                "slowest_lookup_s_before": round(slowest(marks, start, times["t0"]), 3),
                "slowest_lookup_s_during": round(slowest(marks, times["t0"], times["t1"]), 3),
                "dip_pct": round(100 * (1 - lowest / baseline), 1) if baseline else None,
            },
        }
    finally:
        cluster.down()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
