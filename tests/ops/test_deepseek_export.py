"""Exporting engram_l<L> tables in the DeepSeek-V4.1 checkpoint layout: fp8 tables byte for byte
as imported, trained tables quantised with the reference blocking (checked against a quantiser
written here with torch's float8_e4m3fn rounding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import InvalidArgument, TableNotFound
from engram_store.ops.deepseek import (
    export_checkpoint,
    import_checkpoint,
    layer_file,
    scale_name,
    weight_name,
)
from engram_store.ops.safetensors_io import INDEX
from tests.ops.test_deepseek_import import DIM, HEADS, lookup_all, make_checkpoint, specs


def torch_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference blocking: per 32 values e = ceil(log2(amax / 448)) (all-zero: -127), scale
    byte e + 127, codes = e4m3fn(x / 2^e) rounded by torch."""
    n, dim = x.shape
    blocks = torch.from_numpy(x).double().reshape(n, dim // 32, 32)
    amax = blocks.abs().amax(dim=2)  # (n, nb)
    m, ex = torch.frexp(amax / 448.0)  # amax / 448 = m 2^ex, m in [0.5, 1): exact in float64
    e = torch.where(m == 0.5, ex - 1, ex).double().clamp(-127, 127)
    e[amax == 0] = -127
    codes = (blocks / torch.exp2(e)[:, :, None]).float().to(torch.float8_e4m3fn)
    return codes.view(torch.uint8).reshape(n, dim).numpy(), (e + 127).to(torch.uint8).numpy()


def read_layer(out_dir, layer: int) -> tuple[np.ndarray, np.ndarray]:
    with safe_open(str(out_dir / layer_file(layer)), "pt") as f:
        w, s = f.get_tensor(weight_name(layer)), f.get_tensor(scale_name(layer))
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    return w.view(torch.uint8).numpy(), s.view(torch.uint8).numpy()


def test_fp8_import_then_export_is_byte_identical(make_shard, tmp_path):
    from tests.ops.test_deepseek_import import CLIENT, StoreClient, make_cluster

    data = make_checkpoint(tmp_path / "ckpt", seed=5)
    shards = make_cluster(make_shard, 2)
    with StoreClient(shards[0].address, CLIENT) as c:
        import_checkpoint(c, str(tmp_path / "ckpt"), specs("float8_e4m3"), str(tmp_path / "p"))
        paths = export_checkpoint(
            c, str(tmp_path / "out"), {1: "engram_l1", 14: "engram_l14"}, 1000
        )
    assert [p.rsplit("/", 1)[-1] for p in paths] == [layer_file(1), layer_file(14)]
    for layer, (codes, scales) in data.items():
        w, s = read_layer(tmp_path / "out", layer)
        assert w.shape == (sum(HEADS[layer]), DIM) and s.shape == (sum(HEADS[layer]), DIM // 32)
        np.testing.assert_array_equal(w, codes)
        np.testing.assert_array_equal(s, scales)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["weight_map"] == {
        weight_name(1): layer_file(1),
        scale_name(1): layer_file(1),
        weight_name(14): layer_file(14),
        scale_name(14): layer_file(14),
    }


def test_a_trained_table_is_quantised_with_the_reference_blocking(make_shard, tmp_path):
    from tests.ops.test_deepseek_import import CLIENT, StoreClient, make_cluster

    make_checkpoint(tmp_path / "ckpt", seed=6)
    shards = make_cluster(make_shard, 2)
    with StoreClient(shards[0].address, CLIENT) as c:
        import_checkpoint(c, str(tmp_path / "ckpt"), specs("bfloat16", "sgd"), str(tmp_path / "p"))
        rng = np.random.default_rng(0)
        ids = rng.choice(sum(HEADS[1]), 500, replace=False)
        grads = rng.standard_normal((500, DIM)).astype(np.float32)
        grads[0] = 0.0
        c.push("engram_l1", ids, grads * 50, step=1)  # some rows train away from the checkpoint
        # a table never imported: every row is its deterministic initial value
        fresh = TableConfig(
            name="engram_l3", head_rows=(97, 101), dim=DIM, dtype="float32",
            init_std=0.02, optimizer=OptimizerConfig(kind="adam"),
        )  # fmt: skip
        c.create_table(fresh)
        c.push("engram_l3", [5], np.full((1, DIM), 0.5))
        served = {n: lookup_all(c, n, r) for n, r in (("engram_l1", 3041), ("engram_l3", 198))}
        export_checkpoint(c, str(tmp_path / "out"), {1: "engram_l1", 3: "engram_l3"}, 700)
    for layer, name in ((1, "engram_l1"), (3, "engram_l3")):
        codes, scales = torch_quant(served[name])
        w, s = read_layer(tmp_path / "out", layer)
        np.testing.assert_array_equal(s, scales)
        np.testing.assert_array_equal(w, codes)


def test_export_refuses_what_the_layout_cannot_hold(make_shard, tmp_path):
    from tests.ops.test_deepseek_import import CLIENT, StoreClient

    with StoreClient(make_shard().address, CLIENT) as c:
        c.create_table(TableConfig(name="engram_l2", num_rows=10, dim=48))
        with pytest.raises(InvalidArgument, match="dim 48.*multiple of 32"):
            export_checkpoint(c, str(tmp_path / "o"), {2: "engram_l2"})
        with pytest.raises(TableNotFound, match="engram_l9"):
            export_checkpoint(c, str(tmp_path / "o"), {9: "engram_l9"})
