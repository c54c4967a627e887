"""Lookup throughput of one shard server through StoreClient, against a raw gRPC reply of the
same bytes, per wire dtype.

    python benchmarks/bench_lookup.py [--rows 65536] [--dim 64] [--iters 10] [--repeats 5]
                                      [--split-bytes N] [--split-variant N] [--quick]

Starts `engram serve` and benchmarks/raw_server.py in subprocesses on 127.0.0.1 and creates a
float32 table, a bfloat16-stored and a float8_e4m3-stored one (rows served in their storage
dtype), every row stored (imported as its initial value). Each iteration looks up `--rows`
distinct random rows the way the trainer's prefetcher does (ids known unique, rows in the storage
dtype as they travel, a view of the answer; answers over the client's split_bytes split into
concurrent sub-requests) and fetches the same number of bytes from the raw server, whose answer
is prebuilt bytes with no protobuf on either side. Methods alternate within an iteration so they
see the same load. For float32 two more variants: `split` (sub-requests of --split-variant bytes,
4 in flight, assembled into one array) and `owned` (the default call: ids deduplicated, a
writable float32 array).

Warm buffers on both sides: the servers and this process run with glibc's mmap and trim
thresholds raised (GLIBC_TUNABLES), so that a freed 16 MiB message buffer is reused by the next
call instead of being returned to the kernel and faulted in again; the minor page faults per
call of this process are reported for each method to show it.

Each repeat takes the median of `--iters` calls per method; the JSON reports min and median over
`--repeats` repeats, the ratio raw time / lookup time per repeat (min and median; target >= 0.8)
and the load average. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import time
from collections.abc import Callable

import grpc
import numpy as np
from _procs import raw_server, shard_server

from engram_store.engine.config import OptimizerConfig, TableConfig, row_bytes
from engram_store.rpc import wire
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb

TARGET = 0.8
# glibc keeps freed large blocks for reuse (no munmap, no heap trim below 4 GiB) in every process
TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measure(
    methods: dict[str, Callable[[int], object]], iters: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per method: the median seconds of each repeat, and minor page faults per call."""
    medians: dict[str, list[float]] = {k: [] for k in methods}
    faults = dict.fromkeys(methods, 0)
    for _ in range(repeats):
        times: dict[str, list[float]] = {k: [] for k in methods}
        for i in range(iters):
            for name, fn in methods.items():
                f0, t0 = _faults(), time.perf_counter()
                fn(i)
                times[name].append(time.perf_counter() - t0)
                faults[name] += _faults() - f0
        for name, ts in times.items():
            medians[name].append(float(np.median(ts)))
    return medians, {k: v / (iters * repeats) for k, v in faults.items()}


def _store_every_row(
    client: StoreClient, address: str, table: str, num_rows: int, dtype: str
) -> np.ndarray:
    """Store every row of `table` (an sgd table: no optimizer state) as its initial value, so
    that lookups gather stored rows (rows never stored are computed from the seed); returns the
    rows as they travel in `dtype`, the table's storage dtype."""
    rows = client.lookup(table, np.arange(num_rows), dtype, unique=True, raw=True)
    records = rows.view(np.uint8).reshape(num_rows, -1)
    step = 1 << 16
    batches = (
        pb.RowBatch(
            table=table,
            ids=wire.pack_ids(np.arange(lo, min(lo + step, num_rows))),
            records=records[lo : lo + step].tobytes(),
            record_bytes=records.shape[1],
        )
        for lo in range(0, num_rows, step)
    )
    assert client._stub(address).ImportRows(batches, timeout=600).rows == num_rows
    return rows


def _summary(seconds: list[float], nbytes: int, rows: int) -> dict:
    lo, med = min(seconds), float(np.median(seconds))
    return {
        "ms_min": lo * 1e3,
        "ms_median": med * 1e3,
        "rows_per_s_median": rows / med,
        "gb_per_s_median": nbytes / med / 1e9,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536, help="distinct rows per lookup")
    ap.add_argument("--dim", type=int, default=64, help="row width")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per method per repeat")
    ap.add_argument("--repeats", type=int, default=5, help="repeats (min/median over them)")
    ap.add_argument("--table-rows", type=int, default=1 << 20, help="rows in each table")
    ap.add_argument(
        "--split-bytes",
        type=int,
        default=None,
        help="StoreClient split_bytes (default: the client's); 0 never splits",
    )
    ap.add_argument(
        "--split-variant",
        type=int,
        default=4 << 20,
        help="split_bytes of the float32 `split` variant",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: small table, 3 x 3 calls")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.repeats, args.table_rows = 3, 3, max(args.rows, 1 << 17)
    os.environ["GLIBC_TUNABLES"] = TUNABLES  # the servers inherit it
    rng = np.random.default_rng(0)
    batches = [rng.choice(args.table_rows, args.rows, replace=False) for _ in range(args.iters)]
    dtypes = ["float32", "bfloat16", "float8_e4m3"]
    load_before = os.getloadavg()
    split = {} if args.split_bytes is None else {"split_bytes": args.split_bytes}

    with (
        shard_server() as address,
        raw_server() as raw_address,
        StoreClient(address, ClientConfig(), **split) as client,
        StoreClient(address, ClientConfig(), split_bytes=args.split_variant) as splitting,
    ):
        local, methods, sizes = {}, {}, {}
        opts = [
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.max_receive_message_length", 1 << 30),
        ]
        channel = grpc.insecure_channel(raw_address, options=opts)
        fetch = channel.unary_unary("/bench.Raw/Fetch")
        for dtype in dtypes:
            name = f"bench_{dtype}"
            client.create_table(
                TableConfig(
                    name=name,
                    num_rows=args.table_rows,
                    dim=args.dim,
                    dtype=dtype,
                    optimizer=OptimizerConfig(kind="sgd", lr=0.1),
                )
            )
            local[dtype] = _store_every_row(client, address, name, args.table_rows, dtype)
            nbytes = sizes[dtype] = args.rows * row_bytes(dtype, args.dim)
            reqs = [struct.pack("<q", nbytes) + b.astype("<i8").tobytes() for b in batches]

            def store(i: int, name=name, dtype=dtype) -> np.ndarray:
                return client.lookup(name, batches[i], dtype, unique=True, raw=True, view=True)

            def raw(i: int, reqs=reqs) -> np.ndarray:
                return np.frombuffer(fetch(reqs[i], timeout=60), np.uint8)

            assert raw(0).nbytes == nbytes
            for i in range(2):  # untimed: first calls, first-touch faults
                store(i)
                raw(i)
            methods[f"store_{dtype}"], methods[f"raw_{dtype}"] = store, raw
        name = "bench_float32"
        # float32 variants: split into small sub-requests, and the default call (a writable
        # copy); measured apart (each beside raw float32), as their 16 MiB arrays of their own
        # change what malloc has free for the others' messages
        variants = {
            "raw_float32": methods["raw_float32"],
            "split_float32": lambda i: splitting.lookup(
                name, batches[i], "float32", unique=True, raw=True, view=True
            ),
            "owned_float32": lambda i: client.lookup(name, batches[i]),
        }
        check = {
            d: bool(np.array_equal(methods[f"store_{d}"](0), local[d][batches[0]])) for d in dtypes
        }
        medians, faults = _measure(methods, args.iters, args.repeats)
        vmedians, vfaults = _measure(variants, args.iters, args.repeats)
        numpy_s = _measure({"numpy": lambda i: local["float32"][batches[i]]}, args.iters, 1)[0]
        server = {m["method"]: m for m in client.stats()[0]["methods"]}["Lookup"]
        channel.close()
    load_after = os.getloadavg()

    per_dtype = {}
    for d in dtypes:
        s, r = medians[f"store_{d}"], medians[f"raw_{d}"]
        ratios = [b / a for a, b in zip(s, r, strict=True)]  # per repeat: same load
        per_dtype[d] = {
            "bytes_per_lookup": sizes[d],
            "store": _summary(s, sizes[d], args.rows),
            "raw_grpc": _summary(r, sizes[d], args.rows),
            "store_faults_per_call": faults[f"store_{d}"],
            "raw_faults_per_call": faults[f"raw_{d}"],
            "ratio_min": min(ratios),
            "ratio_median": float(np.median(ratios)),
            "rows_match_local": check[d],
        }
    f32 = per_dtype["float32"]
    for variant in ("split", "owned"):
        ratios = [
            b / a
            for a, b in zip(vmedians[f"{variant}_float32"], vmedians["raw_float32"], strict=True)
        ]
        f32[variant] = {
            **_summary(vmedians[f"{variant}_float32"], sizes["float32"], args.rows),
            "raw_grpc_ms_median": float(np.median(vmedians["raw_float32"])) * 1e3,
            "ratio_median": float(np.median(ratios)),
            "faults_per_call": vfaults[f"{variant}_float32"],
        }
    result = {
        "benchmark": "lookup",
        "rows": args.rows,
        "dim": args.dim,
        "iters": args.iters,
        "repeats": args.repeats,
        "table_rows": args.table_rows,
        "split_bytes": client.split_bytes,
        "split_variant_bytes": args.split_variant,
        "dtypes": per_dtype,
        "numpy_gather_ms": numpy_s["numpy"][0] * 1e3,
        "server_lookup_p50_ms": server["p50_ms"],
        "ratio_lookup_vs_raw_grpc": f32["ratio_median"],
        "ratio_bf16_vs_raw_grpc": per_dtype["bfloat16"]["ratio_median"],
        "ratio_fp8_vs_raw_grpc": per_dtype["float8_e4m3"]["ratio_median"],
        "target_ratio": TARGET,
        "meets_target": f32["ratio_median"] >= TARGET,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
