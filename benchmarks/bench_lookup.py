"""Lookup throughput of one shard server through StoreClient, against raw gRPC and numpy.

    python benchmarks/bench_lookup.py [--rows 65536] [--dim 64] [--iters 20] [--quick]

Starts `engram serve` and benchmarks/raw_server.py in subprocesses on 127.0.0.1, creates a table,
warms it (every row in the shard's RAM mirror), then times a lookup of `--rows` distinct random
rows of `--dim` float32 per iteration; the raw baseline moves the same bytes each way through a
generic gRPC method with no protobuf; the local baseline is a numpy gather. The last line printed
is one JSON object; `ratio_lookup_vs_raw_grpc` (raw time / lookup time, target >= 0.6) is the
figure of merit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import time

import grpc
import numpy as np
from _procs import raw_server, shard_server

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig

TARGET = 0.6


def _median_s(fns: list, iters: int) -> list[float]:
    """Median seconds of each fn(i); the fns alternate, so both see the same machine load."""
    times = [[] for _ in fns]
    for i in range(iters):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn(i)
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536, help="distinct rows per lookup")
    ap.add_argument("--dim", type=int, default=64, help="row width (float32)")
    ap.add_argument("--iters", type=int, default=20, help="timed lookups per method")
    ap.add_argument("--table-rows", type=int, default=1 << 20, help="rows in the table")
    ap.add_argument("--quick", action="store_true", help="a smoke run: small table, 3 iterations")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.table_rows = 3, max(args.rows, 1 << 17)
    rng = np.random.default_rng(0)
    batches = [rng.choice(args.table_rows, args.rows, replace=False) for _ in range(args.iters)]
    nbytes = args.rows * args.dim * 4
    spec = TableConfig(
        name="bench",
        num_rows=args.table_rows,
        dim=args.dim,
        optimizer=OptimizerConfig(kind="adam", lr=1e-3),
    )

    with (
        shard_server() as address,
        raw_server() as raw_address,
        StoreClient(address, ClientConfig()) as client,
    ):
        client.create_table(spec)
        for lo in range(0, args.table_rows, args.rows):  # warm: every row mirrored in RAM
            client.lookup("bench", np.arange(lo, min(lo + args.rows, args.table_rows)))
        local = client.lookup("bench", np.arange(args.table_rows))  # the same table, locally
        check = np.array_equal(client.lookup("bench", batches[-1]), local[batches[-1]])

        opts = [
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.max_receive_message_length", 1 << 30),
        ]
        with grpc.insecure_channel(raw_address, options=opts) as ch:
            fetch = ch.unary_unary("/bench.Raw/Fetch")
            reqs = [struct.pack("<q", nbytes) + b.astype("<i8").tobytes() for b in batches]
            assert len(fetch(reqs[0], timeout=60)) == nbytes
            for b, r in zip(batches[:2], reqs[:2], strict=True):  # untimed: first-touch faults
                client.lookup("bench", b)
                fetch(r, timeout=60)
            store_s, raw_s, numpy_s = _median_s(
                [
                    lambda i: client.lookup("bench", batches[i]),
                    lambda i: fetch(reqs[i], timeout=60),
                    lambda i: local[batches[i]],
                ],
                args.iters,
            )
        server = {m["method"]: m for m in client.stats()[0]["methods"]}["Lookup"]

    gb = nbytes / 1e9
    result = {
        "benchmark": "lookup",
        "rows": args.rows,
        "dim": args.dim,
        "iters": args.iters,
        "table_rows": args.table_rows,
        "bytes_per_lookup": nbytes,
        "store_lookup_ms": store_s * 1e3,
        "store_rows_per_s": args.rows / store_s,
        "store_gb_per_s": gb / store_s,
        "server_lookup_p50_ms": server["p50_ms"],
        "raw_grpc_ms": raw_s * 1e3,
        "raw_grpc_gb_per_s": gb / raw_s,
        "numpy_gather_ms": numpy_s * 1e3,
        "numpy_gather_gb_per_s": gb / numpy_s,
        "ratio_lookup_vs_raw_grpc": raw_s / store_s,
        "target_ratio": TARGET,
        "meets_target": raw_s / store_s >= TARGET,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rows_match_local_gather": bool(check),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
