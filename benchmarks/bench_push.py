"""Push throughput of one shard, acknowledged after its log entry committed, against the
baselines measured in the same run.

    python benchmarks/bench_push.py [--table-rows 10300000] [--stored 1048576] [--rows 65536]
                                    [--dim 64] [--iters 8] [--repeats 3] [--quick]

Setting (issue 10): a table of `--table-rows` rows x `--dim` float32 with `--stored` rows already
stored; each push carries `--rows` distinct random ids. Two id draws: `stored` (ids among the
stored rows: a training run revisiting its n-grams) and `fresh` (ids uniform over the whole
table: mostly first touches, which also compute the rows' initial values).

Measured, each as min / median over `--repeats` repeats of `--iters` pushes:
- `inprocess`: engine Shard in this process, Adam (and row-wise Adagrad, and bf16 rows + Adam);
- `grpc`: the same pushes from this process to `engram serve` in another process, one at a time
  and two in flight (push_async), and with `--durable` (fdatasync per commit);
- baselines: `torch`: nn.Embedding(sparse=True) + SparseAdam over the same table height, warm
  (the single-process table we must beat); `append_fdatasync`: appending the same log bytes to a
  file and fdatasync-ing each (the durable-write limit); `memcpy`: copying them once in RAM.
The last line printed is one JSON object with the ratios and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np
from _procs import shard_server

from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.engine.shard import Shard
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig

TARGET_INPROCESS = 1.0e6
TARGET_GRPC = 0.7e6


def _stats(rows: int, times: list[float]) -> dict:
    """Rows/s of the fastest and the median repeat (each repeat: mean seconds per push)."""
    t = np.asarray(times)
    return {
        "ms_min": float(t.min() * 1e3),
        "ms_median": float(np.median(t) * 1e3),
        "rows_per_s_max": float(rows / t.min()),
        "rows_per_s_median": float(rows / np.median(t)),
    }


def _repeat(fn: Callable[[int], None], iters: int, repeats: int) -> list[float]:
    """Mean seconds per call of fn(i) over `iters` calls, `repeats` times (after one warm call)."""
    fn(0)
    out = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(iters):
            fn(1 + r * iters + i)
        out.append((time.perf_counter() - t0) / iters)
    return out


class Workload:
    """The ids and gradients every contender pushes, drawn once."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = np.random.default_rng(0)
        self.args = args
        self.stored = rng.choice(args.table_rows, args.stored, replace=False).astype(np.int64)
        n = args.iters * args.repeats + 1
        self.batches = {
            "stored": [rng.choice(self.stored, args.rows, replace=False) for _ in range(n)],
            "fresh": [
                rng.choice(args.table_rows, args.rows, replace=False).astype(np.int64)
                for _ in range(n)
            ],
        }
        self.grads = (rng.standard_normal((args.rows, args.dim)) * 1e-2).astype(np.float32)

    def spec(self, optimizer: str = "adam", dtype: str = "float32") -> TableConfig:
        return TableConfig(
            name="bench",
            num_rows=self.args.table_rows,
            dim=self.args.dim,
            dtype=dtype,
            optimizer=OptimizerConfig(kind=optimizer, lr=1e-3),
        )

    def fill(self, push: Callable[[np.ndarray, np.ndarray], object]) -> None:
        """Store the `stored` rows (one push each, gradients zero)."""
        zeros = np.zeros((self.args.rows, self.args.dim), np.float32)
        for lo in range(0, self.stored.shape[0], self.args.rows):
            ids = self.stored[lo : lo + self.args.rows]
            push(ids, zeros[: ids.shape[0]])


def inprocess(w: Workload, optimizer: str, dtype: str, durable: bool = False) -> dict:
    a = w.args
    out: dict = {}
    with (
        tempfile.TemporaryDirectory(prefix="engram-bench-") as data,
        Shard(ShardConfig(data_dir=data, durable=durable)) as shard,
    ):
        shard.create_table(w.spec(optimizer, dtype))
        w.fill(lambda ids, g: shard.push("bench", ids, g))
        for draw in ("stored", "fresh"):
            b = w.batches[draw]
            times = _repeat(lambda i, b=b: shard.push("bench", b[i], w.grads), a.iters, a.repeats)
            out[draw] = _stats(a.rows, times)
        out["memory_bytes"] = shard.stats()["memory_bytes"]
    return out


def over_grpc(w: Workload, durable: bool) -> dict:
    a = w.args
    out: dict = {}
    extra = ["--durable"] if durable else []
    with shard_server(*extra) as address, StoreClient(address, ClientConfig()) as client:
        client.create_table(w.spec())
        w.fill(lambda ids, g: client.push("bench", ids, g))
        for draw in ("stored", "fresh"):
            b = w.batches[draw]
            times = _repeat(lambda i, b=b: client.push("bench", b[i], w.grads), a.iters, a.repeats)
            out[draw] = _stats(a.rows, times)
        b = w.batches["stored"]

        def pipelined(r: int) -> None:
            inflight: list = []
            for i in range(a.iters):
                if len(inflight) == 2:
                    inflight.pop(0).result()
                inflight.append(client.push_async("bench", b[(r + i) % len(b)], w.grads))
            for f in inflight:
                f.result()

        times = [t / a.iters for t in _repeat(pipelined, 1, a.repeats)]
        out["stored_two_in_flight"] = _stats(a.rows, times)
        server = {m["method"]: m for m in client.stats()[0]["methods"]}["PushGradients"]
        out["server_p50_ms"] = server["p50_ms"]
    return out


def torch_baseline(w: Workload) -> dict:
    import torch

    a = w.args
    torch.set_num_threads(os.cpu_count() or 1)
    emb = torch.nn.Embedding(a.table_rows, a.dim, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
    g = torch.from_numpy(w.grads)
    out: dict = {}

    def step(ids: np.ndarray) -> None:
        opt.zero_grad(set_to_none=False)
        emb(torch.from_numpy(ids)).backward(g)
        opt.step()

    for lo in range(0, w.stored.shape[0], a.rows):  # warm: the same rows touched
        step(w.stored[lo : lo + a.rows])
    for draw in ("stored", "fresh"):
        b = w.batches[draw]
        out[draw] = _stats(a.rows, _repeat(lambda i, b=b: step(b[i]), a.iters, a.repeats))
    return out


def io_limits(w: Workload) -> dict:
    """Appending + fdatasync-ing the log bytes of one push, and copying them once in RAM."""
    a = w.args
    payload = np.random.default_rng(1).integers(0, 255, a.rows * (8 + 4 * a.dim), np.uint8)
    dst = np.empty_like(payload)
    with tempfile.TemporaryDirectory(prefix="engram-bench-", dir=None) as d:
        fd = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:

            def append(_i: int) -> None:
                os.write(fd, payload)
                os.fdatasync(fd)

            synced = _repeat(append, a.iters, a.repeats)

            def append_only(_i: int) -> None:
                os.write(fd, payload)

            written = _repeat(append_only, a.iters, a.repeats)
        finally:
            os.close(fd)
    copied = _repeat(lambda i: np.copyto(dst, payload), a.iters, a.repeats)
    return {
        "bytes_per_push": int(payload.nbytes),
        "append_fdatasync": _stats(a.rows, synced),
        "append_page_cache": _stats(a.rows, written),
        "memcpy": _stats(a.rows, copied),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table-rows", type=int, default=10_300_000, help="table height")
    ap.add_argument("--stored", type=int, default=1 << 20, help="rows stored before timing")
    ap.add_argument("--rows", type=int, default=65536, help="distinct rows per push")
    ap.add_argument("--dim", type=int, default=64, help="row width")
    ap.add_argument("--iters", type=int, default=8, help="pushes per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats (min / median reported)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch baseline")
    ap.add_argument("--quick", action="store_true", help="smoke run: small table, few pushes")
    args = ap.parse_args()
    if args.quick:
        args.table_rows, args.stored, args.rows, args.iters, args.repeats = (
            1 << 18,
            1 << 15,
            1 << 13,
            2,
            2,
        )
    w = Workload(args)
    load_before = os.getloadavg()
    res: dict = {"inprocess": {}}
    res["inprocess"]["adam_float32"] = inprocess(w, "adam", "float32")
    res["inprocess"]["rowwise_adagrad_float32"] = inprocess(w, "rowwise_adagrad", "float32")
    res["inprocess"]["adam_bfloat16"] = inprocess(w, "adam", "bfloat16")
    res["inprocess"]["adam_float32_durable"] = inprocess(w, "adam", "float32", durable=True)
    res["grpc"] = over_grpc(w, durable=False)
    res["grpc_durable"] = over_grpc(w, durable=True)
    res["limits"] = io_limits(w)
    if not args.no_torch:
        res["torch_sparseadam"] = torch_baseline(w)
    ip = res["inprocess"]["adam_float32"]["stored"]["rows_per_s_max"]
    gr = res["grpc"]["stored"]["rows_per_s_max"]
    summary = {
        "benchmark": "push",
        "table_rows": args.table_rows,
        "stored_rows": args.stored,
        "rows_per_push": args.rows,
        "dim": args.dim,
        "inprocess_adam_rows_per_s": ip,
        "grpc_adam_rows_per_s": gr,
        "grpc_two_in_flight_rows_per_s": res["grpc"]["stored_two_in_flight"]["rows_per_s_max"],
        "targets": {"inprocess": TARGET_INPROCESS, "grpc": TARGET_GRPC},
        "meets_targets": ip >= TARGET_INPROCESS and gr >= TARGET_GRPC,
        "durable_vs_append_fdatasync": res["inprocess"]["adam_float32_durable"]["stored"][
            "rows_per_s_max"
        ]
        / res["limits"]["append_fdatasync"]["rows_per_s_max"],
    }
    if "torch_sparseadam" in res:
        t = res["torch_sparseadam"]
        summary["inprocess_vs_torch"] = ip / t["stored"]["rows_per_s_max"]
        summary["grpc_vs_torch"] = gr / t["stored"]["rows_per_s_max"]
        summary["fresh_inprocess_vs_torch"] = (
            res["inprocess"]["adam_float32"]["fresh"]["rows_per_s_max"]
            / t["fresh"]["rows_per_s_max"]
        )
    summary.update(
        detail=res,
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
