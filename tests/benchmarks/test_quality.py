"""benchmarks/quality.py's own logic on tiny real inputs: the baselines it names, a paired run,
and the analysis that turns runs into the reported ratios, intervals, curves and token classes.

The text is real (the Python documentation's pydoc topic pages that ship with the interpreter),
split by quality.load_data into train / tune / val; models are 2 layers, width 32, a few steps.
No timing assertions. main() end to end is left to the benchmark itself (minutes).
"""

import dataclasses
import json
import math
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
import quality_stats as qs  # noqa: E402

from trainer.data import Document, stdlib_documents  # noqa: E402

VOCAB = 384
B, T = 4, 32
# the tiny model has 2 blocks; its table lr is the rule's at these few tokens (100x)
RECIPE = quality.Recipe(table_base_size=257, engram_layers=(1,)).sized(10**6, 8 * B * T)


def _real_docs() -> list[Document]:
    """60 pydoc topic pages (the Python reference's own prose), or stdlib docstrings where this
    Python ships without pydoc_data."""
    try:
        from pydoc_data import topics as pages

        text = dict(pages.topics)
    except ImportError:
        text = {}
    docs = [Document(f"pydoc_data/topics:{k}", text[k]) for k in sorted(text)[:60]]
    return docs if len(docs) >= 40 else stdlib_documents()[:120]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> quality.Data:
    d = quality.load_data(
        None, VOCAB, docs=_real_docs(), cache_dir=str(tmp_path_factory.mktemp("c"))
    )
    return d


def tiny_cfg(recipe: quality.Recipe = RECIPE, steps: int = 8):
    """base_config's Engram arm shrunk: 2 layers, 2 heads, width 32, tables of ~257 rows a head."""
    cfg = quality.base_config("quick", recipe, steps * B * T)
    return dataclasses.replace(
        cfg,
        vocab_size=VOCAB,
        seq_len=T,
        batch_size=B,
        steps=steps,
        model=dataclasses.replace(
            cfg.model, n_layer=2, n_head=2, n_embd=32, hash_heads=2, n_embed_per_ngram=16
        ),
    )


def test_load_data_splits_by_document_and_trains_the_tokenizer_on_train(tiny_data):
    d = tiny_data
    assert d.name == "stdlib"
    assert all(d.docs[k] > 0 for k in ("train", "tune", "val"))
    assert d.docs["train"] > d.docs["val"] + d.docs["tune"]
    assert sum(d.docs.values()) == len(_real_docs())
    for k, toks in d.tokens.items():
        assert toks.dtype == np.int64 and len(toks) == len(d.dataset.tokens(k))
        assert int(toks.max()) < d.corpus.vocab_size
    assert d.corpus.vocab_size == VOCAB


# ------------------------------------------------------------------------------ the baselines


def test_widen_returns_the_narrowest_width_reaching_the_target(tiny_data):
    V, pad = tiny_data.corpus.vocab_size, tiny_data.corpus.pad_id
    dense = quality.dense_of(tiny_cfg())
    step = dense.model.n_head
    at40 = quality.measure(quality.with_width(dense, 40), V, pad)
    f40, p40 = at40["forward_flops_per_token"], at40["params"]["total"]
    assert quality.widen(dense, V, pad, "flops", f40).model.n_embd == 40  # equal counts
    assert quality.widen(dense, V, pad, "flops", f40 - 1).model.n_embd == 40
    assert quality.widen(dense, V, pad, "flops", f40 + 1).model.n_embd == 40 + step
    assert quality.widen(dense, V, pad, "params", p40).model.n_embd == 40
    assert quality.widen(dense, V, pad, "params", p40 + 1).model.n_embd == 40 + step
    # never narrower than the model it starts from
    assert quality.widen(dense, V, pad, "flops", 0).model.n_embd == dense.model.n_embd


def test_arm_configs_name_fair_baselines(tiny_data):
    V, pad = tiny_data.corpus.vocab_size, tiny_data.corpus.pad_id
    cfg = tiny_cfg()
    arms = quality.arm_configs(cfg, V, pad, isoparam=True)
    assert set(arms) == {"engram", "dense", "dense_isoflop", "dense_isoparam"}
    assert arms["engram"] is cfg
    m = {a: quality.measure(c, V, pad) for a, c in arms.items()}
    e = m["engram"]
    # dense: the same backbone without Engram
    assert (
        arms["dense"].model.n_embd == cfg.model.n_embd and arms["dense"].model.engram_layers == ()
    )
    assert m["dense"]["params"]["backbone"] == e["params"]["backbone"]
    assert m["dense"]["params"]["engram_tables"] == 0 < e["params"]["engram_tables"]
    assert m["dense"]["forward_flops_per_token"] < e["forward_flops_per_token"]
    for arm, key, target in (
        ("dense_isoflop", "forward_flops_per_token", e["forward_flops_per_token"]),
        ("dense_isoparam", "total", e["params"]["total"]),
    ):
        c = arms[arm]
        assert c.model.engram_layers == ()

        def value(x, key=key):
            return x[key] if key in x else x["params"][key]

        assert value(m[arm]) >= target  # the baseline never gets less than Engram ...
        narrower = quality.with_width(c, c.model.n_embd - c.model.n_head)
        assert value(quality.measure(narrower, V, pad)) < target  # ... and no more than needed
    # the train step counts 3x the forward
    assert e["train_flops_per_token"] == pytest.approx(3 * e["forward_flops_per_token"])


def test_table_rows_cost_parameters_not_flops(tiny_data):
    """What sweep (b) relies on: growing the tables holds FLOPs per token fixed."""
    V, pad = tiny_data.corpus.vocab_size, tiny_data.corpus.pad_id
    small = quality.measure(tiny_cfg(), V, pad)
    big = quality.measure(tiny_cfg(dataclasses.replace(RECIPE, table_base_size=1021)), V, pad)
    assert big["forward_flops_per_token"] == small["forward_flops_per_token"]
    assert big["params"]["engram_tables"] > 3 * small["params"]["engram_tables"]
    assert big["params"]["backbone"] == small["params"]["backbone"]


def test_sweep_fixed_params_holds_the_total_near_the_budget(tiny_data):
    V, pad = tiny_data.corpus.vocab_size, tiny_data.corpus.pad_id
    cfg = tiny_cfg()
    budget = quality.measure(cfg, V, pad)["params"]["total"]
    pts = quality.sweep_fixed_params(cfg, V, pad, budget, [0.0, 0.25, 0.5])
    assert [r for r, _ in pts] == [0.0, 0.25, 0.5]
    fractions = []
    for r, c in pts:
        m = quality.measure(c, V, pad)["params"]
        step = c.model.n_head
        if r == 0:  # all in the backbone: the narrowest dense model at the budget or above
            assert c.model.engram_layers == () and m["total"] >= budget
            continue
        # the table share asked for (primes lie just above the rows per head) ...
        assert m["engram_tables"] == pytest.approx(r * budget, rel=0.05)
        fractions.append(m["table_fraction"])
        # ... and the width whose total is nearest the budget
        for w in (c.model.n_embd - step, c.model.n_embd + step):
            other = quality.measure(quality.with_width(c, w), V, pad)["params"]["total"]
            assert abs(m["total"] - budget) <= abs(other - budget)
    assert fractions == sorted(fractions)


# ------------------------------------------------------------------------------- a paired run


@pytest.fixture(scope="module")
def runs(tiny_data):
    """engram and dense at seed 3 (validation, 5 batches), engram at seed 3 again, dense at seed
    4 on the whole tuning split: run_job over the tiny Data (cached_data would load the 2 MB
    built-in corpus)."""
    cfg = tiny_cfg()
    arms = quality.arm_configs(cfg, tiny_data.corpus.vocab_size, tiny_data.corpus.pad_id, False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quality, "cached_data", lambda corpus, vocab: tiny_data)

        def job(arm, seed, split="val", cap=5):
            return quality.run_job(
                quality.Job(
                    "tiny", arm, arms[arm], RECIPE, seed, split, curve_points=4, max_val_batches=cap
                )
            )

        return {
            "engram": job("engram", 3),
            "dense": job("dense", 3),
            "engram_again": job("engram", 3),
            "dense_tune": job("dense", 4, "tune", None),
            "isoflop": job("dense_isoflop", 3),
        }


def test_run_job_pairs_the_backbone_init_by_seed(runs):
    assert runs["engram"]["init_sha"] == runs["dense"]["init_sha"]  # same weights, not just seed
    assert runs["dense_tune"]["init_sha"] != runs["dense"]["init_sha"]  # another seed
    assert runs["isoflop"]["init_sha"] != runs["dense"]["init_sha"]  # another width


def test_run_job_is_deterministic(runs):
    a, b = runs["engram"], runs["engram_again"]
    np.testing.assert_array_equal(a["token_losses"], b["token_losses"])
    np.testing.assert_array_equal(a["gates"], b["gates"])
    assert a["curve"] == b["curve"]
    # and the memory changes the model's predictions
    assert not np.array_equal(a["token_losses"], runs["dense"]["token_losses"])


def test_run_job_reports_losses_on_the_evaluated_targets(runs, tiny_data):
    ds = tiny_data.dataset
    for name in ("engram", "dense", "isoflop"):
        r = runs[name]
        assert r["split"] == "val" and r["seed"] == 3
        n = 5 * B * T  # max_val_batches windows of B x T targets
        assert r["token_losses"].shape == (n,) and r["positions"].shape == (n,)
        assert np.isfinite(r["token_losses"]).all() and (r["token_losses"] > 0).all()
        assert r["val_loss"] == pytest.approx(float(r["token_losses"].mean()), rel=1e-6)
        assert r["tokens"] == 8 * B * T
    # the positions are the stream positions of the targets the losses belong to, in order
    ys = np.concatenate([b[:, 1:].reshape(-1) for b in ds.eval_batches("val", B, T, 5)])
    np.testing.assert_array_equal(tiny_data.tokens["val"][runs["engram"]["positions"]], ys)
    # no cap: the whole split
    r = runs["dense_tune"]
    assert r["split"] == "tune"
    assert len(r["token_losses"]) == len(r["positions"]) == ds.eval_windows("tune", B, T) * B * T


def test_run_job_gates_and_curves(runs):
    g = runs["engram"]["gates"]
    assert g is not None and g.shape == runs["engram"]["token_losses"].shape
    assert ((g > 0) & (g < 1)).all()  # sigmoid gates of the first Engram layer
    assert runs["dense"]["gates"] is None and runs["isoflop"]["gates"] is None
    for name in ("engram", "dense", "isoflop", "dense_tune"):
        r = runs[name]
        xs = [x for x, _ in r["curve"]]
        assert len(xs) == 4 and xs == sorted(set(xs))  # 8 steps, every 2
        assert xs[-1] == r["tokens"]
        assert all(math.isfinite(y) for _, y in r["curve"])
        assert r["curve"][-1][1] < r["curve"][0][1]  # it learns, even in 8 steps
        assert math.isfinite(r["train_loss_last"]) and r["train_s"] > 0


# ----------------------------------------------------------------------------- the analysis


def _res(arm, seed, loss, **kw):
    return {"arm": arm, "seed": seed, "val_loss": loss, **kw}


def test_paired_matches_arms_by_seed():
    results = [
        _res("dense", 2, 4.0),
        _res("engram", 0, 3.0),
        _res("dense", 0, 3.2),
        _res("engram", 2, 3.9),
        _res("dense", 1, 5.0),  # no engram run at seed 1: left out
        _res("dense_isoflop", 1, 1.0),  # another arm
        _res("engram", 3, 2.0),  # no dense run at seed 3: left out
    ]
    out = quality.paired(results, "engram", "dense")
    assert out["seeds"] == [0, 2]
    assert out["ratios"] == pytest.approx([3.0 / 3.2, 3.9 / 4.0])
    ref = qs.paired_interval([3.0 / 3.2, 3.9 / 4.0])
    assert out["n"] == 2 and out["mean"] == pytest.approx(ref["mean"])
    assert out["lo"] == pytest.approx(ref["lo"]) and out["hi"] == pytest.approx(ref["hi"])
    one = quality.paired(results, "engram", "dense_isoflop")
    assert one == {"n": 0, "ratios": [], "seeds": []}  # dense_isoflop's seed 1 has no engram


def test_spread_is_the_sample_sd_over_seeds():
    results = [_res("dense", s, v) for s, v in enumerate((3.0, 3.2, 3.4))] + [_res("engram", 0, 2)]
    s = quality.spread(results, "dense")
    assert s["n"] == 3 and s["mean"] == pytest.approx(3.2)
    assert s["sd"] == pytest.approx(0.2) and s["sd_pct"] == pytest.approx(100 * 0.2 / 3.2)
    assert s["seeds"] == [0, 1, 2] and s["per_seed"] == pytest.approx([3.0, 3.2, 3.4])
    one = quality.spread(results, "engram")
    assert one == {"mean": 2.0, "sd": None, "sd_pct": None, "n": 1, "seeds": [0], "per_seed": [2]}
    shuffled = quality.spread(results[::-1], "dense")  # listed by seed, whatever the order run
    assert shuffled["seeds"] == [0, 1, 2] and shuffled["per_seed"] == s["per_seed"]
    assert quality.spread(results, "nope")["n"] == 0


def test_mean_curve_means_and_bands_over_seeds():
    results = [
        _res("engram", 0, 0, curve=[(10, 5.0), (20, 4.0), (30, 3.0)]),
        _res("engram", 1, 0, curve=[(10, 6.0), (20, 3.0)]),  # shorter: the curves are cut to it
        _res("dense", 0, 0, curve=[(10, 9.0), (20, 9.0)]),
    ]
    mean, band = quality.mean_curve(results, "engram")
    assert mean == [(10, 5.5), (20, 3.5)]
    assert band == [(10, 5.0, 6.0), (20, 3.0, 4.0)]
    assert quality.mean_curve(results, "nope") == ([], [])


def test_lr_factor_warms_up_then_decays_to_a_tenth():
    assert all(quality.lr_factor("constant", s, 100) == 1.0 for s in (1, 50, 100))
    f = [quality.lr_factor("cosine", s, 1000) for s in range(1, 1001)]
    warm = 1000 // 50
    assert f[:warm] == pytest.approx([s / warm for s in range(1, warm + 1)])  # linear to 1
    assert f[warm - 1] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[warm - 1 :], f[warm:], strict=False))  # then down
    assert quality.lr_factor("cosine", warm + (1000 - warm) // 2, 1000) == pytest.approx(0.55)
    assert quality.lr_factor("cosine", 1, 10) == 1.0  # a short run: one warmup step


def _brute_classes(train: np.ndarray, ev: np.ndarray, positions: np.ndarray, T: int) -> dict:
    """What the lookup at input p - 1 sees: the n-gram ev[p-n .. p-1], unless it reaches back
    past its window's start (then the hasher pads; those targets are "window_start")."""
    out = {}
    for n in (2, 3):
        counts = Counter(tuple(train[i : i + n].tolist()) for i in range(len(train) - n + 1))
        inside = np.array([(p - 1) % T >= n - 1 for p in positions.tolist()])
        c = np.array([counts.get(tuple(ev[p - n : p].tolist()), 0) for p in positions.tolist()])
        out[f"frequent_{n}gram"] = (c >= quality.FREQUENT) & inside
        out[f"rare_{n}gram"] = (c >= 1) & (c < quality.FREQUENT) & inside
        out[f"unseen_{n}gram"] = (c == 0) & inside
    out["window_start"] = np.array([(p - 1) % T < 2 for p in positions.tolist()])
    return out


def test_token_classes_count_the_compressed_ngrams_the_lookup_hashes(tiny_data):
    lookup = tiny_data.corpus.lookup
    assert tiny_data.corpus.compressed_vocab < tiny_data.corpus.vocab_size  # some ids merge
    pos = tiny_data.dataset.eval_positions("val", B, T)
    got = quality.token_classes(tiny_data, "val", pos, T)
    want = _brute_classes(
        lookup[tiny_data.tokens["train"]], lookup[tiny_data.tokens["val"]], pos, T
    )
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].any(), f"class {k} is empty: the test would not check it"
    for n in (2, 3):  # the three classes partition the tokens whose n-gram is inside a window
        total = sum(got[f"{c}_{n}gram"].astype(int) for c in ("frequent", "rare", "unseen"))
        inside = (pos - 1) % T >= n - 1
        assert (total[inside] == 1).all() and (total[~inside] == 0).all()


def test_token_classes_look_at_the_input_token_not_the_target():
    """A hand-made stream: bigram (5, 6) is frequent in training, (6, 7) never occurs."""
    train = np.array([5, 6] * 20 + [1], np.int64)
    ev = np.array([0, 5, 6, 7, 1], np.int64)
    corpus = types.SimpleNamespace(lookup=np.arange(10))
    d = quality.Data(corpus, "hand", {"train": train, "val": ev}, {}, None)
    got = quality.token_classes(d, "val", np.array([1, 2, 3, 4]), 100)
    # target ev[3] = 7 is predicted at input ev[2] = 6, whose bigram (5, 6) is frequent
    assert got["frequent_2gram"].tolist() == [False, False, True, False]
    # input 0 starts the window (its bigram would reach before it): in no n-gram class
    assert got["unseen_2gram"].tolist() == [False, True, False, True]
    assert got["window_start"].tolist() == [True, True, False, False]
    assert got["frequent_3gram"].tolist() == [False, False, False, False]


def test_class_report_pairs_class_losses_and_gates_by_seed(tiny_data):
    pos = tiny_data.dataset.eval_positions("val", B, T, 3)
    rng = np.random.default_rng(0)
    n = len(pos)
    results = []
    for s in (0, 1):
        for arm in ("engram", "dense_isoflop", "dense"):
            results.append(
                {
                    "arm": arm,
                    "seed": s,
                    "split": "val",
                    "positions": pos,
                    "seq_len": T,
                    "token_losses": rng.uniform(1, 6, n).astype(np.float32),
                    "gates": rng.uniform(0, 1, n).astype(np.float32) if arm == "engram" else None,
                }
            )
    results.append(dict(results[0], seed=7))  # an engram seed without a baseline: not paired
    rep = quality.class_report(tiny_data, results, "engram", "dense_isoflop")
    classes = quality.token_classes(tiny_data, "val", pos, T)
    by = {(r["arm"], r["seed"]): r for r in results}
    assert set(rep["classes"]) == {"all", *classes}
    assert set(rep["gate_mean"]) == set(classes)
    for k, masks in {"all": np.ones(n, bool), **classes}.items():
        c = rep["classes"][k]
        assert c["tokens"] == int(masks.sum()) and c["share"] == pytest.approx(masks.mean())
        e = [float(by[("engram", s)]["token_losses"][masks].mean()) for s in (0, 1)]
        b = [float(by[("dense_isoflop", s)]["token_losses"][masks].mean()) for s in (0, 1)]
        assert c["engram_loss"] == pytest.approx(np.mean(e))
        assert c["dense_isoflop_loss"] == pytest.approx(np.mean(b))
        ratio = [x / y for x, y in zip(e, b, strict=True)]
        assert c["ratio"]["n"] == 2 and c["ratio"]["mean"] == pytest.approx(np.mean(ratio))
        if k != "all":
            g = [float(by[("engram", s)]["gates"][masks].mean()) for s in (0, 1)]
            assert rep["gate_mean"][k] == pytest.approx(np.mean(g))
    assert quality.class_report(tiny_data, results, "engram", "dense_isoparam") == {}


# --------------------------------------------------------------------------------- the study


def test_study_varies_one_thing_at_a_time_around_the_default():
    # the default at a study's length: the lr rule's (100x at 0.3 M tokens, 25x at 10 M)
    for tokens in (300_000, 10_000_000):
        at = dataclasses.replace(quality.Recipe(), table_lr_mult=quality.table_lr_mult_for(tokens))
        assert at in [r for _, r in quality.study_grid(quality.Recipe())]
    default = dataclasses.replace(quality.Recipe(), table_lr_mult=100.0)
    grid = [r for _, r in quality.study_grid(default)]
    assert default in grid  # the paper's 5x is one point of the grid, not the only one
    assert len(set(grid)) == 9 and len({r.table_lr_mult for r in grid}) == 3
    fields = [f.name for f in dataclasses.fields(quality.Recipe)]
    around = quality.study_around(default, 2_000)
    for name, r in around:
        changed = [f for f in fields if getattr(r, f) != getattr(default, f)]
        assert len(changed) == 1, (name, changed)
    sizes = {r.table_base_size for _, r in around} - {default.table_base_size}
    assert sizes == {500, 8_000}  # / 4 and x 4 around the size the rule gave on that corpus
    layers = {r.engram_layers for _, r in around} - {default.engram_layers}
    assert default.engram_layers not in layers and len(layers) == 2
    labels = {r.label() for r in grid}
    assert len(labels) == 9  # the label tells variants apart


# ------------------------------------------------------------------------------- the size rule


def test_recipe_is_sized_per_corpus_and_a_given_size_is_kept():
    auto = quality.Recipe()
    assert auto.table_base_size == 0 and "rowsauto" in auto.label()
    with pytest.raises(ValueError, match="sized"):
        quality.base_config("quick", auto, 1_000)
    small = auto.sized(600_000, 1_500_000)  # read 2.5 times
    big = auto.sized(2_500_000, 1_500_000)  # read 0.6 times
    assert small.table_base_size == quality.rows_per_head(600_000, 1_500_000) == 240
    assert big.table_base_size == 1_500_000 // 32 and small.table_base_size < big.table_base_size
    cfg = quality.base_config("quick", big, 1_000_000)
    assert cfg.model.table_base_size == 1_500_000 // 32
    fixed = dataclasses.replace(auto, table_base_size=777, table_lr_mult=5.0)
    assert fixed.sized(600_000, 1_500_000) == fixed


def test_recipe_takes_the_table_lr_rule_at_its_length_and_a_given_lr_is_kept():
    auto = quality.Recipe()
    assert auto.table_lr_mult == 0 and auto.label().startswith("lrautox-")
    for tokens in (300_000, 1_500_000, 4_000_000, 10_000_000, 20_000_000):
        sized = auto.sized(12_000_000, tokens)
        assert sized.table_lr_mult == quality.table_lr_mult_for(tokens)
        assert sized.label().startswith(f"lr{sized.table_lr_mult:.3g}x-")
        cfg = quality.base_config("budget", sized, tokens)
        assert cfg.table_lr_mult == sized.table_lr_mult and cfg.table_lr == pytest.approx(
            cfg.lr * sized.table_lr_mult
        )
    assert auto.sized(12_000_000, 10_000_000).label().startswith("lr25x-")  # the budget's
    given = dataclasses.replace(auto, table_lr_mult=5.0)
    assert given.sized(12_000_000, 10_000_000).table_lr_mult == 5.0


def test_run_jobs_keeps_each_run_and_resumes_from_them(tiny_data, tmp_path, monkeypatch):
    """--runs-dir: a finished run is kept as it ends; the same job is then read back, not run
    again (its measured train_s comes back exactly), while a changed job runs."""
    monkeypatch.setattr(quality, "cached_data", lambda corpus, vocab: tiny_data)
    arms = quality.arm_configs(
        tiny_cfg(), tiny_data.corpus.vocab_size, tiny_data.corpus.pad_id, False
    )

    def job(seed: int) -> quality.Job:
        return quality.Job("tiny", "engram", arms["engram"], RECIPE, seed, "val", max_val_batches=2)

    runs = tmp_path / "runs"
    (first,) = quality.run_jobs([job(0)], 1, runs)
    assert [p.name for p in runs.iterdir()] == [quality.run_path(runs, job(0)).name]
    again, other = quality.run_jobs([job(0), job(1)], 1, runs)
    assert again["train_s"] == first["train_s"]  # read back, not retrained
    np.testing.assert_array_equal(again["token_losses"], first["token_losses"])
    assert other["seed"] == 1 and other["train_s"] != first["train_s"]
    assert len(list(runs.glob("*.pkl"))) == 2 and not list(runs.glob("*.tmp"))
    assert quality.run_path(runs, job(0)) != quality.run_path(runs, job(1))


def test_a_dense_run_is_kept_under_one_name_whatever_the_table_settings(tiny_data, tmp_path):
    """run_path: a dense arm's kept run does not depend on the table lr, schedule or init scale
    (it has no tables), so a study of them reuses it; an Engram run's does; and at the default
    recipe the name is what it was before table settings were left out (older runs stay kept)."""
    V, pad = tiny_data.corpus.vocab_size, tiny_data.corpus.pad_id
    variants = [
        RECIPE,
        dataclasses.replace(RECIPE, table_schedule="follow"),
        dataclasses.replace(RECIPE, table_lr_mult=25.0, table_init_std=1.0),
    ]
    paths: dict[str, set] = {"engram": set(), "dense_isoflop": set()}
    for rec in variants:
        arms = quality.arm_configs(tiny_cfg(rec), V, pad, False)
        for arm in paths:
            paths[arm].add(
                quality.run_path(tmp_path, quality.Job("tiny", arm, arms[arm], rec, 0, "val"))
            )
    assert len(paths["dense_isoflop"]) == 1 and len(paths["engram"]) == 3
    d = quality.Recipe().sized(10**6, 8 * B * T)  # RECIPE's table settings are the default's
    assert (RECIPE.table_lr_mult, RECIPE.table_schedule, RECIPE.table_init_std) == (
        d.table_lr_mult,
        d.table_schedule,
        d.table_init_std,
    )
    arms = quality.arm_configs(tiny_cfg(RECIPE), V, pad, False)
    for arm in ("engram", "dense_isoflop"):
        job = quality.Job("tiny", arm, arms[arm], RECIPE, 0, "val")
        key = quality.hashlib.sha256(f"{quality.RUN_FORMAT}:{job!r}".encode()).hexdigest()[:20]
        assert quality.run_path(tmp_path, job).name.endswith(f"-{key}.pkl")


def test_study_grid_points_parse_and_bad_ones_name_the_point():
    assert quality.grid_points("5:0.01, 100:0.02:2500,100:0.01:follow,25:1:300:constant") == [
        (5.0, 0.01, None, None),
        (100.0, 0.02, 2500, None),
        (100.0, 0.01, None, "follow"),
        (25.0, 1.0, 300, "constant"),
    ]
    for bad in (
        "5",
        "5:0.01:2500:1",
        "x:0.01",
        "5:-1",
        "5:0.01:1",
        "5:0.01:2.5",
        "nan:0.01",
        "5:follow",
        "5:0.01:cosine",
        "5:0.01:300:follow:follow",
    ):
        with pytest.raises(quality.argparse.ArgumentTypeError, match="bad point"):
            quality.grid_points(bad)


def test_main_refuses_bad_flags_before_reading_a_corpus(tmp_path, monkeypatch, capsys):
    not_a_dir = tmp_path / "runs"
    not_a_dir.write_text("a file")
    for argv, said in (
        (["--runs-dir", str(not_a_dir)], "not a folder"),
        (["--study", "--study-grid", "5"], "bad point '5'"),
        (["--store-check", "--store-steps", "0"], "want an integer >= 1, got '0'"),
        (["--store-check", "--store-steps", "many"], "got 'many'"),
        (["--store-check", "--store-seed", "-1"], "want an integer >= 0, got '-1'"),
        (["--store-check", "--store-seed", "x"], "want an integer >= 0, got 'x'"),
        (["--first-seed", "-2"], "want an integer >= 0, got '-2'"),
    ):
        monkeypatch.setattr(sys, "argv", ["quality.py", *argv])
        with pytest.raises(SystemExit) as e:
            quality.main()
        assert e.value.code == 2
        assert said in capsys.readouterr().err
    assert not_a_dir.read_text() == "a file"


def test_reported_seeds_start_at_first_seed():
    import argparse

    assert quality.reported_seeds(argparse.Namespace(seeds=3, first_seed=0)) == [0, 1, 2]
    assert quality.reported_seeds(argparse.Namespace(seeds=1, first_seed=2)) == [2]


def test_main_engram_only_runs_the_given_seeds_of_the_engram_arm(tmp_path, monkeypatch, capsys):
    """--engram-only --first-seed 2: one Engram run of seed 2 on a real corpus, its loss listed
    by seed in the JSON (to pair with an earlier run's baselines), no baseline run."""
    argv = ["--corpus", "stdlib", "--quick", "--tokens", "8192", "--seeds", "1", "--first-seed",
            "2", "--engram-only", "--jobs", "1", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["quality.py", *argv])
    assert quality.main() == 0
    out, err = capsys.readouterr()
    entry = json.loads(out.strip().splitlines()[-1])["corpora"]["stdlib"]
    assert entry["seed_list"] == [2] and list(entry["models"]) == ["engram"]
    loss = entry["val_loss"]["engram"]
    assert loss["seeds"] == [2] and loss["n"] == 1 and math.isfinite(loss["per_seed"][0])
    assert entry["ratio_vs_dense_isoflop"]["n"] == 0 and not entry["meets_target"]
    assert entry["recipe"]["table_lr_mult"] == quality.table_lr_mult_for(8192)
    assert "engram seed 2" in err and "dense" not in err.split("reported comparison")[1], err


def tiny_study(tiny_data, monkeypatch) -> None:
    """Make run_study train tiny_cfg's shape on tiny_data for the study's sized recipes."""
    monkeypatch.setattr(quality, "cached_data", lambda corpus, vocab: tiny_data)
    real = quality.base_config

    def tiny_base(mode, recipe, tokens):
        cfg = real("quick", recipe, tokens)
        return dataclasses.replace(
            cfg,
            vocab_size=VOCAB,
            seq_len=T,
            batch_size=B,
            steps=max(1, tokens // (B * T)),
            model=dataclasses.replace(
                cfg.model, n_layer=2, n_head=2, n_embd=32, hash_heads=2, n_embed_per_ngram=16
            ),
        )

    monkeypatch.setattr(quality, "base_config", tiny_base)


def test_run_study_pairs_each_point_with_its_seeds_dense_runs_and_keeps_auto_unsized(
    tiny_data, monkeypatch
):
    """run_study over a given grid on the tuning split: one row per point, each ratio against the
    dense runs of its seed, the best by tuning loss chosen, and a point left at the auto size
    chosen unsized (so the reported comparison sizes it per corpus)."""
    tiny_study(tiny_data, monkeypatch)
    recipe = dataclasses.replace(quality.Recipe(), engram_layers=(1,))  # rows: auto
    args = types.SimpleNamespace(
        study_tokens=6 * B * T,
        study_seeds=1,
        study_grid=[(100.0, 0.01, None, None), (25.0, 0.1, None, None), (5.0, 1.0, 257, None)],
        no_dense=False,
        jobs=1,
        runs_dir=None,
    )
    out = quality.run_study(args, {"tiny": tiny_data}, "tiny", "quick", recipe, 6 * B * T)
    rows = {r["variant"]: r for r in out["rows"]}
    assert set(rows) == {
        "table lr 100x, init std 0.01",
        "table lr 25x, init std 0.1",
        "table lr 5x, init std 1, 257 rows a head",
    }
    assert out["split"] == "tune" and out["seeds"] == 1
    assert out["dense_tune_loss"] != out["dense_isoflop_tune_loss"]  # two baselines, both run
    for r in rows.values():
        assert math.isfinite(r["tune_loss"])
        assert r["ratio_vs_dense"] == pytest.approx(r["tune_loss"] / out["dense_tune_loss"])
        assert r["ratio_vs_dense_isoflop"] == pytest.approx(
            r["tune_loss"] / out["dense_isoflop_tune_loss"]
        )
    best = min(rows.values(), key=lambda r: r["tune_loss"])
    assert out["best"] == best["variant"]
    assert rows["table lr 100x, init std 0.01"]["recipe"].startswith(
        "lr100x-constant-init0.01-rowsauto"
    )
    lr = float(out["best"].split()[2].rstrip("x,"))
    assert out["chosen"]["table_lr_mult"] == lr
    assert out["chosen"]["table_base_size"] == (257 if lr == 5.0 else 0)  # auto stays auto


def test_run_study_no_dense_runs_only_the_isoflop_baseline_and_a_point_sets_its_schedule(
    tiny_data, monkeypatch
):
    """With --no-dense a study runs the dense_isoflop arm only (its ratios are against it, the
    same-width ones are None), and a grid point's schedule is the one its tables train with."""
    tiny_study(tiny_data, monkeypatch)
    ran: list[str] = []
    real_jobs = quality.run_jobs

    def spy(jobs, n, runs_dir):  # the real runs, with the arms they were asked for noted
        ran.extend(j.tag for j in jobs)
        return real_jobs(jobs, n, runs_dir)

    monkeypatch.setattr(quality, "run_jobs", spy)
    recipe = dataclasses.replace(quality.Recipe(), engram_layers=(1,))
    args = types.SimpleNamespace(
        study_tokens=6 * B * T,
        study_seeds=1,
        study_grid=quality.grid_points("100:0.01:constant,100:0.01:follow"),
        no_dense=True,
        jobs=1,
        runs_dir=None,
    )
    out = quality.run_study(args, {"tiny": tiny_data}, "tiny", "quick", recipe, 6 * B * T)
    assert "dense" not in ran and ran.count("dense_isoflop") == 1
    rows = {r["variant"]: r for r in out["rows"]}
    const = rows["table lr 100x, init std 0.01, constant"]
    follow = rows["table lr 100x, init std 0.01, follows the cosine"]
    assert const["recipe"].startswith("lr100x-constant-") and follow["recipe"].startswith(
        "lr100x-follow-"
    )
    assert out["dense_tune_loss"] is None and const["ratio_vs_dense"] is None
    for r in (const, follow):
        assert r["ratio_vs_dense_isoflop"] == pytest.approx(
            r["tune_loss"] / out["dense_isoflop_tune_loss"]
        )
    assert const["tune_loss"] != follow["tune_loss"]  # the schedule reached the tables


def test_store_check_runs_both_backends_to_the_same_losses_and_keeps_stdout_for_the_json(capsys):
    """--store-check, 3 steps at the quick model on stdlib: a real shard server on 127.0.0.1 and
    the local backend give the same train and validation losses to rounding, and the trainer's
    step lines go to stderr, so the report's JSON is stdout's only line."""
    d = quality.cached_data("stdlib", 4096)
    out = quality.store_check(d, "stdlib", quality.Recipe(), "quick", steps=3, seed=7)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "step 3/3" in captured.err
    assert out["steps"] == 3 and out["seed"] == 7
    for arm in ("store", "local"):
        assert math.isfinite(out[arm]["val_loss_after"])
        assert out[arm]["val_loss_after"] < out[arm]["val_loss_before"]
    assert abs(out["val_loss_diff"]) < 1e-4
    assert out["train_loss_max_abs_diff"] < 1e-4
