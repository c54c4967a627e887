"""A byte-level BPE tokenizer (HF `tokenizers`) trained on the corpus and cached on disk.

The cache key is (corpus fingerprint, vocab size), so a second run on the same corpus, or another
process of the same job, loads the tokenizer instead of training it. Files are written to a temp
name and renamed, so concurrent workers never read a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_store.engine.errors import ConfigError

# Fixed ids 0..2: the end-of-text separator between documents, and a pad id equal to
# HashConfig's default pad_id (2), which the n-gram hash pads the first positions with.
SPECIAL_TOKENS = ("<|endoftext|>", "<|bos|>", "<|pad|>")
EOT_ID = 0
PAD_ID = 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens


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
