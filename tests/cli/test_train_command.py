"""`engram train` refuses, before it starts or writes anything, what this install cannot run and
flags that cannot work; `engram runs` lists and cleans the run directories it leaves."""

from __future__ import annotations

import re
import sys

import pytest

from engram.cli import main


@pytest.mark.parametrize(
    "extra",
    [
        [],  # Engram layers without --store: the run starts its own store cluster on Ray
        ["--no-engram", "--ray-train"],  # Ray Train
        ["--no-engram", "--trainers", "2"],
    ],
)
def test_train_without_the_cluster_extra_names_it(monkeypatch, capsys, tmp_path, extra):
    monkeypatch.setitem(sys.modules, "cluster", None)  # import cluster -> ImportError
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "pip install 'engram[cluster]'" in err and "Traceback" not in err, err
    assert not out.exists()  # nothing started, no run directory


def test_train_against_running_shards_needs_no_cluster_extra(monkeypatch, capsys, tmp_path):
    """--store HOST:PORT trains against shards that exist: no Ray, so no cluster extra. (The
    address is dead here: the run gets past the extra check and fails to reach the store, a
    runtime error: exit status 1.)"""
    monkeypatch.setitem(sys.modules, "cluster", None)
    out = tmp_path / "run"
    code = main(["train", "--steps", "1", "--out", str(out), "--store", "127.0.0.1:1",
                 "--corpus", "synthetic"])  # fmt: skip
    err = capsys.readouterr().err
    assert "engram[cluster]" not in err
    assert code == 1 and "127.0.0.1:1" in err, err


# ---- every flag checked before anything starts ----


def _small_corpus(root) -> str:
    """Six short text files: a corpus whose validation split (~5% of documents) is empty."""
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document number {i} is short. " * 30)
    return str(root)


def test_a_corpus_too_small_names_seq_len_before_anything_starts(no_ray_start, capsys, tmp_path):
    out = tmp_path / "run"
    corpus = _small_corpus(tmp_path / "corpus")
    assert main(["train", "--corpus", corpus, "--vocab-size", "300", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--seq-len" in err and "--batch-size" in err and "block size" not in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--minutes", "-1"], "--minutes"),
        (["--eval-batches", "-2"], "--eval-batches"),
        (["--store", "no-port-here"], "--store"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--timeout", "0"], "--timeout"),
        (["--seed", "-1"], "--seed"),
        (["--table-init-std", "-1"], "--table-init-std"),
        (["--table-init-std", "inf"], "--table-init-std"),
    ],
)
def test_bad_flags_are_named_before_anything_starts(no_ray_start, capsys, tmp_path, flags, named):
    out = tmp_path / "run"
    assert main(["train", "--corpus", "synthetic", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not out.exists()


def test_device_cuda_without_a_gpu_is_refused_before_anything_starts(
    no_ray_start, capsys, tmp_path
):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--corpus", "synthetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and not out.exists(), err


def test_a_data_root_in_use_is_refused_before_anything_starts(no_ray_start, capsys, tmp_path):
    from engram_store.ops.layout import lock_data_root

    data = tmp_path / "data"
    with lock_data_root(str(data), {"cluster": "engram"}):  # a live cluster serves it
        code = main(["train", "--corpus", "synthetic", "--data", str(data), "--out",
                     str(tmp_path / "run")])  # fmt: skip
    assert code == 1, capsys.readouterr().err  # a runtime conflict, not a usage error
    assert "--data" in capsys.readouterr().err and not (tmp_path / "run").exists()


# ---- engram runs list | clean ----


def _fake_run(root, name: str, age_days: float, mb: int = 1):
    """A run directory as `engram train` leaves it (a checkpoint), last modified age_days ago."""
    import os
    import time

    run = root / name
    (run / "store").mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"\0" * (mb << 20))
    t = time.time() - age_days * 86400
    os.utime(run, (t, t))
    return run


def test_runs_clean_keeps_the_newest_and_any_run_in_use(capsys, tmp_path):
    import os

    from engram_store.ops.layout import lock_data_root

    runs = tmp_path / "runs"
    newest = _fake_run(runs, "20261201-100000", 0.1)
    live = _fake_run(runs, "20261130-100000", 1)
    old = [_fake_run(runs, f"2026110{i}-100000", 20 + i) for i in range(3)]
    (runs / "notes").mkdir()  # not a run: never touched
    cluster_root = runs / "cluster-data"  # a cluster's data root (its lock names a cluster)
    lock_data_root(str(cluster_root), {"cluster": "engram"}).release()
    lock = lock_data_root(str(live), {"train": str(live)})  # a training run still writing here
    t = newest.stat().st_mtime - 86400
    os.utime(live, (t, t))  # taking the lock touched it: one day older than the newest again
    try:
        assert main(["runs", "list", "--dir", str(runs)]) == 0
        listing = capsys.readouterr().out
        assert "in use" in listing and str(old[0]) in listing and "notes" not in listing
        assert main(["runs", "clean", "--dir", str(runs), "--keep", "1", "--dry-run"]) == 0
        assert all(r.exists() for r in old)  # a dry run removes nothing
        assert "would free 3.0 MB" in capsys.readouterr().out
        assert main(["runs", "clean", "--dir", str(runs), "--keep", "1", "--older-than", "21"]) == 0
        assert old[0].exists() and not old[1].exists() and not old[2].exists()
        assert main(["runs", "clean", "--dir", str(runs), "--keep", "1"]) == 0
        out = capsys.readouterr().out
        assert f"keeping {live}" in out
    finally:
        lock.release()
    assert newest.exists() and live.exists() and not old[0].exists()
    assert (runs / "notes").exists() and cluster_root.exists()


# ---- what a run reports ----

TINY = ["--no-engram", "--corpus", "synthetic", "--vocab-size", "256", "--layers", "1",
        "--width", "32", "--heads", "2", "--seq-len", "16", "--batch-size", "4"]  # fmt: skip


def test_tokens_per_s_and_trainer_metrics_count_training_only(tmp_path):
    """Periodic evaluation's tokens and time stay out of the summary's tokens/s, and the
    TrainerMetrics the loop feeds count exactly the steps and tokens trained."""
    pytest.importorskip("torch")
    from trainer.config import ArchConfig, TrainConfig
    from trainer.loop import train_worker
    from trainer.metrics import TrainerMetrics

    cfg = TrainConfig(
        model=ArchConfig(n_layer=1, n_head=2, n_embd=32, engram_layers=()),
        corpus="synthetic",
        vocab_size=256,
        seq_len=16,
        batch_size=4,
        steps=6,
        eval_batches=20,  # 20 validation batches every 2 steps: more tokens than training's
        eval_every=2,
        log_every=2,
        progress=False,
        out=str(tmp_path / "run"),
    )
    metrics = TrainerMetrics(rank=0)
    s = train_worker(cfg, metrics=metrics)
    trained = 6 * 4 * 16
    assert s["tokens_trained"] == trained and s["eval_s"] > 0
    assert s["tokens_per_s"] == pytest.approx(trained / s["train_s"])
    sample = metrics.registry.get_sample_value
    assert sample("engram_trainer_tokens_total", {"rank": "0"}) == trained
    assert sample("engram_trainer_stall_seconds_count", {"rank": "0"}) == 6


def test_metrics_port_0_prints_the_port_it_bound(capsys, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "run"
    args = ["train", *TINY, "--steps", "2", "--eval-batches", "1", "--out", str(out)]
    assert main([*args, "--metrics-port", "0"]) == 0
    err = capsys.readouterr().err
    found = re.search(r"trainer metrics \(rank 0\) on http://127\.0\.0\.1:(\d+)/metrics", err)
    assert found and int(found.group(1)) > 0, err


@pytest.mark.parametrize(
    "flags, layers",
    [
        ([], (1, 2)),  # the default recipe: blocks 1 and 2
        (["--layers", "2"], (1,)),  # a smaller backbone keeps the default blocks it has
        (["--layers", "1"], (0,)),
        (["--layers", "2", "--engram-layers", "0"], (0,)),
        (["--no-engram"], ()),
    ],
)
def test_default_engram_blocks_follow_the_backbone(flags, layers):
    import argparse
    import dataclasses

    from engram.cli import train as train_cli

    p = argparse.ArgumentParser()
    train_cli.add_commands(p.add_subparsers(dest="command"))
    cfg = train_cli.train_config(p.parse_args(["train", *flags]))
    assert cfg.model.engram_layers == layers
    dataclasses.replace(cfg, store=("127.0.0.1:1",)).validate()  # a config the run accepts


@pytest.mark.parametrize(
    "flag, value",
    [("--table-size", v) for v in ("1", "-5", "lots")]
    + [("--table-lr-mult", v) for v in ("0", "-2", "nan", "inf", "fast")],
)
def test_a_bad_auto_or_number_flag_is_a_usage_error(capsys, tmp_path, flag, value):
    """--table-size and --table-lr-mult take auto or a number; anything else stops the parser."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--corpus", "synthetic", "--out", str(out), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "auto" in err and not out.exists(), err


@pytest.mark.parametrize(
    "flags, mult",
    [([], 0.0), (["--table-lr-mult", "AUTO"], 0.0), (["--table-lr-mult", "7.5"], 7.5)],
)
def test_table_lr_mult_is_auto_unless_given(flags, mult):
    """auto (0) is filled in by TrainConfig.sized from the tokens the run reads."""
    import argparse
    import dataclasses

    from engram.cli import train as train_cli

    p = argparse.ArgumentParser()
    train_cli.add_commands(p.add_subparsers(dest="command"))
    cfg = train_cli.train_config(p.parse_args(["train", *flags]))
    assert cfg.table_lr_mult == mult
    dataclasses.replace(cfg, store=("127.0.0.1:1",)).validate()


@pytest.mark.parametrize(
    "flags, rows", [([], 0), (["--table-size", "auto"], 0), (["--table-size", "3000"], 3000)]
)
def test_table_size_is_auto_unless_given(flags, rows):
    """auto (0) is sized from the corpus once it is read (trainer.config.rows_per_head)."""
    import argparse
    import dataclasses

    from engram.cli import train as train_cli

    p = argparse.ArgumentParser()
    train_cli.add_commands(p.add_subparsers(dest="command"))
    cfg = train_cli.train_config(p.parse_args(["train", *flags]))
    assert cfg.model.table_base_size == rows
    dataclasses.replace(cfg, store=("127.0.0.1:1",)).validate()
