"""quality_pair: per-seed losses read from quality.py's JSON and logs, paired by seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
import quality_pair as qp  # noqa: E402
import quality_stats as qs  # noqa: E402

# the lines quality.py logs for a --budget run (results/quality_budget_*.log), with the
# progress noise around them
LOG = """corpus /tmp/debdocs: documents train/tune/val 5680/300/301, tokens 10,258,248/...
reported comparison: 4 runs of 10.00 M tokens
  [1/4] /tmp/debdocs dense_isoflop seed 0: val loss 4.0432, width 136, 10.00 M tokens in 1755 s
  [2/4] /tmp/debdocs engram seed 0: val loss 3.8904, width 128, 10.00 M tokens in 2065 s
  [3/4] /tmp/debdocs dense_isoflop seed 1: val loss 4.1042, width 136, 10.00 M tokens in 1722 s
  [4/4] /tmp/debdocs engram seed 1: val loss 3.8841, width 128, 10.00 M tokens in 2033 s
/tmp/debdocs: engram / dense_isoflop = 0.9543 [0.85, 1.05] over 2 seeds
"""


def _json(path: Path, corpus: str, losses: dict[int, float]) -> Path:
    """A quality.py --engram-only JSON, its val_loss made by quality.spread itself."""
    results = [{"arm": "engram", "seed": s, "val_loss": x} for s, x in losses.items()]
    doc = {"benchmark": "quality", "corpora": {corpus: {"val_loss": {
        "engram": quality.spread(results, "engram")}}}}  # fmt: skip
    path.write_text("some earlier line\n" + json.dumps(doc) + "\n")
    return path


def test_losses_are_read_from_logs_and_from_the_json_by_seed(tmp_path):
    log = tmp_path / "b.log"
    log.write_text(LOG)
    got = qp.read_losses(log)
    assert got == {
        "debdocs": {"dense_isoflop": {0: 4.0432, 1: 4.1042}, "engram": {0: 3.8904, 1: 3.8841}}
    }
    new = qp.read_losses(_json(tmp_path / "n.json", "debdocs", {1: 3.86, 0: 3.87}))
    assert new == {"debdocs": {"engram": {0: 3.87, 1: 3.86}}}


def test_pair_divides_seed_by_seed_and_gives_the_interval(tmp_path):
    log = tmp_path / "b.log"
    log.write_text(LOG)
    new = qp.read_losses(_json(tmp_path / "n.json", "debdocs", {0: 3.87, 1: 3.86}))
    r = qp.pair(new, qp.read_losses(log))["debdocs"]
    iso = r["ratio_vs_dense_isoflop"]
    assert iso["seeds"] == [0, 1] and iso["ratios"] == pytest.approx([3.87 / 4.0432, 3.86 / 4.1042])
    ref = qs.paired_interval([3.87 / 4.0432, 3.86 / 4.1042])
    assert (iso["mean"], iso["lo"], iso["hi"]) == pytest.approx((ref["mean"], ref["lo"], ref["hi"]))
    assert r["meets_target"] == (ref["mean"] <= 0.97 and ref["hi"] < 1.0)
    old = r["vs_baseline_engram"]  # the same seeds of the log's Engram runs (an earlier recipe)
    assert old["ratios"] == pytest.approx([3.87 / 3.8904, 3.86 / 3.8841])
    one = qp.pair({"debdocs": {"engram": {0: 3.87}}}, qp.read_losses(log))["debdocs"]
    assert one["ratio_vs_dense_isoflop"]["n"] == 1 and not one["meets_target"]  # no interval


def test_what_cannot_be_paired_is_an_error_naming_it(tmp_path):
    log = tmp_path / "b.log"
    log.write_text(LOG)
    base = qp.read_losses(log)
    with pytest.raises(ValueError, match=r"no baseline for seed\(s\) \[2\]"):
        qp.pair({"debdocs": {"engram": {0: 3.8, 2: 3.8}}}, base)
    with pytest.raises(ValueError, match="corpus devdocs: not in any baseline"):
        qp.pair({"devdocs": {"engram": {0: 3.8}}}, base)
    empty = tmp_path / "e.log"
    empty.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no per-seed validation losses"):
        qp.read_losses(empty)
    twice = tmp_path / "t.log"
    twice.write_text(LOG + LOG.replace("4.0432", "4.5"))
    with pytest.raises(ValueError, match="dense_isoflop seed 0 has two losses"):
        qp.read_losses(twice)
    with pytest.raises(ValueError, match="seed 0: two different losses"):
        qp.merge([base, {"debdocs": {"engram": {0: 1.0}}}])


def test_the_command_prints_one_json_object_or_names_the_problem(tmp_path):
    log = tmp_path / "b.log"
    log.write_text(LOG)
    new = _json(tmp_path / "n.json", "debdocs", {0: 3.87, 1: 3.86})
    cmd = [sys.executable, str(BENCH / "quality_pair.py"), "--engram", str(new), "--baseline"]
    ok = subprocess.run([*cmd, str(log)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout.strip().splitlines()[-1])
    assert doc["corpora"]["debdocs"]["ratio_vs_dense_isoflop"]["n"] == 2
    bad = subprocess.run([*cmd, str(new)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no dense_isoflop runs" in bad.stderr and not bad.stdout
