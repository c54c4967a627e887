"""docs/algorithm.md steps 1-4 against the numbers in docs/algorithm.md and a loop-based reference written here."""

from __future__ import annotations

import numpy as np
import pytest

from engram_store.engine.config import TableConfig
from engram_store.engine.errors import ConfigError, InvalidArgument
from trainer.hashing import (
    HashConfig,
    NgramHasher,
    compress_tokenizer,
    compress_vocab,
    head_primes,
    is_prime,
    layer_multipliers,
    normalize_token_text,
)

# ------------------------------------------------------------------ the reference, written plainly


def ref_is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def ref_primes(layers, max_ngram, heads, base_sizes):
    seen = []
    out = {}
    for layer in layers:
        out[layer] = []
        for n in range(2, max_ngram + 1):
            start = base_sizes[n - 2] - 1
            row = []
            for _ in range(heads):
                c = start + 1
                while not ref_is_prime(c) or c in seen:
                    c += 1
                seen.append(c)
                row.append(c)
                start = c
            out[layer].append(row)
    return out


def to_int64(v: int) -> int:
    """Python int -> the value an int64 register holds after wrap-around."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def ref_hash(ids, lookup, vocab_c, layers, max_ngram, heads, base_sizes, pad_id, seed):
    """Token by token, head by head; returns {layer: (rows, global rows)} as nested lists."""
    primes = ref_primes(layers, max_ngram, heads, base_sizes)
    pad = int(lookup[pad_id])
    out = {}
    for layer in layers:
        rng = np.random.default_rng(seed + 10007 * layer)
        half = max(1, (2**63 - 1) // vocab_c // 2)
        mult = [2 * int(r) + 1 for r in rng.integers(0, half, size=max_ngram, dtype=np.int64)]
        flat = [p for order in primes[layer] for p in order]
        rows, grows = [], []
        for b in range(len(ids)):
            rrow, grow = [], []
            for t in range(len(ids[b])):
                cell, gcell = [], []
                for n in range(2, max_ngram + 1):
                    mix = 0
                    for k in range(n):
                        tok = int(lookup[ids[b][t - k]]) if t - k >= 0 else pad
                        mix ^= to_int64(tok * mult[k])
                    for j in range(heads):
                        p = primes[layer][n - 2][j]
                        r = mix % p  # Python % is floor modulo
                        head = (n - 2) * heads + j
                        cell.append(r)
                        gcell.append(r + sum(flat[:head]))
                rrow.append(cell)
                grow.append(gcell)
            rows.append(rrow)
            grows.append(grow)
        out[layer] = (rows, grows)
    return out


# ------------------------------------------------------------------ step 3


def test_primes_of_engram_md():
    primes = head_primes(HashConfig(layers=(1, 15)))
    assert primes[1][0] == [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]
    flat = [p for layer in primes.values() for order in layer for p in order]
    assert len(flat) == len(set(flat)) == 2 * 2 * 8
    assert all(is_prime(p) for p in flat)
    # layer 15 continues above every prime taken by layer 1
    assert min(primes[15][0]) > max(primes[1][0])
    assert sum(flat[:16]) == NgramHasher(HashConfig(), np.arange(10)).num_rows(1)


def test_primes_match_reference_small():
    cfg = HashConfig(
        layers=(3, 0, 2), max_ngram=3, heads=4, base_sizes=(50, 40), n_embed_per_ngram=8
    )
    assert head_primes(cfg) == ref_primes((3, 0, 2), 3, 4, (50, 40))


def test_is_prime_against_trial_division():
    assert [n for n in range(2000) if is_prime(n)] == [n for n in range(2000) if ref_is_prime(n)]
    assert is_prime(2**61 - 1) and not is_prime((2**31 - 1) * (2**31 - 1))


# ------------------------------------------------------------------ step 2


def test_multipliers_are_odd_and_seeded():
    m = layer_multipliers(1, 100_000, 3, 0)
    assert m.dtype == np.int64 and m.shape == (3,) and np.all(m % 2 == 1)
    assert np.array_equal(m, layer_multipliers(1, 100_000, 3, 0))
    assert not np.array_equal(m, layer_multipliers(2, 100_000, 3, 0))
    half = (2**63 - 1) // 100_000 // 2
    assert np.all((m - 1) // 2 < half)


# ------------------------------------------------------------------ step 4


@pytest.mark.parametrize(
    "layers,max_ngram,heads",
    [((1, 15), 3, 8), ((0,), 2, 1), ((2, 5, 7), 3, 1), ((4, 1), 2, 8), ((0, 1), 4, 2)],
)
def test_hash_matches_loop_reference(layers, max_ngram, heads):
    rng = np.random.default_rng(123)
    V = 300
    # a lookup with collisions, as compression makes
    lookup = rng.integers(0, 200, size=V).astype(np.int64)
    vocab_c = int(lookup.max()) + 1
    base = tuple(int(b) for b in rng.integers(30, 5000, size=max_ngram - 1))
    cfg = HashConfig(
        layers=layers,
        max_ngram=max_ngram,
        heads=heads,
        base_sizes=base,
        pad_id=7,
        seed=5,
        n_embed_per_ngram=heads * 4,
    )
    hasher = NgramHasher(cfg, lookup, vocab_c)
    for B, T in [(3, 11), (1, 1), (2, 2)]:
        ids = rng.integers(0, V, size=(B, T))
        got = hasher.hash(ids)
        got_g = hasher.global_ids(ids)
        want = ref_hash(ids.tolist(), lookup, vocab_c, layers, max_ngram, heads, base, 7, 5)
        for layer in layers:
            assert got[layer].dtype == np.int64
            assert got[layer].shape == (B, T, (max_ngram - 1) * heads)
            assert got[layer].tolist() == want[layer][0]
            assert got_g[layer].tolist() == want[layer][1]


def test_hash_big_vocab_exercises_wraparound():
    """A 128k vocabulary makes x*m overflow int64 regularly; the reference wraps the same way."""
    rng = np.random.default_rng(9)
    V = 129280
    lookup = np.arange(V, dtype=np.int64)
    hasher = NgramHasher(HashConfig(layers=(1, 15)), lookup, V)
    ids = rng.integers(0, V, size=(2, 9))
    want = ref_hash(ids.tolist(), lookup, V, (1, 15), 3, 8, (646400, 646400), 2, 0)
    got = hasher.hash(ids)
    for layer in (1, 15):
        assert got[layer].tolist() == want[layer][0]
        assert got[layer].min() >= 0


def test_global_ids_within_table_and_spec():
    cfg = HashConfig(layers=(1, 3), heads=2, base_sizes=(101, 211), n_embed_per_ngram=16)
    hasher = NgramHasher(cfg, np.arange(50), 50)
    spec = hasher.table_spec(3, init_std=0.02)
    assert isinstance(spec, TableConfig)
    assert spec.name == "engram_l3" and spec.dim == 8 and spec.init_std == 0.02
    assert spec.head_rows == tuple(p for order in head_primes(cfg)[3] for p in order)
    spec.validate()
    g = hasher.global_ids(np.random.default_rng(0).integers(0, 50, size=(4, 20)))[3]
    assert g.min() >= 0 and g.max() < spec.num_rows
    offs = np.array(spec.head_offsets())
    heads = np.array(spec.head_rows)
    assert np.all((g >= offs) & (g < offs + heads))
    with pytest.raises(ConfigError, match="not an Engram layer"):
        hasher.table_spec(2)


def test_hash_rejects_bad_ids():
    hasher = NgramHasher(HashConfig(layers=(0,)), np.arange(10))
    with pytest.raises(InvalidArgument, match=r"\[0, 10\)"):
        hasher.hash(np.array([[1, 10]]))
    with pytest.raises(InvalidArgument, match="shape"):
        hasher.hash(np.array([1, 2]))


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_ngram=1, base_sizes=()), "max_ngram"),
        (dict(max_ngram=3, base_sizes=(100,)), "base_sizes"),
        (dict(heads=0), "heads"),
        (dict(heads=3, n_embed_per_ngram=8), "n_embed_per_ngram"),
        (dict(layers=(1, 1)), "layers"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        HashConfig(**kwargs)


def test_pad_id_outside_vocab():
    with pytest.raises(ConfigError, match="pad_id"):
        NgramHasher(HashConfig(pad_id=20), np.arange(10))


# ------------------------------------------------------------------ step 1


def test_normalize_token_text():
    assert normalize_token_text("Hello") == "hello"
    assert normalize_token_text(" Café") == "cafe"
    assert normalize_token_text("ＡＢＣ") == "abc"  # NFKC folds full-width letters
    assert normalize_token_text(" ") == " "
    assert normalize_token_text("\t\n") == " "  # one run of whitespace -> exactly one space
    assert normalize_token_text("  a \t b  ") == "a b"
    assert normalize_token_text("\u0301") == ""  # a lone combining accent normalises away
    assert normalize_token_text("\x1c") == "\x1c"  # not Unicode White_Space: kept, as the reference


def test_normalize_matches_hf_normalizer():
    """The reference builds its normaliser from HF `tokenizers`; ours is stdlib only."""
    normalizers = pytest.importorskip("tokenizers.normalizers")
    from tokenizers import Regex

    sentinel = "\ue000"
    hf = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), sentinel),
            normalizers.Strip(),
            normalizers.Replace(sentinel, " "),
        ]
    )
    samples = [
        "Hello",
        " World",
        "ÉCOLE",
        "naïve ",
        "\n\n",
        " ",
        "  ",
        "\u0301",
        "ﬁ",
        "Ⅻ",
        "ß",
        "İ",
        " \u00a0x",
        "a\u3000",
        "\x1c",
        "\t",
        "Ωmega",
        "ǅ",
        "x\r\ny",
        "",
        "😀",
        "\u200b",
    ]
    for s in samples:
        assert normalize_token_text(s) == hf.normalize_str(s), repr(s)


def test_compress_vocab_crafted_tokens():
    decoded = [
        "<pad>",
        "Hello",
        "hello",
        " hello",
        "HÉLLO",
        "\ufffd",
        "\ufffd",
        "\u0301",
        "\n",
        " ",
        "\t\t",
        "world",
        "\u0301",
    ]
    raw = [
        "<pad>",
        "Hello",
        "hello",
        "Ġhello",
        "HÉLLO",
        "Ã",
        "Ä",
        "X",
        "Ċ",
        "Ġ",
        "ĉĉ",
        "world",
        "Y",
    ]
    lookup, size = compress_vocab(decoded, raw)
    assert lookup.dtype == np.int64
    # 0 <pad>; 1 hello (x4, case, accent, leading space); 2 "Ã" and 3 "Ä" (U+FFFD: raw keys);
    # 4 "\u0301" (normalises to empty: keyed by its own text); 5 " " (newline, space and tabs);
    # 6 world; the second "\u0301" joins 4
    assert lookup.tolist() == [0, 1, 1, 1, 1, 2, 3, 4, 5, 5, 5, 6, 4]
    assert size == 7


def test_compress_vocab_length_mismatch():
    with pytest.raises(InvalidArgument):
        compress_vocab(["a"], [])


def test_compress_tokenizer_duck_typed():
    class Tok:
        vocab = ["A", "a", "\ufffd", "b"]

        def get_vocab_size(self, with_added_tokens=True):
            return len(self.vocab)

        def decode(self, ids, skip_special_tokens=False):
            return self.vocab[ids[0]]

        def id_to_token(self, i):
            return f"raw{i}"

    lookup, size = compress_tokenizer(Tok())
    assert lookup.tolist() == [0, 0, 1, 2] and size == 3
