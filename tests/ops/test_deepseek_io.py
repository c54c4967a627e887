"""engram_store/ops/safetensors_io.py against the safetensors package (torch tensors, both fp8
dtypes): headers, row ranges, an index json, truncated files, and files it writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engram_store.engine.errors import InvalidArgument
from engram_store.ops.safetensors_io import INDEX, Checkpoint, SafetensorsWriter, read_header


def _tensors(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    codes = torch.from_numpy(rng.integers(0, 0x7F, size=(300, 64), dtype=np.uint8))
    return {
        "a.weight": codes.view(torch.float8_e4m3fn),
        "a.scale": torch.from_numpy(rng.integers(100, 140, (300, 2), dtype=np.uint8)).view(
            torch.float8_e8m0fnu
        ),
        "b.bf16": torch.randn(17, 5).to(torch.bfloat16),
        "b.f16": torch.randn(9, 3).to(torch.float16),
        "b.f32": torch.randn(4, 4),
    }


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes, one row of bytes per first-axis index."""
    return t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], -1)


def test_reads_what_the_safetensors_package_writes(tmp_path):
    ts = _tensors(np.random.default_rng(0))
    save_file(ts, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    infos, meta = read_header(str(tmp_path / "m.safetensors"))
    assert meta == {"k": "v"}
    want = {"a.weight": "F8_E4M3", "a.scale": "F8_E8M0", "b.bf16": "BF16", "b.f16": "F16"}
    for name, dtype in {**want, "b.f32": "F32"}.items():
        assert infos[name].dtype == dtype and infos[name].shape == tuple(ts[name].shape)
    ckpt = Checkpoint.open(str(tmp_path))  # a directory of plain files
    for name, t in ts.items():
        info = ckpt.tensor(name)
        np.testing.assert_array_equal(ckpt.read_rows(info, 0, info.rows), _raw(t))
        lo, hi = info.rows // 3, info.rows // 3 + 2
        np.testing.assert_array_equal(ckpt.read_rows(info, lo, hi), _raw(t)[lo:hi])


def test_index_json_names_the_file_of_each_tensor(tmp_path):
    ts = _tensors(np.random.default_rng(1))
    save_file({k: ts[k] for k in ("a.weight", "b.f32")}, str(tmp_path / "model-1.safetensors"))
    save_file({k: ts[k] for k in ("a.scale", "b.bf16")}, str(tmp_path / "model-2.safetensors"))
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {
            "a.weight": "model-1.safetensors",
            "b.f32": "model-1.safetensors",
            "a.scale": "model-2.safetensors",
        },
    }
    (tmp_path / INDEX).write_text(json.dumps(index))
    ckpt = Checkpoint.open(str(tmp_path))
    assert sorted(ckpt.tensors) == ["a.scale", "a.weight", "b.f32"]  # only what the index names
    assert ckpt.tensor("a.scale").path.endswith("model-2.safetensors")
    np.testing.assert_array_equal(
        ckpt.read_rows(ckpt.tensor("a.scale"), 5, 9), _raw(ts["a.scale"])[5:9]
    )
    with pytest.raises(InvalidArgument, match="a.bias"):
        ckpt.tensor("a.bias")
    index["weight_map"]["a.bias"] = "model-3.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match="a.bias.*model-3.safetensors.*missing"):
        Checkpoint.open(str(tmp_path))


def test_truncated_and_broken_files_are_refused_naming_what(tmp_path):
    ts = _tensors(np.random.default_rng(2))
    path = tmp_path / "m.safetensors"
    save_file(ts, str(path))
    size = os.path.getsize(path)
    last = max(read_header(str(path))[0].values(), key=lambda t: t.offset)
    os.truncate(path, size - 3)
    with pytest.raises(InvalidArgument, match=f"{last.name}.*truncated"):
        Checkpoint.open(str(tmp_path))
    os.truncate(path, 5)
    with pytest.raises(InvalidArgument, match="too short"):
        read_header(str(path))
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(InvalidArgument, match="truncated or not safetensors"):
        read_header(str(path))
    path.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(InvalidArgument, match="not JSON"):
        read_header(str(path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="no model.safetensors.index.json"):
        Checkpoint.open(str(tmp_path / "empty"))


def test_writer_output_loads_in_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.integers(0, 0x7F, (1000, 32), dtype=np.uint8)
    s = rng.integers(110, 130, (1000, 1), dtype=np.uint8)
    f = rng.standard_normal((10, 3)).astype(np.float32)
    path = str(tmp_path / "out.safetensors")
    spec = [("w", "F8_E4M3", (1000, 32)), ("s", "F8_E8M0", (1000, 1)), ("f", "F32", (10, 3))]
    with SafetensorsWriter(path, spec, {"who": "test"}) as out:
        for lo in (600, 0, 300):  # any order of ranges
            out.write_rows("w", lo, w[lo : min(lo + 300, 1000)])
            out.write_rows("s", lo, s[lo : min(lo + 300, 1000)])
        out.write_rows("w", 900, w[900:])
        out.write_rows("s", 900, s[900:])
        out.write_rows("f", 0, f)
        with pytest.raises(InvalidArgument, match="whole rows"):
            out.write_rows("w", 999, w[:2])
    with safe_open(path, "pt") as g:
        assert g.metadata() == {"who": "test"}
        assert g.get_tensor("w").dtype == torch.float8_e4m3fn
        assert g.get_tensor("s").dtype == torch.float8_e8m0fnu
        np.testing.assert_array_equal(g.get_tensor("w").view(torch.uint8).numpy(), w)
        np.testing.assert_array_equal(g.get_tensor("s").view(torch.uint8).numpy(), s)
        np.testing.assert_array_equal(g.get_tensor("f").numpy(), f)


def test_a_failed_write_leaves_no_file(tmp_path):
    path = str(tmp_path / "out.safetensors")
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("w", "F32", (4, 4))]):
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
