"""Importing DeepSeek-V4.1-layout checkpoints (engram_store/ops/deepseek.py): synthetic checkpoints
in the exact tensor layout (names, F8_E4M3 rows + F8_E8M0 scales per 32 values, an index json,
small row counts), stored rows checked against torch's own fp8 conversion; interrupted imports
resumed; bad checkpoints refused with nothing stored."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import ConfigError, EngramError, InvalidArgument
from engram_store.ops.deepseek import import_checkpoint, row_digest, scale_name, weight_name
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from tests.ops.test_snapshot import make_cluster

DIM = 256
HEADS = {1: (1009, 1013, 1019), 14: (1021, 1031)}  # two layers of small prime heads
CLIENT = ClientConfig(max_batch_rows=4096, retries=2, backoff_s=0.01)


def specs(dtype: str, kind: str = "sgd") -> dict[int, TableConfig]:
    return {
        layer: TableConfig(
            name=f"engram_l{layer}",
            head_rows=heads,
            dim=DIM,
            dtype=dtype,
            optimizer=OptimizerConfig(kind=kind, lr=0.1),
        )
        for layer, heads in HEADS.items()
    }


def make_checkpoint(root, seed: int = 0, drop: str = "", dtype_of: dict | None = None, extra=0):
    """Two safetensors files + model.safetensors.index.json in the V4.1 layout; returns
    {layer: (codes uint8 (rows, 256), scales uint8 (rows, 8))}. `drop` leaves a tensor out,
    `dtype_of` stores a tensor in another torch dtype, `extra` adds rows to layer 14."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    data, files, weight_map = {}, {}, {}
    for i, (layer, heads) in enumerate(HEADS.items()):
        n = sum(heads) + (extra if layer == 14 else 0)
        codes = rng.integers(0, 256, (n, DIM), dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
        scales = rng.integers(112, 132, (n, DIM // 32), dtype=np.uint8)
        data[layer] = (codes, scales)
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        tensors = {
            weight_name(layer): torch.from_numpy(codes).view(torch.float8_e4m3fn),
            scale_name(layer): torch.from_numpy(scales).view(torch.float8_e8m0fnu),
            f"layers.{layer}.attn.wq.weight": torch.randn(8, 8).to(torch.bfloat16),
        }
        for name, dt in (dtype_of or {}).items():
            if name in tensors:
                tensors[name] = tensors[name].view(torch.uint8).to(dt)
        tensors.pop(drop, None)
        files[fname] = tensors
        weight_map.update({name: fname for name in tensors})
    for fname, tensors in files.items():
        save_file(tensors, os.path.join(root, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return data


def torch_dequant(codes: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    """Independent dequantization: torch's float8_e4m3fn and float8_e8m0fnu conversions."""
    w = torch.from_numpy(codes).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(scales).view(torch.float8_e8m0fnu).float()
    return w * s.repeat_interleave(32, dim=1)


def lookup_all(c: StoreClient, name: str, n: int) -> np.ndarray:
    return np.concatenate(
        [c.lookup(name, np.arange(i, min(i + 4000, n))) for i in range(0, n, 4000)]
    )


@pytest.fixture
def store(make_shard):
    shards = make_cluster(make_shard, 2)
    with StoreClient(shards[0].address, CLIENT) as c:
        yield c


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_import_dequantized_for_training(store, tmp_path, dtype):
    data = make_checkpoint(tmp_path / "ckpt")
    seen = []
    out = import_checkpoint(
        store,
        str(tmp_path / "ckpt"),
        specs(dtype, "adam"),
        str(tmp_path / "progress.json"),
        chunk_rows=700,
        segment_rows=1500,
        on_progress=lambda t, done, total: seen.append((t, done, total)),
    )
    for layer, (codes, scales) in data.items():
        name, n = f"engram_l{layer}", codes.shape[0]
        assert out[name]["verified"] and out[name]["stored_rows"] == n == out[name]["rows_sent"]
        want = torch_dequant(codes, scales)
        if dtype == "bfloat16":  # round to nearest even, as torch rounds
            want = want.to(torch.bfloat16).float()
        np.testing.assert_array_equal(lookup_all(store, name, n), want.numpy())
        assert store.table_info(name).spec.dtype == dtype
    assert seen[-1] == ("engram_l14", 2052, 2052) and seen[0] == ("engram_l1", 1500, 3041)


def test_import_keeps_fp8_rows_for_serving(store, tmp_path):
    data = make_checkpoint(tmp_path / "ckpt", seed=4)
    out = import_checkpoint(
        store, str(tmp_path / "ckpt"), specs("float8_e4m3"), str(tmp_path / "p.json")
    )
    for layer, (codes, scales) in data.items():
        name, n = f"engram_l{layer}", codes.shape[0]
        assert out[name]["verified"]
        assert store.table_info(name).stored_bytes >= n * 264
        rows = lookup_all(store, name, n)
        np.testing.assert_array_equal(rows, torch_dequant(codes, scales).numpy())


def test_an_interrupted_import_resumes_where_it_stopped(store, tmp_path):
    data = make_checkpoint(tmp_path / "ckpt", seed=1)
    args = (str(tmp_path / "ckpt"), specs("float32", "adagrad"), str(tmp_path / "p.json"))
    calls = []

    def interrupt(table, done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two segments of layer 1

    with pytest.raises(KeyboardInterrupt):
        import_checkpoint(store, *args, segment_rows=1000, on_progress=interrupt)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["done"]["engram_l1"]["segments"] == [0, 1] and not saved["verified"]
    out = import_checkpoint(store, *args, segment_rows=1000)
    assert out["engram_l1"]["rows_resumed"] == 2000 and out["engram_l1"]["rows_sent"] == 1041
    assert out["engram_l14"]["rows_resumed"] == 0 and out["engram_l14"]["verified"]
    codes, scales = data[1]
    np.testing.assert_array_equal(
        lookup_all(store, "engram_l1", 3041), torch_dequant(codes, scales).numpy()
    )
    # a resumed import with other settings is refused, not mixed in
    with pytest.raises(ConfigError, match="different segment_rows.*--restart"):
        import_checkpoint(store, *args, segment_rows=999)


def test_verification_catches_rows_that_changed(store, tmp_path):
    make_checkpoint(tmp_path / "ckpt", seed=2)
    args = (str(tmp_path / "ckpt"), specs("float32"), str(tmp_path / "p.json"))
    import_checkpoint(store, *args)
    store.push("engram_l14", [7], np.ones((1, DIM)))  # sgd: row 7 moves
    with pytest.raises(EngramError, match="engram_l14: verification failed"):
        import_checkpoint(store, *args)  # every segment recorded: only the check runs
    out = import_checkpoint(store, *args, restart=True)
    assert out["engram_l14"]["verified"] and out["engram_l14"]["rows_resumed"] == 0


@pytest.mark.parametrize(
    "make,match",
    [
        (
            dict(dtype_of={weight_name(14): torch.bfloat16}),
            r"layers\.14\.engram\.embed\.weight is BF16",
        ),
        (dict(extra=1), r"layers\.14\.engram\.embed\.weight has shape \[2053, 256\]"),
        (dict(drop=scale_name(1)), r"no layers\.1\.engram\.embed\.scale"),
        (dict(drop=weight_name(14)), r"no tensor 'layers\.14\.engram\.embed\.weight'"),
        (dict(truncate=True), r"layers\.14\.engram\.embed\.(weight|scale).* truncated"),
    ],
)
def test_bad_checkpoints_are_refused_and_nothing_is_stored(store, tmp_path, make, match):
    make = dict(make)
    truncate = make.pop("truncate", False)
    make_checkpoint(tmp_path / "ckpt", **make)
    if truncate:
        os.truncate(tmp_path / "ckpt" / "model-00002-of-00002.safetensors", 100_000)
    with pytest.raises(InvalidArgument, match=match):
        import_checkpoint(store, str(tmp_path / "ckpt"), specs("float32"), str(tmp_path / "p"))
    assert store.list_tables() == [] and not (tmp_path / "p").exists()


def test_nan_codes_are_refused_naming_the_row(store, tmp_path):
    root = tmp_path / "ckpt"
    data = make_checkpoint(root, seed=3)
    codes, scales = data[1]
    codes[2500, 17] = 0xFF
    save_file(
        {
            weight_name(1): torch.from_numpy(codes).view(torch.float8_e4m3fn),
            scale_name(1): torch.from_numpy(scales).view(torch.float8_e8m0fnu),
            "layers.1.attn.wq.weight": torch.zeros(8, 8).to(torch.bfloat16),
        },
        str(root / "model-00001-of-00002.safetensors"),
    )
    with pytest.raises(InvalidArgument, match=r"layers\.1\.engram\.embed\.weight row 2500"):
        import_checkpoint(
            store, str(root), specs("float32"), str(tmp_path / "p"), segment_rows=1000
        )


def test_row_digest_is_order_and_split_independent():
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)
    rows = rng.integers(0, 256, (1000, 264), dtype=np.uint8)
    whole = row_digest(ids, rows)
    parts = sum(row_digest(ids[i::3], rows[i::3]) for i in range(3)) % 2**64
    assert whole == parts
    rows[500, 100] ^= 1
    assert row_digest(ids, rows) != whole
    assert row_digest(ids[::-1].copy(), rows[::-1]) == row_digest(ids, rows)
