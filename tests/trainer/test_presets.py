"""The deepseek-v4.1-flash preset against the checkpoint's facts (docs/algorithm.md, reference
settings) and the algorithm's concatenated-table layout (step 5)."""

from __future__ import annotations

import numpy as np
import pytest

from engram_store.engine.errors import ConfigError
from tests.trainer.test_hashing import ref_is_prime, ref_primes
from trainer import presets
from trainer.hashing import NgramHasher

P = presets.get("deepseek-v4.1-flash")


def test_table_heights_are_the_checkpoints():
    rows = {layer: sum(P.head_rows(layer)) for layer in (1, 14)}
    assert rows == {1: 384_006_168, 14: 384_016_682}
    specs = P.table_configs()
    assert [s.num_rows for s in specs.values()] == [384_006_168, 384_016_682]
    assert [s.name for s in specs.values()] == ["engram_l1", "engram_l14"]


def test_primes_are_the_prime_search_from_16_million():
    """Against a trial-division search written in the test (tests/trainer/test_hashing.py)."""
    want = ref_primes((1, 14), 4, 8, (16_000_000,) * 3)
    assert P.primes == want
    flat = [p for layer in (1, 14) for p in P.head_rows(layer)]
    assert len(flat) == len(set(flat)) == 48 and all(ref_is_prime(p) for p in flat)
    # docs/algorithm.md: layer 1's primes run 16000057 ... 16000463, layer 14's 16000477 ... 16000889
    assert (flat[0], flat[23], flat[24], flat[47]) == (16000057, 16000463, 16000477, 16000889)
    # every order restarts the search at 16 M, so orders interleave: order 3's first head takes
    # the smallest prime above 16 M that order 2's eight heads left
    assert P.primes[1][1][0] > P.primes[1][0][0]


def test_head_offsets_follow_the_concatenated_layout():
    """Head h of a layer owns rows [offset_h, offset_h + prime_h) of the layer's one table, heads
    in order-major order (2-grams, then 3-grams, then 4-grams), and the hasher's global ids fall
    in the owning head's block."""
    lookup = np.arange(P.vocab_size, dtype=np.int64)  # an uncompressed vocabulary is enough here
    hasher = NgramHasher(P.hash, lookup, P.vocab_size)
    ids = np.random.default_rng(0).integers(0, P.vocab_size, size=(3, 40))
    glob, local = hasher.global_ids(ids), hasher.hash(ids)
    for layer, spec in P.table_configs().items():
        primes = [p for order in P.primes[layer] for p in order]
        offsets = [sum(primes[:h]) for h in range(24)]
        assert list(spec.head_offsets()) == offsets
        assert hasher.head_offsets(layer).tolist() == offsets
        assert glob[layer].shape == (3, 40, 24)
        assert np.array_equal(glob[layer] - local[layer], np.broadcast_to(offsets, (3, 40, 24)))
        assert np.all((local[layer] >= 0) & (local[layer] < np.array(primes)))


def test_row_format_per_use():
    serve = P.table_config(1)
    assert (serve.dtype, serve.dim, serve.row_bytes, serve.optimizer.kind) == (
        "float8_e4m3",
        256,
        264,
        "sgd",
    )
    train = P.table_config(14, dtype="bfloat16", prefix="run7-")
    assert train.name == "run7-engram_l14" and train.optimizer.kind == "rowwise_adagrad"
    assert train.row_bytes == 512 and train.state_floats == 1
    with pytest.raises(ConfigError, match="layer 2"):
        P.table_config(2)
    with pytest.raises(ConfigError, match="float8_e5m2"):
        P.table_config(1, dtype="float8_e5m2")


def test_the_deepseek_tokenizer_and_its_compression():
    tok = P.load_tokenizer()
    assert tok.get_vocab_size(with_added_tokens=True) == 129_280
    assert tok.id_to_token(2) == "<｜▁pad▁｜>"  # the preset's pad id is the tokenizer's pad
    hasher = P.hasher(tok)
    # about 23% of the ids go (ENGRAM.md: ~23% on DeepSeek-V3's 128k vocabulary)
    assert hasher.compressed_vocab_size == 99_092
    assert hasher.lookup.shape == (129_280,)
    ids = np.array([tok.encode(" Alexander the Great", add_special_tokens=False).ids])
    assert ids.shape[1] == 3
    g = hasher.global_ids(ids)
    assert set(g) == {1, 14} and g[1].shape == (1, 3, 24)


def test_arch_config_is_the_trainers_piece():
    arch = P.arch_config()
    arch.validate()
    assert arch.n_layer == 15 and arch.engram_layers == (1, 14)
    assert arch.hash_config(pad_id=2) == P.hash


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="deepseek-v4.1-flash"):
        presets.get("deepseek-v5")


# ---- training at the preset (engram train --preset; tests/cli/test_train_preset.py runs it) ----


def test_train_config_is_the_preset_with_a_small_backbone():
    cfg = P.train_config(store=("127.0.0.1:1",))
    cfg.validate()
    assert cfg.preset == P.name and cfg.model.hash_config(P.hash.pad_id) == P.hash
    assert cfg.model.n_layer == 15 and cfg.model.n_embd == presets.TRAIN_DEFAULTS["n_embd"]
    assert cfg.steps == presets.TRAIN_DEFAULTS["steps"]
    assert P.train_config(n_layer=16, steps=3).model.n_layer == 16


def test_a_preset_run_keeps_the_presets_hashing():
    import dataclasses

    cfg = P.train_config(store=("127.0.0.1:1",))
    with pytest.raises(ConfigError, match="--max-ngram"):
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_ngram=3)).validate()
    with pytest.raises(ConfigError, match="local backend"):
        dataclasses.replace(cfg, backend="local").validate()
    with pytest.raises(ConfigError, match="--corpus"):
        dataclasses.replace(cfg, corpus="synthetic").validate()


def test_the_presets_tables_are_its_training_format():
    from trainer.tables import table_specs

    cfg = P.train_config(store=("127.0.0.1:1",))
    specs = table_specs(cfg, P.hasher())
    assert {layer: s.num_rows for layer, s in specs.items()} == dict(P.heights)
    assert all(
        s.dtype == P.train_dtype and s.optimizer == P.train_optimizer for s in specs.values()
    )


def test_the_preset_corpus_is_the_builtin_corpus_in_the_preset_tokenizer():
    from trainer.preset_data import preset_corpus

    corpus = preset_corpus(P.name)
    assert corpus.vocab_size == 129_280 and corpus.pad_id == P.hash.pad_id == 2
    hasher = P.hasher()
    assert np.array_equal(corpus.lookup, hasher.lookup)
    assert corpus.compressed_vocab == hasher.compressed_vocab_size
    x, y = next(corpus.batches("train", 2, 64, seed=0))
    assert x.shape == y.shape == (2, 64) and np.array_equal(x[:, 1:], y[:, :-1])
    assert 0 <= x.min() and x.max() < 129_280
    tok = P.load_tokenizer()
    eos = tok.token_to_id("<｜end▁of▁sentence｜>")
    val = corpus.batches("val", 8, 256, seed=0)  # the split's windows, cycled: all of it
    toks = np.concatenate([next(val)[0].ravel() for _ in range(30)])
    assert (toks == eos).any()  # documents are joined by the end-of-sentence id
    assert tok.decode(x[0].tolist())  # ids of the DeepSeek vocabulary


def test_distinct_rows_counts_each_row_once_across_folds():
    from trainer.summary import DistinctRows

    d = DistinctRows(fold=5)
    d.add(1, np.array([3, 1, 3]))
    d.add(1, np.array([1, 7, 9, 11]))  # past `fold`: folded
    d.add(14, np.array([2, 2]))
    d.add(1, np.array([7, 12]))
    assert d.counts() == {1: 6, 14: 1}


def test_store_summary_sums_the_shards_and_divides_by_stored_params():
    from trainer.summary import store_summary

    def table(name, rows):
        return {"name": name, "num_rows": 1000, "dim": 4, "stored_rows": rows,
                "stored_bytes": rows * 12}  # fmt: skip

    shards = [{"tables": [table("engram_l1", 3), table("other", 5)]},
              {"tables": [table("engram_l1", 2)]}]  # fmt: skip
    s = store_summary(shards, {1: "engram_l1"}, {1: 5}, memory_bytes=400)
    assert s["tables"]["engram_l1"]["stored_rows"] == 5 == s["tables"]["engram_l1"]["touched_rows"]
    assert s["stored_params"] == 20 and s["bytes_per_param"] == 3.0
    assert s["memory_bytes_per_param"] == 400 / (10 * 4)  # RAM over every table's params
    assert np.isnan(store_summary(shards, {1: "engram_l1"}, {})["memory_bytes_per_param"])
