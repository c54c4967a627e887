"""`engram train` refuses, before it starts or writes anything, what this install cannot run."""

from __future__ import annotations

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
    address is dead here: the run gets past the extra check and fails to reach the store.)"""
    monkeypatch.setitem(sys.modules, "cluster", None)
    out = tmp_path / "run"
    code = main(["train", "--steps", "1", "--out", str(out), "--store", "127.0.0.1:1",
                 "--corpus", "synthetic"])  # fmt: skip
    err = capsys.readouterr().err
    assert "engram[cluster]" not in err
    assert code == 2 and "127.0.0.1:1" in err, err
