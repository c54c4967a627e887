"""`engram train --preset deepseek-v4.1-flash` (and its Python API, Preset.train_config +
trainer.launch.train): a small backbone trains against the preset's two full-height tables on real
shards; the store holds only the rows the run touched; flags the preset fixes are refused before
anything starts."""

from __future__ import annotations

import contextlib
import json
import math

import pytest

from engram.cli import main
from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.engine.errors import ConfigError
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ServerConfig
from engram_store.rpc.server import create_server, stop_server
from trainer import presets
from trainer.launch import train

PRESET = "deepseek-v4.1-flash"
HEIGHTS = {"engram_l1": 384_006_168, "engram_l14": 384_016_682}
ROWS_PER_TOKEN = 24  # 3 orders x 8 heads, per layer
FULL_HEIGHT_BYTES = sum(HEIGHTS.values()) * 256 * 2  # the two tables' bf16 rows: ~393 GB


@contextlib.contextmanager
def shard(tmp_path):
    """One in-process shard on 127.0.0.1 (port 0) serving /metrics too; yields
    (address, metrics address)."""
    server, port, sh = create_server(
        ServerConfig(ShardConfig(data_dir=str(tmp_path / "shard")), workers=4, metrics_port=0)
    )
    try:
        yield f"127.0.0.1:{port}", f"127.0.0.1:{server.extras.metrics_port}"
    finally:
        stop_server(server, sh, grace_s=1.0)


def _check_store(summary: dict, tokens: int) -> None:
    """The store after a preset run: full-height tables holding exactly the rows it touched."""
    st = summary["store"]
    assert set(st["tables"]) == set(HEIGHTS)
    for name, t in st["tables"].items():
        assert t["num_rows"] == HEIGHTS[name] and t["dim"] == 256
        assert 0 < t["stored_rows"] == t["touched_rows"] <= tokens * ROWS_PER_TOKEN, t
    assert st["stored_params"] == 256 * st["stored_rows"]
    assert st["bytes_per_param"] == pytest.approx(2 + 4 / 256)  # bf16 row + one Adagrad float
    assert st["memory_bytes"] is not None and st["memory_bytes"] < 2 << 30
    assert st["memory_bytes"] < FULL_HEIGHT_BYTES / 1000  # grows with rows touched, not height
    assert 2 <= st["memory_bytes_per_param"] < 8
    assert math.isfinite(summary["loss_first"]) and math.isfinite(summary["loss_last"])
    assert summary["step_s_median"] > 0 and summary["tokens_per_s"] > 0


def test_train_preset_end_to_end(capsys, tmp_path):
    """The command itself: local Ray, a store cluster of real shards, the preset's tables."""
    pytest.importorskip("ray")
    out = tmp_path / "run"
    code = main(["train", "--preset", PRESET, "--steps", "3", "--batch-size", "2",
                 "--seq-len", "32", "--eval-batches", "1", "--shards", "1",
                 "--out", str(out), "--json"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["steps"] == 3
    _check_store(summary, tokens=3 * 2 * 32)
    for shown in ("touched", "stored of 384,006,168", "B/param", "s/step", "tokens/s"):
        assert shown in printed, printed


def test_the_python_api_trains_and_adopts_imported_tables(tmp_path):
    """Preset.train_config + launch.train on one shard; tables the store already has at the
    preset's geometry (as `engram import --preset` leaves them) are trained as they are stored."""
    preset = presets.get(PRESET)
    with shard(tmp_path) as (address, metrics):
        imported = preset.table_configs(
            dtype="float32", optimizer=OptimizerConfig(kind="rowwise_adagrad", lr=0.05)
        )
        with StoreClient([address]) as c:
            c.create_table(imported[14])
        cfg = preset.train_config(
            store=(address,), store_metrics=(metrics,), steps=2, batch_size=2, seq_len=16,
            eval_batches=0, progress=False, out=str(tmp_path / "run"),
        )  # fmt: skip
        summary = train(cfg)
        with StoreClient([address]) as c:
            held = {t.spec.name: t.spec for t in c.list_tables()}
    assert held["engram_l14"] == imported[14]  # adopted as stored, not replaced
    assert held["engram_l1"].dtype == preset.train_dtype == "bfloat16"
    assert held["engram_l1"].optimizer.kind == "rowwise_adagrad"
    st = summary["store"]
    for name, t in st["tables"].items():
        assert t["num_rows"] == HEIGHTS[name]
        assert 0 < t["stored_rows"] == t["touched_rows"] <= 2 * 2 * 16 * ROWS_PER_TOKEN
    assert st["memory_bytes"] is not None and st["memory_bytes"] < 2 << 30
    assert math.isfinite(summary["loss_last"])


def test_a_store_table_of_another_geometry_is_refused(tmp_path):
    preset = presets.get(PRESET)
    with shard(tmp_path) as (address, _):
        with StoreClient([address]) as c:
            c.create_table(TableConfig(name="engram_l1", dim=256, num_rows=1000))
        cfg = preset.train_config(
            store=(address,), steps=1, batch_size=1, seq_len=8, eval_batches=0,
            progress=False, out=str(tmp_path / "run"),
        )  # fmt: skip
        with pytest.raises(ConfigError, match="engram_l1.*engram table drop"):
            train(cfg)
        with StoreClient([address]) as c:
            assert [t.spec.name for t in c.list_tables()] == ["engram_l1"]  # nothing created
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-ngram", "3"], "--max-ngram"),
        (["--engram-layers", "1"], "--engram-layers"),
        (["--vocab-size", "4096"], "--vocab-size"),
        (["--no-engram"], "--no-engram"),
        (["--layers", "10"], "--layers"),  # block 14 carries an Engram
        (["--corpus", "synthetic"], "--corpus"),
    ],
)
def test_what_the_preset_fixes_is_refused_before_anything_starts(
    no_ray_start, capsys, tmp_path, flags, named
):
    out = tmp_path / "run"
    assert main(["train", "--preset", PRESET, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not out.exists()


def test_an_unknown_preset_names_the_known_ones(no_ray_start, capsys, tmp_path):
    assert main(["train", "--preset", "deepseek-v9", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert PRESET in err and "Traceback" not in err, err
