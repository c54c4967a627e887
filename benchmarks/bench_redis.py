"""The peer baseline: the same memory table in Redis, against one engram shard server.

    python benchmarks/bench_redis.py [--rows 65536] [--dim 64] [--iters 5] [--quick]

What a user would otherwise build: one Redis key per row (`w<id>`: the float32 row) and one per
row's Adam state (`s<id>`: exp_avg then exp_avg_sq), a redis-server on 127.0.0.1 started here on a
free port with no persistence (killed at the end). Lookup = pipelined MGET (chunks of --chunk keys,
one round trip); update = read-modify-write: MGET rows + state, the store's own numpy Adam
(engram_store.engine.optimizers, SparseAdam semantics) in the client, MSET both back. Not atomic: two
writers of one row would race (the engram store applies a push in one LMDB transaction).

The engram side is `engram serve` in another process (benchmarks/_procs.py) through StoreClient,
same table (same initial rows), same ids, same gradients. Reported: rows/s of both for lookup and
push, the ratios (target >= 10x), a check that both hold the same rows after the same pushes, and
lookup throughput vs batch size for the store, raw gRPC (benchmarks/raw_server.py: the same bytes
with no work) and Redis. If redis-server is missing it is installed with apt-get only when running
as root; otherwise the JSON says why the benchmark was skipped. Last line printed: one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_store.engine.config import OptimizerConfig, TableConfig  # noqa: E402
from engram_store.engine.init import initial_rows  # noqa: E402
from engram_store.engine.optimizers import apply, coalesce  # noqa: E402

TARGET = 10.0


# ----------------------------------------------------------------------------- redis-server


def find_redis_server(install: bool = True) -> tuple[str | None, str]:
    """(path to redis-server or None, a note on how it was found or why it is missing)."""
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if path:
        return path, "found"
    if not install:
        return None, "redis-server not found (install the redis-server package)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, (
            "redis-server not found and not running as root, so not installing it; "
            "install it (apt-get install redis-server) to run this benchmark"
        )
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "redis-server"],
            check=True,
            timeout=300,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"redis-server not found; apt-get install -y redis-server failed: {e}"
    path = shutil.which("redis-server")
    return (
        (path, "installed with apt-get install -y redis-server (running as root)")
        if path
        else (None, "apt-get install -y redis-server ran but no redis-server is on PATH")
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(binary: str, timeout_s: float = 15.0) -> Iterator[int]:
    """A throw-away redis-server on 127.0.0.1 (free port, no RDB/AOF, in a temp dir); yields the
    port; always killed at the end."""
    import redis
    from _procs import stop  # benchmarks/ is on sys.path when run as a script

    with tempfile.TemporaryDirectory(prefix="engram-redis-") as tmp:
        for attempt in range(3):
            port = _free_port()
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                    "--protected-mode",
                    "yes",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + timeout_s
            up = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    redis.Redis(port=port, socket_timeout=1).ping()
                    up = True
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            if up:
                break
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            if attempt == 2:
                raise RuntimeError(f"redis-server did not start on port {port}: {err[-500:]}")
        try:
            yield port
        finally:
            stop(proc, timeout_s=10)
            proc.stderr.close()


# ------------------------------------------------------------------------------ Redis table


class RedisTable:
    """One memory table in Redis: key w<id> = float32 row, s<id> = Adam state (m then v).

    lookup: pipelined MGET; push: read-modify-write with engram_store.engine.optimizers (the store's
    math) in the client, the table step kept in key `step` (INCR per push, like the store's
    step 0 = table step + 1).
    """

    def __init__(self, client, spec: TableConfig, chunk: int = 4096) -> None:
        self.r, self.spec, self.chunk = client, spec, chunk
        self.dim = spec.dim
        self.state_dim = spec.state_floats

    def load(self, ids: np.ndarray, batch: int = 16384) -> None:
        """Write the table's initial rows (engram_store.engine.init, as the store computes them)."""
        for lo in range(0, len(ids), batch):
            part = ids[lo : lo + batch]
            rows = initial_rows(self.spec, part)
            self._mset(part, rows, None)

    def _mget(self, prefix: bytes, ids: np.ndarray) -> list:
        pipe = self.r.pipeline(transaction=False)
        for lo in range(0, len(ids), self.chunk):
            pipe.mget([prefix + b"%d" % i for i in ids[lo : lo + self.chunk].tolist()])
        out: list = []
        for part in pipe.execute():
            out.extend(part)
        return out

    def _mset(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray | None) -> None:
        pipe = self.r.pipeline(transaction=False)
        rows = np.ascontiguousarray(rows, dtype="<f4")
        keys = ids.tolist()
        for lo in range(0, len(keys), self.chunk):
            hi = min(lo + self.chunk, len(keys))
            pipe.mset({b"w%d" % keys[j]: rows[j].tobytes() for j in range(lo, hi)})
            if state is not None:
                st = np.ascontiguousarray(state, dtype="<f4")
                pipe.mset({b"s%d" % keys[j]: st[j].tobytes() for j in range(lo, hi)})
        pipe.execute()

    def _decode(
        self, vals: list, width: int, missing: Callable[[np.ndarray], np.ndarray], ids: np.ndarray
    ) -> np.ndarray:
        out = np.empty((len(vals), width), np.float32)
        absent = [j for j, v in enumerate(vals) if v is None]
        if absent:
            out[absent] = missing(ids[absent])
            present = [j for j, v in enumerate(vals) if v is not None]
            if present:
                out[present] = np.frombuffer(b"".join(vals[j] for j in present), "<f4").reshape(
                    -1, width
                )
        elif len(vals):
            out[:] = np.frombuffer(b"".join(vals), "<f4").reshape(-1, width)
        return out

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 (n, dim) rows of `ids` (rows never written: the table's initial rows)."""
        ids = np.asarray(ids, np.int64)
        return self._decode(
            self._mget(b"w", ids), self.dim, lambda m: initial_rows(self.spec, m), ids
        )

    def push(self, ids: np.ndarray, grads: np.ndarray) -> int:
        """One Adam step on the rows of `ids` (duplicates summed); returns the step used.

        Two round trips: one pipeline (INCR step, MGET rows and state per chunk), then MSET."""
        uids, g = coalesce(np.asarray(ids, np.int64), np.asarray(grads, np.float32))
        pipe = self.r.pipeline(transaction=False)
        pipe.incr("step")
        for lo in range(0, len(uids), self.chunk):
            part = uids[lo : lo + self.chunk].tolist()
            pipe.mget([b"w%d" % i for i in part])
            pipe.mget([b"s%d" % i for i in part])
        res = pipe.execute()
        step = int(res[0])
        w_vals = [v for part in res[1::2] for v in part]
        s_vals = [v for part in res[2::2] for v in part]
        rows = self._decode(w_vals, self.dim, lambda m: initial_rows(self.spec, m), uids)
        state = self._decode(
            s_vals, self.state_dim, lambda m: np.zeros((len(m), self.state_dim), np.float32), uids
        )
        new_rows, new_state = apply(self.spec.optimizer, rows, state, g, step)
        self._mset(uids, new_rows, new_state)
        return step

    def state(self, ids: np.ndarray) -> np.ndarray:
        """float32 (n, state_width*dim) Adam state (zeros for rows never pushed)."""
        ids = np.asarray(ids, np.int64)
        return self._decode(
            self._mget(b"s", ids),
            self.state_dim,
            lambda m: np.zeros((len(m), self.state_dim), np.float32),
            ids,
        )


# ------------------------------------------------------------------------------------- main


def _median_s(fn: Callable[[int], object], iters: int) -> float:
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536, help="distinct rows per lookup/push")
    ap.add_argument("--dim", type=int, default=64, help="row width (float32)")
    ap.add_argument("--iters", type=int, default=5, help="timed operations per method")
    ap.add_argument("--table-rows", type=int, default=1 << 20, help="rows in the table")
    ap.add_argument(
        "--batches",
        default="1024,4096,16384,65536",
        help="batch sizes of the lookup-throughput sweep",
    )
    ap.add_argument("--chunk", type=int, default=4096, help="keys per MGET/MSET")
    ap.add_argument("--no-install", action="store_true", help="never apt-get redis-server")
    ap.add_argument("--quick", action="store_true", help="small table, 3 iterations")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.table_rows = 3, max(args.rows, 1 << 17)
    sizes = [int(x) for x in args.batches.split(",") if x.strip()]

    base = {
        "benchmark": "redis",
        "rows": args.rows,
        "dim": args.dim,
        "iters": args.iters,
        "table_rows": args.table_rows,
        "target_ratio": TARGET,
        **_machine(),
    }
    try:
        import redis
    except ImportError:
        print(
            json.dumps(
                {
                    **base,
                    "skipped": True,
                    "meets_target": None,
                    "reason": "the redis Python client is not installed (pip install redis)",
                }
            )
        )
        return 0
    binary, how = find_redis_server(install=not args.no_install)
    if binary is None:
        print(json.dumps({**base, "skipped": True, "meets_target": None, "reason": how}))
        return 0
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()

    import grpc
    from _procs import raw_server, shard_server

    from engram_store.rpc.client import StoreClient
    from engram_store.rpc.config import ClientConfig

    rng = np.random.default_rng(0)
    n_timed = args.iters
    batches = [rng.choice(args.table_rows, args.rows, replace=False) for _ in range(n_timed)]
    grads = rng.standard_normal((args.rows, args.dim)).astype(np.float32) * 1e-2
    spec = TableConfig(
        name="bench",
        num_rows=args.table_rows,
        dim=args.dim,
        optimizer=OptimizerConfig(kind="adam", lr=1e-3),
    )
    all_ids = np.arange(args.table_rows, dtype=np.int64)
    # small batches are cheap: time more of them, so each point is a median of >= 5
    sweep_iters = {bs: max(args.iters, min(20, (1 << 16) // bs)) for bs in sizes}
    sweep_sets = {
        bs: [rng.choice(args.table_rows, bs, replace=False) for _ in range(sweep_iters[bs])]
        for bs in sizes
    }

    with (
        redis_server(binary) as port,
        shard_server() as address,
        raw_server() as raw_address,
        StoreClient(address, ClientConfig()) as client,
    ):
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=120)
        table = RedisTable(r, spec, args.chunk)
        t0 = time.perf_counter()
        table.load(all_ids)
        load_s = time.perf_counter() - t0
        client.create_table(spec)
        # warm both: every row stored with its optimizer state (one zero-gradient push each)
        for lo in range(0, args.table_rows, args.rows):
            ids = all_ids[lo : lo + args.rows]
            zeros = np.zeros((len(ids), args.dim), np.float32)
            client.push("bench", ids, zeros)
            table.push(ids, zeros)
        client.lookup("bench", batches[0])
        table.lookup(batches[0])

        store_lookup = _median_s(lambda i: client.lookup("bench", batches[i]), n_timed)
        redis_lookup = _median_s(lambda i: table.lookup(batches[i]), n_timed)
        store_push = _median_s(lambda i: client.push("bench", batches[i], grads), n_timed)
        redis_push = _median_s(lambda i: table.push(batches[i], grads), n_timed)
        loop_ids = batches[0][:2000].tolist()  # what a client without pipelining would do
        t0 = time.perf_counter()
        for i in loop_ids:
            r.get(b"w%d" % i)
        get_loop = (time.perf_counter() - t0) / len(loop_ids)
        check_ids = np.concatenate([batches[-1][:512], rng.choice(args.table_rows, 512)])
        a, b = client.lookup("bench", check_ids), table.lookup(check_ids)
        max_diff = float(np.max(np.abs(a - b)))
        same_step = client.table_info("bench").step == int(r.get("step"))

        opts = [
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.max_receive_message_length", 1 << 30),
        ]
        sweep = []
        with grpc.insecure_channel(raw_address, options=opts) as ch:
            fetch = ch.unary_unary("/bench.Raw/Fetch")
            for bs, sets in sweep_sets.items():
                nbytes = bs * args.dim * 4
                reqs = [struct.pack("<q", nbytes) + s.astype("<i8").tobytes() for s in sets]
                fetch(reqs[0], timeout=60)
                client.lookup("bench", sets[0])
                table.lookup(sets[0])
                n = len(sets)
                s_s = _median_s(lambda i, sets=sets: client.lookup("bench", sets[i]), n)
                g_s = _median_s(lambda i, reqs=reqs: fetch(reqs[i], timeout=60), n)
                r_s = _median_s(lambda i, sets=sets: table.lookup(sets[i]), n)
                sweep.append(
                    {
                        "batch": bs,
                        "iters": n,
                        "store_rows_per_s": bs / s_s,
                        "raw_grpc_rows_per_s": bs / g_s,
                        "redis_rows_per_s": bs / r_s,
                    }
                )
        redis_mem = int(r.info("memory").get("used_memory", 0))

    lookup_ratio = redis_lookup / store_lookup
    push_ratio = redis_push / store_push
    parser = "hiredis" if getattr(redis.utils, "HIREDIS_AVAILABLE", False) else "python"
    result = {
        **base,
        "skipped": False,
        "redis_server": binary,
        "redis_version": version,
        "redis_how": how,
        "redis_py": redis.__version__,
        "redis_parser": parser,
        "mget_chunk": args.chunk,
        "redis_load_rows_per_s": args.table_rows / load_s,
        "redis_used_memory_bytes": redis_mem,
        "store_lookup_ms": store_lookup * 1e3,
        "redis_lookup_ms": redis_lookup * 1e3,
        "store_lookup_rows_per_s": args.rows / store_lookup,
        "redis_lookup_rows_per_s": args.rows / redis_lookup,
        "store_push_ms": store_push * 1e3,
        "redis_push_ms": redis_push * 1e3,
        "store_push_rows_per_s": args.rows / store_push,
        "redis_push_rows_per_s": args.rows / redis_push,
        "redis_get_loop_rows_per_s": 1 / get_loop,
        "lookup_ratio": lookup_ratio,
        "push_ratio": push_ratio,
        "meets_target": bool(lookup_ratio >= TARGET and push_ratio >= TARGET),
        "rows_match_after_pushes_max_abs_diff": max_diff,
        "same_step": bool(same_step),
        "batch_sweep": sweep,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
