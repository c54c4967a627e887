"""`engram serve` security flags and `engram snapshot | restore | export` end to end."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
from safetensors.numpy import load_file

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig
from tests.servers import ROOT, engram_command

SPEC = TableConfig(
    name="engram_l2", head_rows=(101, 103), dim=4, optimizer=OptimizerConfig(kind="adagrad", lr=0.1)
)


def engram(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*engram_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_serve_refuses_the_network_without_tokens(tmp_path):
    r = engram("serve", "--data", str(tmp_path / "d"), "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2 and "--insecure" in r.stderr and "--write-token" in r.stderr


def test_snapshot_restore_export_commands(server_process, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("write w-secret\nread r-secret\n")
    tokens.chmod(0o600)
    server = server_process(tmp_path / "d", "--tokens-file", str(tokens))
    with StoreClient(server.address, ClientConfig(token="w-secret")) as c:
        c.create_table(SPEC)
        c.push("engram_l2", np.arange(0, 204, 5), np.ones((41, 4)), step=4)
        expected = c.lookup("engram_l2", np.arange(204))
    r = engram("stats", "--address", server.address)
    assert r.returncode != 0 and "token" in r.stderr
    r = engram(
        "snapshot",
        "--address",
        server.address,
        "--to",
        str(tmp_path / "snap"),
        env={"ENGRAM_TOKEN": "w-secret"},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == {"engram_l2": 4}
    r = engram(
        "restore",
        "--from",
        str(tmp_path / "snap"),
        "--data-root",
        str(tmp_path / "restored"),
        "--shards",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards"] == 2
    r = engram(
        "export",
        "--from",
        str(tmp_path / "snap"),
        "--out",
        str(tmp_path / "o1"),
        "--hash-config",
        '{"layers": [2]}',
    )
    assert r.returncode == 0, r.stderr
    r = engram(
        "export",
        "--address",
        server.address,
        "--token",
        "r-secret",
        "--out",
        str(tmp_path / "o2"),
        "--tables",
        "engram_l2",
    )
    assert r.returncode == 0, r.stderr
    for out in ("o1", "o2"):
        w = load_file(str(tmp_path / out / "engram_l2.safetensors"))["weight"]
        np.testing.assert_array_equal(w, expected)


def test_table_create_preset_makes_both_full_height_tables(server_process, tmp_path):
    server = server_process(tmp_path / "d")
    a = ("--address", server.address, "--preset", "deepseek-v4.1-flash")
    r = engram("table", "create", *a)  # the serving format: fp8 e4m3 + e8m0 scales, no state
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert [(t["spec"]["name"], t["spec"]["num_rows"], t["spec"]["dim"]) for t in made] == [
        ("engram_l1", 384_006_168, 256),
        ("engram_l14", 384_016_682, 256),
    ]
    assert {(t["spec"]["dtype"], t["spec"]["optimizer"]["kind"]) for t in made} == {
        ("float8_e4m3", "sgd")
    }
    assert all(t["stored_rows"] == 0 for t in made)  # nothing is stored until rows are written
    with StoreClient(server.address) as c:
        last = c.lookup("engram_l14", [0, 384_016_681])
        assert last.shape == (2, 256) and np.isfinite(last).all()
    r = engram("table", "create", *a)  # idempotent: the same preset again is accepted
    assert r.returncode == 0, r.stderr
    # the training format on another store: bf16 rows, row-wise Adagrad (one float of state)
    other = server_process(tmp_path / "e")
    r = engram(
        "table", "create", "--address", other.address, "--preset", "deepseek-v4.1-flash",
        "--dtype", "bfloat16",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[1]["spec"]["optimizer"]["kind"] == "rowwise_adagrad"
    r = engram("table", "create", *a, "--name", "x")
    assert r.returncode != 0 and "--name" in r.stderr
    r = engram("table", "create", "--address", server.address, "--preset", "deepseek-v5")
    assert r.returncode != 0 and "deepseek-v4.1-flash" in r.stderr


def test_import_and_export_commands(server_process, tmp_path):
    from tests.ops.test_deepseek_export import read_layer
    from tests.ops.test_deepseek_import import HEADS, make_checkpoint

    data = make_checkpoint(tmp_path / "ckpt", seed=7)
    server = server_process(tmp_path / "d")
    a = ("--address", server.address)
    # the preset's tables are 384 M rows: a small checkpoint does not fit them, and nothing is made
    q = ("--progress", str(tmp_path / "q.json"), "--quiet")
    r = engram(
        "import", "--checkpoint", str(tmp_path / "ckpt"), "--preset", "deepseek-v4.1-flash", *a, *q
    )
    assert r.returncode != 0
    assert "layers.1.engram.embed.weight has shape [3041, 256]" in r.stderr
    assert "[384006168, 256]" in r.stderr
    r = engram("table", "list", *a)
    assert r.returncode == 0 and json.loads(r.stdout) == []
    for layer, heads in HEADS.items():  # without --preset, the tables are the store's own
        r = engram(
            "table", "create", *a, "--name", f"engram_l{layer}", "--head-rows",
            ",".join(map(str, heads)), "--dim", "256", "--dtype", "float8_e4m3",
            "--optimizer", "sgd",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    progress = tmp_path / "p.json"
    ckpt = ("--checkpoint", str(tmp_path / "ckpt"), "--progress", str(progress))
    r = engram("import", *ckpt, *a, "--segment-rows", "1000")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["tables"]
    assert out["engram_l1"]["verified"] and out["engram_l14"]["stored_rows"] == 2052
    assert "engram import: engram_l14 2,052/2,052 rows (100.0%)" in r.stderr
    r = engram("export", "--format", "deepseek-v4.1", *a, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    for layer, (codes, scales) in data.items():
        w, s = read_layer(tmp_path / "out", layer)
        np.testing.assert_array_equal(w, codes)
        np.testing.assert_array_equal(s, scales)
    # a checkpoint without a scale tensor: refused, naming it
    make_checkpoint(tmp_path / "bad", drop="layers.14.engram.embed.scale")
    r = engram("import", "--checkpoint", str(tmp_path / "bad"), *a, *q)
    assert r.returncode != 0 and "layers.14.engram.embed.scale" in r.stderr


def test_query_preset_prints_the_rows_a_text_reads(server_process, tmp_path):
    from trainer.presets import get

    server = server_process(tmp_path / "d")
    a = ("--address", server.address)
    r = engram("table", "create", *a, "--preset", "deepseek-v4.1-flash")
    assert r.returncode == 0, r.stderr
    text = "Alexander the Great"
    r = engram("query", *a, "--preset", "deepseek-v4.1-flash", "--text", text, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    preset = get("deepseek-v4.1-flash")
    tok = preset.load_tokenizer()
    ids = np.array([tok.encode(text, add_special_tokens=False).ids])
    want = preset.hasher(tok).global_ids(ids)
    assert out["tokens"] == [tok.decode([int(t)]) for t in ids[0]]
    with StoreClient(server.address) as c:
        for layer in (1, 14):
            got = out["layers"][str(layer)]
            assert got["dtype"] == "float8_e4m3" and len(got["heads"]) == 24
            assert got["row_ids"] == want[layer][0].tolist()  # (T, 24)
            rows = c.lookup(f"engram_l{layer}", want[layer][0])  # dequantized
            np.testing.assert_allclose(got["norms"], np.linalg.norm(rows, axis=-1), atol=1e-4)
    r = engram("query", *a, "--preset", "deepseek-v4.1-flash", "--text", text)
    assert r.returncode == 0, r.stderr
    assert "layer 14 (table engram_l14, float8_e4m3): 24 row ids per token" in r.stdout
    assert "Alexander" in r.stdout
