"""Push throughput of one shard server: Adam updates of distinct rows, acknowledged (committed).

    python benchmarks/bench_push.py [--rows 65536] [--dim 64] [--iters 20] [--quick]

Starts `engram serve` in a subprocess on 127.0.0.1, creates an Adam table, warms it, then times
pushes of `--rows` distinct random rows of `--dim` float32 gradients through StoreClient. Each push
returns only after the shard committed its LMDB transaction. Reported: one push at a time
(`rows_per_s`, target >= 1e6) and two in flight (`rows_per_s_pipelined`, push_async), next to
the server's own p50 handler time and the same pushes on a Shard in this process (no gRPC). The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from _procs import shard_server

from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.engine.shard import Shard
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig

TARGET = 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536, help="distinct rows per push")
    ap.add_argument("--dim", type=int, default=64, help="row width (float32)")
    ap.add_argument("--iters", type=int, default=20, help="timed pushes")
    ap.add_argument("--table-rows", type=int, default=1 << 20, help="rows in the table")
    ap.add_argument("--quick", action="store_true", help="a smoke run: small table, 3 iterations")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.table_rows = 3, max(args.rows, 1 << 17)
    rng = np.random.default_rng(0)
    batches = [rng.choice(args.table_rows, args.rows, replace=False) for _ in range(args.iters + 1)]
    grads = rng.standard_normal((args.rows, args.dim)).astype(np.float32) * 1e-2
    spec = TableConfig(
        name="bench",
        num_rows=args.table_rows,
        dim=args.dim,
        optimizer=OptimizerConfig(kind="adam", lr=1e-3),
    )

    with shard_server() as address, StoreClient(address, ClientConfig()) as client:
        client.create_table(spec)
        for lo in range(0, args.table_rows, args.rows):  # warm: every row stored once
            ids = np.arange(lo, min(lo + args.rows, args.table_rows))
            client.push("bench", ids, np.zeros((len(ids), args.dim), np.float32))
        step0 = client.table_info("bench").step

        times = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            res = client.push("bench", batches[i], grads)
            times.append(time.perf_counter() - t0)
            assert res.rows_updated == args.rows and not res.duplicate
        push_s = float(np.median(times))

        t0 = time.perf_counter()
        inflight = []
        for i in range(args.iters):
            if len(inflight) == 2:
                inflight.pop(0).result()
            inflight.append(client.push_async("bench", batches[i], grads))
        for f in inflight:
            f.result()
        pipelined_s = (time.perf_counter() - t0) / args.iters
        info = client.table_info("bench")
        assert info.step == step0 + 2 * args.iters, (info.step, step0)
        server = {m["method"]: m for m in client.stats()[0]["methods"]}["PushGradients"]

    # the same pushes on a Shard in this process: what the gRPC layer adds is the difference
    with (
        tempfile.TemporaryDirectory(prefix="engram-bench-") as data,
        Shard(ShardConfig(data_dir=data)) as shard,
    ):
        shard.create_table(spec)
        for lo in range(0, args.table_rows, args.rows):
            ids = np.arange(lo, min(lo + args.rows, args.table_rows))
            shard.push("bench", ids, np.zeros((len(ids), args.dim), np.float32))
        times = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            shard.push("bench", batches[i], grads)
            times.append(time.perf_counter() - t0)
        local_s = float(np.median(times))

    mb = args.rows * args.dim * 4 / 1e6
    result = {
        "benchmark": "push",
        "optimizer": "adam",
        "rows": args.rows,
        "dim": args.dim,
        "iters": args.iters,
        "table_rows": args.table_rows,
        "push_ms": push_s * 1e3,
        "rows_per_s": args.rows / push_s,
        "grad_mb_per_s": mb / push_s,
        "pipelined_push_ms": pipelined_s * 1e3,
        "rows_per_s_pipelined": args.rows / pipelined_s,
        "server_push_p50_ms": server["p50_ms"],
        "inprocess_shard_push_ms": local_s * 1e3,
        "inprocess_rows_per_s": args.rows / local_s,
        "target_rows_per_s": TARGET,
        "meets_target": args.rows / push_s >= TARGET,
        "stored_rows": info.stored_rows,
        "stored_bytes": info.stored_bytes,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
