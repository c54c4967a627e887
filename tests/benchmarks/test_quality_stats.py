"""benchmarks/quality_stats.py on small inputs with known answers (and brute force where cheap)."""

import math
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality_stats as qs  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


# -- Student-t ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "df, expected",
    [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (9, 2.262157), (29, 2.045230)],
)
def test_t_quantile_975_matches_tables(df, expected):
    assert qs.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("df, expected", [(2, 2.919986), (5, 2.015048), (30, 1.697261)])
def test_t_quantile_95_matches_tables(df, expected):
    assert qs.t_quantile(0.95, df) == pytest.approx(expected, abs=2e-6)


def test_t_cdf_is_symmetric_and_inverts_the_quantile():
    assert qs.t_cdf(0.0, 7) == pytest.approx(0.5)
    assert qs.t_cdf(-1.3, 7) == pytest.approx(1 - qs.t_cdf(1.3, 7))
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t) / pi
    assert qs.t_cdf(2.0, 1) == pytest.approx(0.5 + math.atan(2.0) / math.pi, abs=1e-12)
    for p in (0.6, 0.9, 0.995):
        assert qs.t_cdf(qs.t_quantile(p, 4), 4) == pytest.approx(p, abs=1e-10)
    assert qs.t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=2e-6)


def test_paired_interval_values():
    r = [1.0, 1.02, 0.98, 1.04]
    out = qs.paired_interval(r)
    sd = float(np.std(r, ddof=1))
    assert out["n"] == 4 and out["confidence"] == 0.95
    assert out["mean"] == pytest.approx(1.01)
    assert out["sd"] == pytest.approx(sd)
    half = 3.182446 * sd / 2.0
    assert out["half_width"] == pytest.approx(half, rel=1e-6)
    assert out["lo"] == pytest.approx(1.01 - half, rel=1e-6)
    assert out["hi"] == pytest.approx(1.01 + half, rel=1e-6)
    narrow = qs.paired_interval(r, confidence=0.90)
    assert narrow["half_width"] < out["half_width"]


def test_paired_interval_one_seed_has_no_interval():
    out = qs.paired_interval([0.97])
    assert out["mean"] == 0.97 and out["n"] == 1
    assert out["lo"] is None and out["hi"] is None and out["sd"] is None
    assert "seed" in out["note"]


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_paired_interval_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        qs.paired_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        qs.paired_interval([1.0, 2.0], confidence=95)


# -- FLOPs -------------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self, vocab: int, d: int, out: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.proj = torch.nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(x))  # (B, T, out)


def test_flops_per_token_linear_is_two_in_out():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)  # 15 tokens
    out = qs.flops_per_token(lin, lambda: lin(x), tokens=15)
    assert out["forward_flops_per_token"] == 2 * 16 * 8
    assert out["train_flops_per_token"] == 3 * 2 * 16 * 8
    assert out["forward_flops"] == 15 * 2 * 16 * 8
    assert out["parameters"] == 16 * 8 + 8


def test_flops_per_token_embedding_lookup_is_free_and_by_module():
    m = _Tiny(vocab=50, d=12, out=7)
    x = torch.randint(0, 50, (2, 9))
    out = qs.flops_per_token(m, lambda: m(x), tokens=18)
    assert out["forward_flops_per_token"] == 2 * 12 * 7
    assert out["by_module"] == {"proj": 2 * 12 * 7}  # emb counted nothing, so is left out

    emb = torch.nn.Embedding(50, 12)
    assert qs.flops_per_token(emb, lambda: emb(x), tokens=18)["forward_flops_per_token"] == 0


def test_flops_per_token_rejects_zero_tokens():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="tokens"):
        qs.flops_per_token(lin, lambda: lin(torch.zeros(1, 2)), tokens=0)


# -- n-gram classes ----------------------------------------------------------------------------


def _brute(train, val, n, min_count):
    counts = Counter(tuple(train[i : i + n]) for i in range(len(train) - n + 1))
    return np.array(
        [j >= n - 1 and counts[tuple(val[j - n + 1 : j + 1])] >= min_count for j in range(len(val))]
    )


def test_ngram_classes_hand_built():
    train = np.array([1, 2, 3, 1, 2, 4, 1, 2])
    val = np.array([1, 2, 3, 9, 2, 4])
    # bigrams in train: (1,2) x3, (2,3), (3,1), (2,4), (4,1)
    assert qs.ngram_classes(train, val, 2, 1).tolist() == [False, True, True, False, False, True]
    assert qs.ngram_classes(train, val, 2, 2).tolist() == [False, True, False, False, False, False]
    assert qs.ngram_classes(train, val, 2, 4).tolist() == [False] * 6
    # trigrams: (1,2,3), (2,3,1), (3,1,2), (1,2,4), (2,4,1), (4,1,2)
    assert qs.ngram_seen(train, val, 3).tolist() == [False, False, True, False, False, False]
    # unigrams: 9 never appears
    assert qs.ngram_seen(train, val, 1).tolist() == [True, True, True, False, True, True]


def test_ngram_classes_short_streams():
    assert qs.ngram_classes(np.array([1, 2]), np.array([1]), 2, 1).tolist() == [False]
    assert qs.ngram_classes(np.array([1]), np.array([1, 1]), 2, 1).tolist() == [False, False]
    assert qs.ngram_classes(np.array([1, 2]), np.array([], dtype=np.int64), 2, 1).size == 0


@pytest.mark.parametrize("n, min_count, vocab", [(1, 2, 7), (2, 1, 5), (2, 3, 4), (3, 2, 3)])
def test_ngram_classes_matches_brute_force(n, min_count, vocab):
    rng = np.random.default_rng(n * 100 + min_count)
    for _ in range(5):
        train = rng.integers(0, vocab, size=int(rng.integers(0, 300)))
        val = rng.integers(0, vocab + 1, size=int(rng.integers(0, 200)))  # a token train lacks
        got = qs.ngram_classes(train, val, n, min_count)
        np.testing.assert_array_equal(got, _brute(train, val, n, min_count))


def test_ngram_classes_huge_ids_do_not_overflow():
    """Token ids near 2^40: base^3 passes int64, so the keys must be re-densified, still exact."""
    rng = np.random.default_rng(3)
    alphabet = np.array([0, 7, 2**40 - 1, 2**40 + 5], dtype=np.int64)
    train = alphabet[rng.integers(0, 4, 400)]
    val = alphabet[rng.integers(0, 4, 200)]
    for n in (2, 3, 4):
        got = qs.ngram_classes(train, val, n, 2)
        np.testing.assert_array_equal(got, _brute(train.tolist(), val.tolist(), n, 2))


@pytest.mark.parametrize(
    "train, val, n, min_count, match",
    [
        (np.array([[1, 2]]), np.array([1]), 2, 1, "1-D"),
        (np.array([1.5, 2.0]), np.array([1]), 2, 1, "integer"),
        (np.array([1, -2]), np.array([1]), 2, 1, "negative"),
        (np.array([1, 2]), np.array([1]), 0, 1, "n must"),
        (np.array([1, 2]), np.array([1]), 2, 0, "min_count"),
    ],
)
def test_ngram_classes_rejects_bad_input(train, val, n, min_count, match):
    with pytest.raises(ValueError, match=match):
        qs.ngram_classes(train, val, n, min_count)


# -- class losses, gate probe ------------------------------------------------------------------


def test_class_losses_and_ratio():
    losses = np.array([1.0, 2.0, 3.0, 4.0])
    frequent = np.array([True, False, True, False])
    empty = np.zeros(4, dtype=bool)
    e = qs.class_losses(losses, {"frequent": frequent, "rest": ~frequent, "none": empty})
    assert e["all"] == {"tokens": 4, "mean_loss": 2.5}
    assert e["frequent"] == {"tokens": 2, "mean_loss": 2.0}
    assert e["rest"] == {"tokens": 2, "mean_loss": 3.0}
    assert e["none"] == {"tokens": 0, "mean_loss": None}
    d = qs.class_losses(losses * 2, {"frequent": frequent, "rest": ~frequent, "none": empty})
    ratio = qs.class_ratio(e, d)
    assert ratio == {"all": 0.5, "frequent": 0.5, "rest": 0.5, "none": None}


def test_class_losses_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="shape"):
        qs.class_losses(np.zeros(4), {"a": np.zeros(3, dtype=bool)})
    with pytest.raises(ValueError, match="bool"):
        qs.class_losses(np.zeros(4), {"a": np.zeros(4)})
    with pytest.raises(ValueError, match="reserved"):
        qs.class_losses(np.zeros(4), {"all": np.zeros(4, dtype=bool)})


def test_class_ratio_rejects_unpaired_results():
    a = qs.class_losses(np.ones(4), {"x": np.array([True, True, False, False])})
    b = qs.class_losses(np.ones(4), {"x": np.array([True, False, False, False])})
    with pytest.raises(ValueError, match="same validation"):
        qs.class_ratio(a, b)
    with pytest.raises(ValueError, match="classes differ"):
        qs.class_ratio(a, qs.class_losses(np.ones(4), {}))


def test_gate_probe():
    gates = np.array([0.9, 0.1, 0.7, 0.3, 0.5])
    mask = np.array([True, False, True, False, False])
    out = qs.gate_probe(gates, mask)
    assert out["masked_mean"] == pytest.approx(0.8)
    assert out["unmasked_mean"] == pytest.approx(0.3)
    assert out["difference"] == pytest.approx(0.5)
    assert out["masked_positions"] == 2 and out["unmasked_positions"] == 3
    # one gate per head: averaged per position first
    per_head = np.stack([gates, gates + 0.1], axis=-1)  # (5, 2)
    assert qs.gate_probe(per_head, mask)["masked_mean"] == pytest.approx(0.85)
    none = qs.gate_probe(gates, np.zeros(5, dtype=bool))
    assert none["masked_mean"] is None and none["difference"] is None
    with pytest.raises(ValueError, match="shape"):
        qs.gate_probe(gates, mask[:3])


# -- SVG ---------------------------------------------------------------------------------------


def _points(el):
    return [tuple(float(v) for v in p.split(",")) for p in el.get("points").split()]


def test_svg_curves_structure_and_mapping(tmp_path):
    series = {
        "dense": [(0, 5.0), (1_000_000, 4.0), (2_000_000, 3.5), (4_000_000, 3.2)],
        "engram & co": [(0, 5.0), (2_000_000, 3.4), (4_000_000, 3.0)],
    }
    bands = {"dense": [(0, 4.9, 5.1), (2_000_000, 3.4, 3.6), (4_000_000, 3.1, 3.3)]}
    path = tmp_path / "curves.svg"
    qs.svg_curves(series, path, "loss <vs> tokens", bands=bands)
    root = ET.parse(path).getroot()
    assert root.tag == SVG + "svg"
    lines = root.findall(f"{SVG}polyline")
    assert [el.get("data-series") for el in lines] == list(series)
    for el, pts in zip(lines, series.values(), strict=True):
        drawn = _points(el)
        assert len(drawn) == len(pts)
        # larger x -> larger svg x; larger y -> smaller svg y
        for i in range(len(pts) - 1):
            (_, ya), (_, yb) = pts[i], pts[i + 1]
            (da, ea), (db, eb) = drawn[i], drawn[i + 1]
            assert db > da
            assert (eb < ea) == (yb > ya) and (eb > ea) == (yb < ya)
    assert len({el.get("stroke") for el in lines}) == 2
    polys = root.findall(f"{SVG}polygon")
    assert len(polys) == 1 and len(_points(polys[0])) == 6
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "dense" in texts and "engram & co" in texts and "loss <vs> tokens" in texts
    assert "tokens trained" in texts and "validation loss" in texts
    assert "1M" in texts and "4M" in texts


def test_svg_curves_single_point_and_bad_input(tmp_path):
    path = tmp_path / "one.svg"
    qs.svg_curves({"a": [(10, 1.0)]}, path, "one")
    assert len(_points(ET.parse(path).getroot().find(f"{SVG}polyline"))) == 1
    with pytest.raises(ValueError, match="no points"):
        qs.svg_curves({"a": []}, tmp_path / "x.svg", "t")
    with pytest.raises(ValueError, match="name no series"):
        qs.svg_curves({"a": [(0, 1.0)]}, tmp_path / "x.svg", "t", bands={"b": [(0, 0.0, 1.0)]})
    assert not (tmp_path / "x.svg").exists()


def test_tick_helpers():
    assert qs.format_number(1_000_000) == "1M"
    assert qs.format_number(2_500_000) == "2.5M"
    assert qs.format_number(20_000) == "20k"
    assert qs.format_number(3.25) == "3.25"
    assert qs.format_number(0) == "0"
    assert qs.nice_ticks(0, 10_000_000) == [0, 2e6, 4e6, 6e6, 8e6, 1e7]
    ticks = qs.nice_ticks(2.93, 4.71)
    assert ticks[0] >= 2.93 and ticks[-1] <= 4.71 and 4 <= len(ticks) <= 10


# -- Markdown table ----------------------------------------------------------------------------


def test_ascii_table():
    rows = [
        {"model": "dense", "ratio": 1.0, "loss": 3.456789, "params": 123456},
        {"model": "engram|x", "ratio": 0.96712345, "params": None},
    ]
    out = qs.ascii_table(rows, ["model", "ratio", "loss", "params"])
    assert out.splitlines() == [
        "| model | ratio | loss | params |",
        "|---|---|---|---|",
        "| dense | 1 | 3.457 | 123456 |",
        "| engram\\|x | 0.9671 |  |  |",
    ]
    with pytest.raises(ValueError, match="column"):
        qs.ascii_table(rows, [])
