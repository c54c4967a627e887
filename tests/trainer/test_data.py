"""Corpus loading, tokenizer training and caching, deterministic batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

import trainer.tokenizer as tokenizer_mod
from engram_store.engine.errors import ConfigError
from trainer.data import (
    Document,
    Lookahead,
    corpus_fingerprint,
    drop_seen_paragraphs,
    load_corpus,
    load_documents,
    prepare_data,
    split_documents,
    split_sources,
    stdlib_documents,
)
from trainer.hashing import HashConfig, NgramHasher, compress_tokenizer
from trainer.tokenizer import EOT_ID, PAD_ID, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def stdlib_docs():
    return stdlib_documents()


@pytest.fixture(scope="module")
def small(stdlib_docs, tmp_path_factory):
    """~1 MB of the stdlib corpus with a 512-token vocabulary: fast to train."""
    docs, size = [], 0
    for d in stdlib_docs:
        docs.append(d)
        size += len(d.text)
        if size > 1_000_000:
            break
    prepared = prepare_data(docs=docs, vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"))
    prepared.docs = docs  # kept for the cache test
    return prepared


def test_stdlib_corpus_is_real_text_and_deterministic(stdlib_docs):
    assert len(stdlib_docs) > 100
    total = sum(len(d.text) for d in stdlib_docs)
    assert total > 500_000  # about 2 MB on CPython 3.11
    names = [d.name for d in stdlib_docs]
    assert "json/__init__.py" in names
    assert any("JSON" in d.text for d in stdlib_docs if d.name == "json/__init__.py")
    assert all(d.text.strip() for d in stdlib_docs)
    again = load_corpus("stdlib")
    assert corpus_fingerprint(again) == corpus_fingerprint(stdlib_docs)


def test_tokenizer_trains_and_caches(small, monkeypatch):
    assert small.trained_tokenizer
    tok = small.tokenizer
    assert tok.get_vocab_size() == 512
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
    assert tok.decode(tok.encode("Return the value of x.").ids) == "Return the value of x."
    assert (small.cache_dir / "tokenizer.json").exists()

    def boom(*a, **k):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", boom)
    docs = [Document(d.name, d.text) for d in small.docs]  # equal content, new objects
    again = prepare_data(docs=docs, vocab_size=512, cache_dir=small.cache_dir.parent)
    assert not again.trained_tokenizer
    assert again.tokenizer.to_str() == tok.to_str()
    for split in ("train", "val"):
        assert np.array_equal(again.dataset.tokens(split), small.dataset.tokens(split))


def test_split_and_batches(small):
    ds = small.dataset
    train, val = ds.tokens("train"), ds.tokens("val")
    assert len(val) > 0 and 0.01 < len(val) / (len(train) + len(val)) < 0.15
    assert train.max() < 512 and (train == EOT_ID).sum() > 10
    b = ds.batch("train", 4, 32, seed=7, step=3)
    assert b.shape == (4, 33) and b.dtype == np.int64
    assert np.array_equal(b, ds.batch("train", 4, 32, seed=7, step=3))
    assert not np.array_equal(b, ds.batch("train", 4, 32, seed=7, step=4))
    assert not np.array_equal(b, ds.batch("train", 4, 32, seed=7, step=3, rank=1))
    # every row is a contiguous window of the stream
    row = b[0]
    starts = np.flatnonzero(train[: len(train) - 32] == row[0])
    assert any(np.array_equal(train[s : s + 33], row) for s in starts)
    # the iterator is batch(step) for consecutive steps; resuming at step 5 continues identically
    it = ds.batches("train", 4, 32, seed=7)
    seq = [next(it) for _ in range(7)]
    resumed = ds.batches("train", 4, 32, seed=7, start_step=5)
    assert np.array_equal(next(resumed), seq[5]) and np.array_equal(next(resumed), seq[6])
    ev = list(ds.eval_batches("val", 2, 16, max_batches=3))
    n_all = ((len(val) - 1) // 16) // 2  # batches over the whole split
    # interleaved: batch 0 holds windows 0 and n_all, so a prefix spans the whole split
    w1 = n_all * 16
    assert (
        len(ev) == 3
        and np.array_equal(ev[0][0], val[:17])
        and np.array_equal(ev[0][1], val[w1 : w1 + 17])
        and np.array_equal(ev[1][0], val[16:33])
    )
    full = np.concatenate(list(ds.eval_batches("val", 2, 16)))  # (2 * n_all, 17)
    assert len(full) == 2 * n_all
    pos = ds.eval_positions("val", 2, 16)
    assert pos.shape == (2 * n_all * 16,)
    assert np.array_equal(np.sort(pos), np.arange(1, 2 * n_all * 16 + 1))
    assert np.array_equal(
        val[pos], np.concatenate([b[:, 1:] for b in ds.eval_batches("val", 2, 16)]).reshape(-1)
    )
    with pytest.raises(ConfigError, match="--seq-len"):
        ds.batch("val", 1, len(val) + 5)
    with pytest.raises(ConfigError, match="split"):
        ds.batch("test", 1, 4)


def test_batches_hash_with_real_tokenizer(small):
    lookup, size = compress_tokenizer(small.tokenizer)
    assert lookup.shape == (512,) and size < 512
    hasher = NgramHasher(
        HashConfig(layers=(1,), heads=2, base_sizes=(101, 103), pad_id=PAD_ID, n_embed_per_ngram=8),
        lookup,
        size,
    )
    rows = hasher.hash(small.dataset.batch("train", 2, 16)[:, :-1])[1]
    assert rows.shape == (2, 16, 4)


def test_lookahead():
    la = Lookahead(iter(range(5)))
    assert la.peek(3) == [0, 1, 2]
    assert next(la) == 0
    assert la.peek(10) == [1, 2, 3, 4]
    assert list(la) == [1, 2, 3, 4]
    assert la.peek(2) == []


def test_split_documents_spreads_val():
    docs = [Document(f"{i:03d}", f"doc {i}") for i in range(400)]
    train, val = split_documents(docs, 0.05)
    assert 8 <= len(val) <= 35 and len(train) + len(val) == 400  # 20 expected
    assert {d.name for d in val}.isdisjoint(d.name for d in train)
    # hash-ranked, not the alphabetical tail: validation names spread over the range
    assert max(int(d.name) for d in val) - min(int(d.name) for d in val) > 30
    # stable: adding documents moves none of the old ones between splits
    more = docs + [Document(f"x{i}", "more") for i in range(20)]
    s2 = split_sources(more, 0.05)
    old_val = {d.name for d in val}
    assert all(d.name not in old_val for d in s2["train"] if not d.name.startswith("x"))
    with pytest.raises(ConfigError, match="val_fraction"):
        split_documents(docs, 0.0)
    with pytest.raises(ConfigError, match="no training text"):
        split_sources(docs, 0.5, 0.5)


def test_split_keeps_every_piece_of_a_source_together(tmp_path):
    """A .txt file cut into ~16 k-character pieces is one source: no file has pieces in two
    splits (the leak issue 13 found: 71% of validation text from files also in training)."""
    para = "A paragraph about topic {f}, sentence {p}. " * 40
    for f in range(30):
        body = "\n\n".join(para.format(f=f, p=p) for p in range(60))  # ~100 k chars: 6+ pieces
        (tmp_path / f"file{f:02d}.txt").write_text(body)
    docs = load_corpus(tmp_path)
    assert len(docs) > 30 * 5
    s = split_sources(docs, 0.1, 0.1)
    where = {}
    for split, ds in s.items():
        for d in ds:
            assert where.setdefault(d.source, split) == split, d.name
    assert all(s[k] for k in ("val", "tune", "train"))
    assert sum(len({d.source for d in s[k]}) for k in s) == 30


def test_single_source_splits_contiguously(tmp_path, caplog):
    (tmp_path / "one.txt").write_text("\n\n".join(f"para {i} " * 2000 for i in range(40)))
    docs = load_corpus(tmp_path)
    s = split_sources(docs, 0.1)
    names = [d.name for d in docs]
    assert [d.name for d in s["val"]] == names[-len(s["val"]) :]
    assert "contiguous" in caplog.text


def test_tokenizer_sees_only_the_training_split(tmp_path):
    """A word that occurs only in validation documents never becomes a tokenizer merge."""
    docs = [Document(f"d{i}", "the common words of training " * 50) for i in range(40)]
    val_names = {d.name for d in split_sources(docs, 0.05)["val"]}
    docs = [Document(d.name, "qqxyzzyqq " * 300) if d.name in val_names else d for d in docs]
    prepared = prepare_data(docs=docs, vocab_size=300, cache_dir=tmp_path / "c")
    vocab = prepared.tokenizer.get_vocab()
    assert not any("xyzzy" in t for t in vocab)
    assert len(prepared.tokenizer.encode("qqxyzzyqq").ids) > 3


def test_prepare_with_tune_split(small):
    docs = small.docs
    prepared = prepare_data(
        docs=docs, vocab_size=512, cache_dir=small.cache_dir.parent, tune_fraction=0.05
    )
    ds = prepared.dataset
    assert len(ds.tokens("tune")) > 1000 and len(ds.tokens("val")) > 1000
    # the three splits are disjoint by document
    s = split_sources(docs, 0.05, 0.05)
    assert {d.name for d in s["tune"]}.isdisjoint(d.name for d in s["val"])
    assert ds.doc_starts["val"][0] == 0 and len(ds.doc_starts["val"]) == len(s["val"])
    with pytest.raises(ConfigError, match="tune"):
        small.dataset.tokens("tune")


def test_user_corpus_files(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"json line {i}", "meta": i}) + "\n")
        f.write("\n")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    sub = tmp_path / "sub"
    sub.mkdir()
    pq.write_table(
        pa.table({"text": ["parquet row 0", None, "parquet row 2"], "n": [0, 1, 2]}),
        sub / "c.parquet",
    )
    (tmp_path / "ignored.csv").write_text("x,y\n")

    assert [d.text for d in load_documents(tmp_path / "a.txt")] == [
        "First paragraph.\n\nSecond paragraph.\n"
    ]
    assert [d.text for d in load_documents(tmp_path / "b.jsonl")] == [
        f"json line {i}" for i in range(3)
    ]
    assert [d.text for d in load_documents(sub / "c.parquet")] == ["parquet row 0", "parquet row 2"]
    docs = load_corpus(tmp_path)
    assert [d.name for d in docs] == [
        "a.txt#0",
        "b.jsonl:1",
        "b.jsonl:2",
        "b.jsonl:3",
        "sub/c.parquet:0",
        "sub/c.parquet:2",
    ]
    prepared = prepare_data(str(tmp_path), vocab_size=300, cache_dir=tmp_path / "cache")
    # a tiny corpus runs out of merges before 300: the real size is what the model must use
    assert prepared.dataset.vocab_size <= 300 and len(prepared.dataset.tokens("train")) > 0


def test_bad_corpus(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ConfigError, match=r"\.txt"):
        load_corpus(tmp_path / "x.csv")
    with pytest.raises(ConfigError, match="no .* files"):
        load_corpus(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match="text"):
        load_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="vocab_size"):
        tokenizer_mod.train_tokenizer(["abc"], vocab_size=100)


def test_held_apart_splits_drop_paragraphs_seen_in_training(tmp_path):
    """A paragraph repeated verbatim across documents is training text wherever it sits: it is
    removed from validation and tuning documents (short lines such as "Returns" are kept)."""
    shared = "This paragraph is copied into many documents, verbatim, as licences are."
    docs = [
        Document(f"d{i:02d}", f"Document {i} says something of its own, at length.\n\n{shared}")
        for i in range(60)
    ]
    s = split_sources(docs, 0.1, 0.1)
    kept, dropped = drop_seen_paragraphs(s["val"] + s["tune"], s["train"])
    assert dropped["paragraphs"] == len(s["val"]) + len(s["tune"]) > 0
    assert all(shared not in d.text and "of its own" in d.text for d in kept)
    prepared = prepare_data(
        docs=docs, vocab_size=300, cache_dir=tmp_path, val_fraction=0.1, tune_fraction=0.1
    )
    assert prepared.dropped["val"]["paragraphs"] == len(s["val"])
    val_text = prepared.tokenizer.decode(prepared.dataset.tokens("val").tolist())
    assert "licences" not in val_text and "of its own" in val_text
    short = [Document("x", "Returns\n\nsomething")]
    assert drop_seen_paragraphs(short, short)[1]["paragraphs"] == 0
