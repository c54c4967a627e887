"""Soak: 8 clients mixing lookups and pushes against one `engram serve` subprocess on loopback.

    pytest -m slow tests/service/test_soak.py -s            # 2 minutes
    ENGRAM_SOAK_S=600 pytest -m slow tests/service/test_soak.py -s

Checks: no client error; the server's anonymous resident memory (RSS less file-backed pages: the
LMDB map's clean page-cache pages that the kernel maps around each commit's read faults count in
RSS but are reclaimable, not leaked) stays within RSS_GROWTH_BOUND of its size at the end of
warm-up (the first quarter of the run); every acknowledged push is in the table
(SGD, lr 1, zero init, integer gradients: each row must equal minus the exact sum of the
gradients pushed to it, whatever the interleaving).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.metrics import scrape, summarize

pytestmark = pytest.mark.slow

DURATION_S = float(os.environ.get("ENGRAM_SOAK_S", "120"))
CLIENTS = 8
ROWS, DIM = 200_000, 16
LOOKUP_IDS, PUSH_IDS = 4096, 2048
RSS_GROWTH_BOUND = 64 << 20  # bytes the server may grow after warm-up (request log, allocator)
TOKEN = "soak-write-token"  # auth and metrics on: the interceptors are part of what is soaked
TABLE = TableConfig(
    name="soak", num_rows=ROWS, dim=DIM, init="zeros", optimizer=OptimizerConfig(kind="sgd", lr=1.0)
)


class Worker(threading.Thread):
    def __init__(self, address: str, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.address, self.rng, self.stop = address, np.random.default_rng(seed), stop
        self.expected = np.zeros((ROWS, DIM), np.float64)  # minus this = rows, exactly
        self.lookups = self.pushes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with StoreClient(self.address, ClientConfig(timeout_s=30, token=TOKEN)) as c:
                while not self.stop.is_set():
                    if self.rng.random() < 0.5:
                        rows = c.lookup("soak", self.rng.integers(0, ROWS, LOOKUP_IDS))
                        assert rows.shape == (LOOKUP_IDS, DIM) and np.isfinite(rows).all()
                        self.lookups += 1
                    else:
                        ids = self.rng.integers(0, ROWS, PUSH_IDS)  # duplicates: summed
                        grads = self.rng.integers(-3, 4, (PUSH_IDS, DIM)).astype(np.float32)
                        c.push("soak", ids, grads, step=1)
                        np.add.at(self.expected, ids, grads)  # only once acknowledged
                        self.pushes += 1
        except BaseException as e:  # reported by the test
            self.error = e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_soak(server_process, tmp_path):
    metrics_port = _free_port()
    server = server_process(
        tmp_path / "shard", "--write-token", TOKEN, "--metrics-port", str(metrics_port)
    )
    proc = psutil.Process(server.proc.pid)
    with StoreClient(server.address, ClientConfig(token=TOKEN)) as c:
        c.create_table(TABLE)
    stop = threading.Event()
    workers = [Worker(server.address, seed, stop) for seed in range(CLIENTS)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    warmup_s = DURATION_S / 4
    samples: list[tuple[float, int]] = []
    while time.monotonic() - t0 < DURATION_S and all(w.is_alive() for w in workers):
        mem = proc.memory_info()  # Linux: shared = file-backed + shmem resident pages
        samples.append((time.monotonic() - t0, mem.rss - mem.shared, mem.rss))
        time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join(60)
    elapsed = time.monotonic() - t0
    errors = [w.error for w in workers if w.error is not None]
    assert not errors, errors

    with StoreClient(server.address, ClientConfig(token=TOKEN)) as c:
        rows = np.concatenate(
            [c.lookup("soak", np.arange(lo, min(lo + 65536, ROWS))) for lo in range(0, ROWS, 65536)]
        )
        stats = c.stats()[0]
    expected = -sum(w.expected for w in workers)
    assert np.abs(expected).max() < 2**24  # float32 holds these integer sums exactly
    np.testing.assert_array_equal(rows, expected.astype(np.float32))

    warm = [anon for t, anon, _ in samples if t >= warmup_s]
    base = warm[0]
    growth = max(warm) - base
    methods = {m["method"]: m for m in stats["methods"]}
    report = {
        "duration_s": round(elapsed, 1),
        "clients": CLIENTS,
        "lookups": sum(w.lookups for w in workers),
        "pushes": sum(w.pushes for w in workers),
        "lookups_per_s": round(sum(w.lookups for w in workers) / elapsed, 1),
        "pushes_per_s": round(sum(w.pushes for w in workers) / elapsed, 1),
        "rows_touched": int((expected != 0).any(axis=1).sum()),
        "anon_rss_mib": {
            "first": round(samples[0][1] / 2**20, 1),
            "after_warmup": round(base / 2**20, 1),
            "max_after_warmup": round(max(warm) / 2**20, 1),
            "end": round(samples[-1][1] / 2**20, 1),
        },
        "anon_rss_growth_after_warmup_mib": round(growth / 2**20, 1),
        "rss_with_file_pages_end_mib": round(samples[-1][2] / 2**20, 1),
        "lookup_ms": {k: methods["Lookup"][k] for k in ("p50_ms", "p99_ms")},
        "push_ms": {k: methods["PushGradients"][k] for k in ("p50_ms", "p99_ms")},
        "errors": {k: m["errors"] for k, m in methods.items() if m["errors"]},
        "lmdb_used_mib": round(stats["used_bytes"] / 2**20, 1),
        "prometheus": {
            m: {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
            for m, d in summarize(scrape(f"127.0.0.1:{metrics_port}", token=TOKEN))[
                "methods"
            ].items()
            if m in ("Lookup", "PushGradients")
        },
    }
    print("\nSOAK " + json.dumps(report))
    assert not report["errors"]
    assert growth <= RSS_GROWTH_BOUND, report
