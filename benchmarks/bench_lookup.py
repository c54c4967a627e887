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
and the load average. CPU per call is reported beside: this process's (all its threads) and that
of the server it called (every thread's schedstat); `cpu_ratio` (raw CPU / lookup CPU, client and
server together) depends less on what else the machine runs than wall time does. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import sys
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


def _child(word: str) -> int:
    """PID of the child process of this one whose command line holds `word` (a server)."""
    me = os.getpid()
    for tid in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{tid}/children") as f:
            for pid in map(int, f.read().split()):
                with open(f"/proc/{pid}/cmdline", "rb") as c:
                    if word.encode() in c.read():
                        return pid
    raise RuntimeError(f"no child process runs {word!r}")


def _server_faults(pid: int) -> int:
    """Minor page faults of process `pid` so far (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def _cpu_s(pid: int) -> float:
    """CPU seconds that process `pid` has run, all threads (schedstat: nanoseconds)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended
            continue
    return total / 1e9


class _Method:
    """One measured call and what it costs: wall time per repeat, this process's page faults
    and CPU, and the page faults and CPU of the server process it calls."""

    def __init__(self, fn: Callable[[int], object], server_pid: int) -> None:
        self.fn, self.server_pid = fn, server_pid
        self.medians: list[float] = []
        self.calls = self.faults = self.server_faults = 0
        self.client_cpu = self.server_cpu = 0.0

    def summary(self, nbytes: int, rows: int) -> dict:
        lo, med = min(self.medians), float(np.median(self.medians))
        return {
            "ms_min": lo * 1e3,
            "ms_median": med * 1e3,
            "rows_per_s_median": rows / med,
            "gb_per_s_median": nbytes / med / 1e9,
            "faults_per_call": self.faults / self.calls,
            "server_faults_per_call": self.server_faults / self.calls,
            "client_cpu_ms_per_call": self.client_cpu / self.calls * 1e3,
            "server_cpu_ms_per_call": self.server_cpu / self.calls * 1e3,
        }

    def cpu_ms(self) -> float:
        return (self.client_cpu + self.server_cpu) / self.calls * 1e3


def _measure(methods: dict[str, _Method], iters: int, repeats: int) -> None:
    """Call every method `iters` times per repeat, alternating (so they see the same load)."""
    for _ in range(repeats):
        times: dict[str, list[float]] = {k: [] for k in methods}
        for i in range(iters):
            for name, m in methods.items():
                s0, f0, c0 = _cpu_s(m.server_pid), _faults(), time.process_time()
                g0 = _server_faults(m.server_pid)
                t0 = time.perf_counter()
                m.fn(i)
                times[name].append(time.perf_counter() - t0)
                m.client_cpu += time.process_time() - c0
                m.faults += _faults() - f0
                m.server_cpu += _cpu_s(m.server_pid) - s0
                m.server_faults += _server_faults(m.server_pid) - g0
                m.calls += 1
        for name, ts in times.items():
            methods[name].medians.append(float(np.median(ts)))


def _ratios(store: _Method, raw: _Method) -> list[float]:
    """raw time / store time per repeat (the same load within a repeat)."""
    return [r / s for s, r in zip(store.medians, raw.medians, strict=True)]


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
    if os.environ.get("GLIBC_TUNABLES") != TUNABLES:  # glibc reads them at start: start again
        os.environ["GLIBC_TUNABLES"] = TUNABLES  # the servers inherit them
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.quick:
        args.iters, args.repeats, args.table_rows = 3, 3, max(args.rows, 1 << 17)
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
        shard_pid, raw_pid = _child("--data"), _child("raw_server.py")
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
            methods[f"store_{dtype}"] = _Method(store, shard_pid)
            methods[f"raw_{dtype}"] = _Method(raw, raw_pid)
        name = "bench_float32"
        # float32 variants: split into small sub-requests, and the default call (a writable
        # copy); measured apart (each beside raw float32), as their 16 MiB arrays of their own
        # change what malloc has free for the others' messages
        variants = {
            "raw": _Method(methods["raw_float32"].fn, raw_pid),
            "split": _Method(
                lambda i: splitting.lookup(
                    name, batches[i], "float32", unique=True, raw=True, view=True
                ),
                shard_pid,
            ),
            "owned": _Method(lambda i: client.lookup(name, batches[i]), shard_pid),
        }
        check = {
            d: bool(np.array_equal(methods[f"store_{d}"].fn(0), local[d][batches[0]]))
            for d in dtypes
        }
        _measure(methods, args.iters, args.repeats)
        _measure(variants, args.iters, args.repeats)
        gather = {"numpy": _Method(lambda i: local["float32"][batches[i]], os.getpid())}
        _measure(gather, args.iters, 1)
        server = {m["method"]: m for m in client.stats()[0]["methods"]}["Lookup"]
        channel.close()
    load_after = os.getloadavg()

    per_dtype = {}
    for d in dtypes:
        store, raw = methods[f"store_{d}"], methods[f"raw_{d}"]
        ratios = _ratios(store, raw)
        per_dtype[d] = {
            "bytes_per_lookup": sizes[d],
            "store": store.summary(sizes[d], args.rows),
            "raw_grpc": raw.summary(sizes[d], args.rows),
            "ratio_min": min(ratios),
            "ratio_median": float(np.median(ratios)),
            "cpu_ratio": raw.cpu_ms() / store.cpu_ms(),
            "rows_match_local": check[d],
        }
    f32 = per_dtype["float32"]
    for variant in ("split", "owned"):
        ratios = _ratios(variants[variant], variants["raw"])
        f32[variant] = {
            **variants[variant].summary(sizes["float32"], args.rows),
            "raw_grpc_ms_median": float(np.median(variants["raw"].medians)) * 1e3,
            "ratio_median": float(np.median(ratios)),
            "cpu_ratio": variants["raw"].cpu_ms() / variants[variant].cpu_ms(),
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
        "numpy_gather_ms": gather["numpy"].medians[0] * 1e3,
        "server_lookup_p50_ms": server["p50_ms"],
        "ratio_lookup_vs_raw_grpc": f32["ratio_median"],
        "ratio_bf16_vs_raw_grpc": per_dtype["bfloat16"]["ratio_median"],
        "ratio_fp8_vs_raw_grpc": per_dtype["float8_e4m3"]["ratio_median"],
        "cpu_ratio_lookup_vs_raw_grpc": f32["cpu_ratio"],
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
