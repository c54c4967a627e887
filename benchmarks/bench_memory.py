"""RAM and disk per stored parameter of one shard, after every row of a table was touched.

    python benchmarks/bench_memory.py [--rows 10300000] [--dim 64] [--formats float32:adam,...]
                                      [--demo] [--quick]

Each format runs in a fresh child process (so RSS is its own): a shard in a temporary data
directory creates one table of `--rows` x `--dim`, pushes every row once (65,536 distinct ids per
push, random order), checkpoints, and reports:
- `rss_bytes_per_param`: (RSS after - RSS after opening the shard) / parameters: what the stored
  rows cost (issue 10 targets: float32 + Adam <= 12.5, bfloat16 + row-wise Adagrad <= 2.5);
  `rss_total_bytes_per_param` includes the interpreter and libraries;
- `engine_bytes_per_param`: the engine's own accounting (Shard.memory_bytes);
- `disk_bytes_per_param`: blocks allocated under the data directory after the checkpoint;
- `payload_bytes_per_param`: the row + optimizer state alone (the floor).
`--demo` adds the two demo Engram layers (2 x `--rows` rows, float32 + Adam) on one shard: their
total RSS against this machine's RAM and random lookups of 65,536 distinct stored rows (rows/s,
target >= 1 M). The last line printed is one JSON object, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

TARGETS = {"float32:adam": 12.5, "bfloat16:rowwise_adagrad": 2.5}
BATCH = 65536


def _rss() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def _disk(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def child(args: argparse.Namespace) -> dict:
    from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
    from engram_store.engine.shard import Shard

    tables = []
    for k in range(args.tables):
        dtype, opt = args.format.split(":")
        tables.append(
            TableConfig(
                f"layer{k}",
                num_rows=args.rows,
                dim=args.dim,
                dtype=dtype,
                optimizer=OptimizerConfig(opt, lr=1e-3),
            )
        )
    rng = np.random.default_rng(0)
    grads = (rng.standard_normal((BATCH, args.dim)) * 1e-3).astype(np.float32)
    res: dict = {"format": args.format, "tables": args.tables, "rows": args.rows, "dim": args.dim}
    with tempfile.TemporaryDirectory(prefix="engram-mem-", dir=args.dir) as data:
        with Shard(ShardConfig(data_dir=data)) as shard:
            for spec in tables:
                shard.create_table(spec)
            # warm the kernels on a throwaway table, so compiled code is in the baseline
            from engram_store.engine.config import TableConfig as TC

            shard.create_table(
                TC(
                    "warm",
                    num_rows=BATCH,
                    dim=args.dim,
                    dtype=tables[0].dtype,
                    optimizer=tables[0].optimizer,
                )
            )
            shard.push("warm", np.arange(BATCH, dtype=np.int64), grads)
            shard.drop_table("warm")
            base = _rss()
            t0 = time.perf_counter()
            for spec in tables:
                order = rng.permutation(args.rows).astype(np.int64)
                for lo in range(0, args.rows, BATCH):
                    ids = order[lo : lo + BATCH]
                    shard.push(spec.name, ids, grads[: ids.shape[0]])
            res["touch_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            shard.checkpoint()
            res["checkpoint_s"] = time.perf_counter() - t0
            after = _rss()
            params = args.tables * args.rows * args.dim
            spec = tables[0]
            res.update(
                params=params,
                rss_bytes_per_param=(after["VmRSS"] - base["VmRSS"]) / params,
                rss_anon_bytes_per_param=(after["RssAnon"] - base["RssAnon"]) / params,
                rss_total_bytes_per_param=after["VmRSS"] / params,
                rss_bytes=after["VmRSS"],
                peak_rss_bytes=after["VmHWM"],
                engine_bytes_per_param=shard.memory_bytes() / params,
                payload_bytes_per_param=(spec.row_bytes + 4 * spec.state_floats) / spec.dim,
                stored_rows=shard.stats()["stored_rows"],
            )
            if args.lookups:
                stored = rng.choice(args.rows, BATCH, replace=False).astype(np.int64)
                shard.lookup_into(tables[0].name, stored, spec.dtype)
                times = []
                for _ in range(args.lookups):
                    ids = rng.choice(args.rows, BATCH, replace=False).astype(np.int64)
                    name = tables[int(rng.integers(0, len(tables)))].name
                    t0 = time.perf_counter()
                    shard.lookup_into(name, ids, spec.dtype)
                    times.append(time.perf_counter() - t0)
                res["lookup_rows_per_s_max"] = BATCH / min(times)
                res["lookup_rows_per_s_median"] = BATCH / float(np.median(times))
        res["disk_bytes_per_param"] = _disk(data) / params
    return res


def run_child(argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"bench_memory child {argv} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_300_000, help="rows per table")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument(
        "--formats",
        default="float32:adam,bfloat16:rowwise_adagrad,float32:rowwise_adagrad,bfloat16:adam",
        help="comma-separated dtype:optimizer pairs",
    )
    ap.add_argument("--demo", action="store_true", help="also 2 demo layers on one shard")
    ap.add_argument("--dir", default=None, help="where the temporary data directories go")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 k rows")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--format", default="float32:adam", help=argparse.SUPPRESS)
    ap.add_argument("--tables", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--lookups", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.rows = 200_000
    load_before = os.getloadavg()
    common = ["--rows", str(args.rows), "--dim", str(args.dim)]
    if args.dir:
        common += ["--dir", args.dir]
    results = {}
    for fmt in args.formats.split(","):
        results[fmt] = run_child([*common, "--format", fmt])
    summary: dict = {
        "benchmark": "memory",
        "rows": args.rows,
        "dim": args.dim,
        "bytes_per_param": {
            f: {
                k: round(r[k], 3)
                for k in (
                    "rss_bytes_per_param",
                    "rss_total_bytes_per_param",
                    "engine_bytes_per_param",
                    "disk_bytes_per_param",
                    "payload_bytes_per_param",
                )
            }
            for f, r in results.items()
        },
        "targets": TARGETS,
        "meets_targets": all(
            results[f]["rss_bytes_per_param"] <= t for f, t in TARGETS.items() if f in results
        ),
    }
    if args.demo:
        demo = run_child([*common, "--format", "float32:adam", "--tables", "2", "--lookups", "20"])
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        demo["machine_ram_bytes"] = phys
        demo["rss_share_of_ram"] = demo["rss_bytes"] / phys
        summary["demo_two_layers"] = demo
    summary.update(
        detail=results,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
        cpus=os.cpu_count(),
        machine=platform.machine(),
        python=platform.python_version(),
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
