"""Serving DeepSeek-V4.1-Flash's Engram tables from one shard: tokens/s and bytes/token per wire
format, against a raw gRPC reply of the same bytes.

    python benchmarks/bench_serve_v41.py [--text-tokens 32768] [--tokens 1024] [--iters 8]
                                         [--repeats 5] [--quick]

The geometry is the `deepseek-v4.1-flash` preset's (trainer/presets.py): both Engram tables at
full height (384,006,168 and 384,016,682 rows of 256 values, created from the preset's
table_configs in their serving format, float8_e4m3), 24 row ids per token per layer, so 48 rows
per token. The row ids are real: the first `--text-tokens` tokens of an offline English text (the
docstrings of a few stdlib modules, then the Python help topics of pydoc_data) encoded with the
preset's DeepSeek tokenizer and hashed with its hash config (trainer.hashing).

Setup: `engram serve` in a subprocess on 127.0.0.1 creates the two tables and stores, through
ImportRows, every row those tokens address (fp8 e4m3 codes + e8m0 scales, 264 B a row, the
quantised values of N(0, --row-std) draws: the checkpoint's format). It is then stopped and
started again `--read-only` on the same data directory, the way a serving node runs, so every
lookup gathers imported rows.

Each iteration looks up one batch of `--tokens` consecutive tokens the way an inference client
does: per layer one Lookup of its tokens x 24 ids (duplicates included: a model reads 48 rows
a token), the rows returned in wire format fp8 (codes + scales as stored, 264 B), bf16 (512 B,
converted by the shard) or fp32 (1024 B), a view of the answer. The baseline is
benchmarks/raw_server.py answering the same requests (ids in, as many prebuilt bytes out, no
protobuf on either side). Methods alternate within an iteration so they share the load. Both
sides are warm with reused buffers: untimed first calls, and glibc's mmap and trim thresholds
raised in every process (bench_lookup.TUNABLES), so a freed message buffer is reused. For fp8 a
variant `dedup` makes the client's default call instead: each distinct id sent once (about 84% of
a 1024-token batch's ids), the answer expanded to every id, against the same raw baseline.

Each repeat takes the median of `--iters` calls per method; the JSON reports per format tokens/s
and bytes/token of the shard (min and median over `--repeats`), the ratio raw time / store time
per repeat (min and median), whether the served rows equal the stored ones, the shard's stored
rows and bytes (what the touched rows cost it, not the 768 M-row height), and the load average.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import resource
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import grpc
import numpy as np
from _procs import _engram, raw_server, server
from bench_lookup import TUNABLES

from engram_store.engine import init, kernels
from engram_store.engine.config import TableConfig, row_bytes
from engram_store.rpc import wire
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb

PRESET = "deepseek-v4.1-flash"
FORMATS = ("float8_e4m3", "bfloat16", "float32")
#: stdlib modules whose docstrings open the text (then pydoc_data's help topics)
DOC_MODULES = (
    "argparse",
    "collections",
    "json",
    "logging",
    "subprocess",
    "textwrap",
    "unittest",
    "typing",
    "asyncio",
    "pathlib",
    "re",
    "threading",
    "inspect",
    "doctest",
    "pickle",
    "decimal",
    "datetime",
    "csv",
    "optparse",
)
_IMPORT_BATCH = 1 << 14  # rows per ImportRows message (~4 MB of fp8 records)
_OPTS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


def corpus_text() -> str:
    """The offline text whose tokens address the rows: stdlib docstrings, then pydoc topics."""
    from pydoc_data.topics import topics

    docs = [importlib.import_module(m).__doc__ or "" for m in DOC_MODULES]
    return "\n\n".join(docs + [topics[k] for k in sorted(topics)])


@dataclass(frozen=True)
class Workload:
    """Row ids the tokens of a text read: per layer (table name), int64 (tokens, 24)."""

    tokens: int
    ids: Mapping[str, np.ndarray]

    @property
    def rows_per_token(self) -> int:
        return sum(a.shape[1] for a in self.ids.values())

    def batch(self, i: int, size: int) -> dict[str, np.ndarray]:
        """Flat row ids per table of batch i (tokens [i * size, (i + 1) * size), cycling)."""
        n = self.tokens // size
        lo = (i % n) * size
        return {t: a[lo : lo + size].reshape(-1) for t, a in self.ids.items()}


def workload(text: str, max_tokens: int, specs: Mapping[int, TableConfig], hasher, tok) -> Workload:
    """Encode `text` with `tok`, keep the first `max_tokens` tokens and hash them as one sequence
    with `hasher` (an NgramHasher): {table: global row ids (tokens, heads per layer)}."""
    ids = np.asarray(tok.encode(text).ids[:max_tokens], np.int64)
    if ids.size < max_tokens:
        raise SystemExit(f"the text has {ids.size} tokens; ask for --text-tokens <= {ids.size}")
    hashed = hasher.global_ids(ids[None, :])
    return Workload(int(ids.size), {specs[layer].name: g[0] for layer, g in hashed.items()})


def synthetic_rows(spec: TableConfig, ids: np.ndarray, std: float, seed: int) -> np.ndarray:
    """fp8 records (n, dim + dim / 32) for row ids `ids`: N(0, std) values, deterministic per
    (id, seed), quantised by the engine's encoder (one power-of-two scale per 32 values). The
    values come from the engine's initialiser under another seed than the table's, so a stored
    row differs from the one the shard computes for a never-stored id."""
    source = dataclasses.replace(spec, seed=spec.seed + 1 + seed, init_std=std, init="normal")
    out = np.empty((ids.shape[0], row_bytes("float8_e4m3", spec.dim)), np.uint8)
    step = 1 << 15
    for lo in range(0, ids.shape[0], step):
        part = ids[lo : lo + step]
        kernels.encode(init.initial_rows(source, part), "float8_e4m3", out[lo : lo + part.size])
    return out


def import_rows(address: str, table: str, ids: np.ndarray, rows: np.ndarray) -> int:
    """Store `rows` (fp8 records of an sgd table: no optimizer state) at `ids` through one
    ImportRows stream; returns the rows the shard acknowledged."""
    batches = (
        pb.RowBatch(
            table=table,
            ids=wire.pack_ids(ids[lo : lo + _IMPORT_BATCH]),
            records=np.ascontiguousarray(rows[lo : lo + _IMPORT_BATCH]).tobytes(),
            record_bytes=rows.shape[1],
        )
        for lo in range(0, ids.shape[0], _IMPORT_BATCH)
    )
    with grpc.insecure_channel(address, options=_OPTS) as channel:
        from engram_store.rpc.proto import store_pb2_grpc

        return store_pb2_grpc.MemoryStoreStub(channel).ImportRows(batches, timeout=3600).rows


def import_workload(
    client: StoreClient, address: str, specs: Mapping[int, TableConfig], work: Workload, args
) -> dict[str, dict]:
    """Create the tables and import every row the workload reads; per table: rows imported,
    seconds, rows/s and the shard's stored_rows afterwards."""
    out = {}
    for spec in specs.values():
        client.create_table(spec)
        uniq = np.unique(work.ids[spec.name])
        rows = synthetic_rows(spec, uniq, args.row_std, args.seed)
        t0 = time.perf_counter()
        acked = import_rows(address, spec.name, uniq, rows)
        seconds = time.perf_counter() - t0
        out[spec.name] = {
            "num_rows": spec.num_rows,
            "rows_imported": acked,
            "import_s": round(seconds, 3),
            "import_rows_per_s": round(acked / seconds),
            "stored_rows": client.table_info(spec.name).stored_rows,
        }
    return out


def expected_rows(fp8: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """Stored fp8 records as the shard serves them in wire dtype `dtype` (uint8 rows)."""
    out = np.empty((fp8.shape[0], row_bytes(dtype, dim)), np.uint8)
    return kernels.convert(fp8, "float8_e4m3", dtype, dim, out)


def methods_for(
    client: StoreClient, fetch: Callable, work: Workload, tables: list[str], size: int, iters: int
) -> dict[str, Callable[[int], int]]:
    """store_<fmt> and raw_<fmt> per wire format, and dedup_float8_e4m3 (the client's default
    call: duplicate ids sent once, the answer expanded to every id): one call serves batch i of
    both layers and returns the bytes of the rows it returns."""
    batches = [work.batch(i, size) for i in range(iters)]
    methods: dict[str, Callable[[int], int]] = {}
    for fmt in FORMATS:
        rb = row_bytes(fmt, 256)
        reqs = [
            [struct.pack("<q", b[t].size * rb) + b[t].astype("<i8").tobytes() for t in tables]
            for b in batches
        ]

        def store(i: int, fmt=fmt) -> int:
            return sum(
                client.lookup(t, batches[i][t], fmt, unique=True, raw=True, view=True).nbytes
                for t in tables
            )

        def raw(i: int, reqs=reqs) -> int:
            return sum(len(fetch(r, timeout=60)) for r in reqs[i])

        methods[f"store_{fmt}"], methods[f"raw_{fmt}"] = store, raw

    def dedup(i: int) -> int:  # each distinct row sent once; the client expands the answer
        return sum(client.lookup(t, batches[i][t], FORMATS[0], raw=True).nbytes for t in tables)

    methods[f"dedup_{FORMATS[0]}"] = dedup
    return methods


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(
    methods: Mapping[str, Callable[[int], object]], iters: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per method: the median seconds of each repeat, and this process's minor page faults per
    call. Methods alternate within an iteration, so that they see the same load."""
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


def _stats(seconds: list[float], tokens: int) -> dict:
    lo, med = min(seconds), float(np.median(seconds))
    return {
        "ms_min": lo * 1e3,
        "ms_median": med * 1e3,
        "tokens_per_s_max": tokens / lo,
        "tokens_per_s_median": tokens / med,
    }


@contextlib.contextmanager
def serving_shard(data: str, *extra: str) -> Iterator[str]:
    """`engram serve` on 127.0.0.1 over data directory `data`."""
    cmd = [*_engram(), "serve", "--data", data, "--port", "0", *extra]
    with server(cmd) as address:
        yield address


def run(args: argparse.Namespace) -> dict:
    """The benchmark (see the module docstring); returns its JSON object."""
    from trainer import presets

    preset = presets.get(PRESET)
    specs = preset.table_configs()  # serving format: float8_e4m3, no optimizer state
    tables = [s.name for s in specs.values()]
    tok = preset.load_tokenizer()
    t0 = time.perf_counter()
    work = workload(corpus_text(), args.text_tokens, specs, preset.hasher(tok), tok)
    hash_s = time.perf_counter() - t0
    if work.tokens < args.tokens:
        raise SystemExit(f"--tokens {args.tokens} is more than --text-tokens {work.tokens}")
    iters = args.iters
    os.environ["GLIBC_TUNABLES"] = TUNABLES  # the servers inherit it
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="engram-bench-v41-") as data:
        with serving_shard(data) as address, StoreClient(address, ClientConfig()) as client:
            imported = import_workload(client, address, specs, work, args)
        with (
            serving_shard(data, "--read-only") as address,
            raw_server() as raw_address,
            StoreClient(address, ClientConfig()) as client,
            grpc.insecure_channel(raw_address, options=_OPTS) as channel,
        ):
            fetch = channel.unary_unary("/bench.Raw/Fetch")
            methods = methods_for(client, fetch, work, tables, args.tokens, iters)
            got = {name: fn(0) for name, fn in methods.items()}  # untimed: first calls
            for fn in methods.values():
                fn(1 % iters)
            check = check_rows(client, work, specs, args)
            medians, faults = measure(methods, iters, args.repeats)
            shard_stats = client.stats()[0]
            server_stats = {m["method"]: m for m in shard_stats["methods"]}["Lookup"]
    load_after = os.getloadavg()

    per_format = {}
    for fmt in FORMATS:
        s, r = medians[f"store_{fmt}"], medians[f"raw_{fmt}"]
        ratios = [b / a for a, b in zip(s, r, strict=True)]  # per repeat: same load
        rb = row_bytes(fmt, preset.dim)
        per_format[fmt] = {
            "row_bytes": rb,
            "bytes_per_token": got[f"store_{fmt}"] // args.tokens,
            "raw_bytes_per_token": got[f"raw_{fmt}"] // args.tokens,
            "store": _stats(s, args.tokens),
            "raw_grpc": _stats(r, args.tokens),
            "store_mb_per_s_median": got[f"store_{fmt}"] / float(np.median(s)) / 1e6,
            "store_faults_per_call": faults[f"store_{fmt}"],
            "raw_faults_per_call": faults[f"raw_{fmt}"],
            "ratio_min": min(ratios),
            "ratio_median": float(np.median(ratios)),
            "rows_match_stored": check[fmt],
        }
    distinct = [
        np.unique(ids).size / ids.size
        for i in range(iters)
        for ids in work.batch(i, args.tokens).values()
    ]
    fp8, d = per_format[FORMATS[0]], medians[f"dedup_{FORMATS[0]}"]
    ratios = [b / a for a, b in zip(d, medians[f"raw_{FORMATS[0]}"], strict=True)]
    fp8["dedup"] = {
        "bytes_per_token": got[f"dedup_{FORMATS[0]}"] // args.tokens,
        "wire_bytes_per_token": float(np.mean(distinct)) * fp8["bytes_per_token"],
        "store": _stats(d, args.tokens),
        "faults_per_call": faults[f"dedup_{FORMATS[0]}"],
        "ratio_min": min(ratios),
        "ratio_median": float(np.median(ratios)),
    }
    return {
        "benchmark": "serve_v41",
        "preset": PRESET,
        "shards": 1,
        "read_only": True,
        "storage_dtype": preset.serve_dtype,
        "table_rows": {s.name: s.num_rows for s in specs.values()},
        "dim": preset.dim,
        "rows_per_token": work.rows_per_token,
        "text_tokens": work.tokens,
        "tokens_per_lookup": args.tokens,
        "distinct_row_fraction_per_lookup": float(np.mean(distinct)),
        "iters": iters,
        "repeats": args.repeats,
        "hash_s": round(hash_s, 3),
        "tables": imported,
        "formats": per_format,
        "server_lookup_p50_ms": server_stats["p50_ms"],
        "server_lookup_p99_ms": server_stats["p99_ms"],
        "shard_stored_rows": shard_stats["stored_rows"],
        "shard_stored_bytes": shard_stats["stored_bytes"],
        "shard_used_bytes": shard_stats["used_bytes"],
        "tokens_per_s_fp8": per_format["float8_e4m3"]["store"]["tokens_per_s_median"],
        "ratio_fp8_vs_raw_grpc": per_format["float8_e4m3"]["ratio_median"],
        "ratio_bf16_vs_raw_grpc": per_format["bfloat16"]["ratio_median"],
        "ratio_fp32_vs_raw_grpc": per_format["float32"]["ratio_median"],
        "ratio_fp8_dedup_vs_raw_grpc": fp8["dedup"]["ratio_median"],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def check_rows(
    client: StoreClient, work: Workload, specs: Mapping[int, TableConfig], args
) -> dict[str, bool]:
    """Per wire format: whether the rows served for the first batch equal the stored records
    (fp8 byte for byte, also through the deduplicating call; bf16 and fp32 as the records
    convert)."""
    ok = dict.fromkeys(FORMATS, True)
    for spec in specs.values():
        ids = work.batch(0, args.tokens)[spec.name]
        fp8 = synthetic_rows(spec, ids, args.row_std, args.seed)
        for fmt in FORMATS:
            got = client.lookup(spec.name, ids, fmt, unique=True, raw=True)
            want = expected_rows(fp8, fmt, spec.dim)
            ok[fmt] &= bool(np.array_equal(got.view(np.uint8).reshape(want.shape), want))
        dedup = client.lookup(spec.name, ids, FORMATS[0], raw=True)
        ok[FORMATS[0]] &= bool(np.array_equal(dedup, fp8))
    return ok


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-tokens", type=int, default=32768, help="tokens of text hashed")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per lookup (x 48 rows)")
    ap.add_argument("--iters", type=int, default=8, help="timed calls per method per repeat")
    ap.add_argument("--repeats", type=int, default=5, help="repeats (min/median over them)")
    ap.add_argument("--row-std", type=float, default=0.02, help="std of the synthetic rows")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4096 tokens, 3 x 3 calls")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.text_tokens, args.tokens, args.iters, args.repeats = 4096, 512, 3, 3
    if min(args.text_tokens, args.tokens, args.iters, args.repeats) < 1:
        raise SystemExit("--text-tokens, --tokens, --iters and --repeats must be >= 1")
    print(json.dumps(run(args)))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
