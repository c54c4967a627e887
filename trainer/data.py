"""Text corpus -> tokens -> deterministic (B, T+1) batches.

The default corpus needs no download: the docstrings of the Python standard library that ships
with the interpreter, plus pydoc's topic pages (about 2 MB of English technical prose). A user
corpus is a .txt / .jsonl ("text" field) / .parquet ("text" column) file or a folder of them.

Batches are a pure function of (split, batch size, block size, seed, rank, step), so a prefetcher
can compute the token ids of batches ahead of the one being trained on, and a resumed run sees the
same batches as an uninterrupted one (pass start_step).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from engram_store.engine.errors import ConfigError
from trainer.tokenizer import EOT_ID, atomic_write_bytes, load_or_train_tokenizer, tokenizer_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TXT_DOC_CHARS = 16_000  # a .txt file is cut into documents of about this size at blank lines


@dataclass(frozen=True)
class Document:
    name: str  # where it came from, e.g. "json/decoder.py" or "data.jsonl:17"
    text: str


# ---------------------------------------------------------------- corpora


def stdlib_documents() -> list[Document]:
    """One document per stdlib module (its module, class and function docstrings) and one per
    pydoc topic page; sorted walk, so the same interpreter always yields the same corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError) as e:
                # a few stdlib files are deliberately invalid (lib2to3 fixtures, ...)
                log.debug("built-in corpus: skipping %s (%s)", path, e)
                continue
            parts = [
                ast.get_docstring(node)
                for node in ast.walk(tree)
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                )
            ]
            text = "\n\n".join(p for p in parts if p)
            if text.strip():
                docs.append(Document(path.relative_to(root).as_posix(), text))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        log.info("built-in corpus: this Python has no pydoc_data; using docstrings only")
        topics = {}
    for name in sorted(topics):
        if topics[name].strip():
            docs.append(Document(f"pydoc_data/topics:{name}", topics[name]))
    return docs


def _txt_documents(path: Path, name: str) -> Iterator[Document]:
    buf: list[str] = []
    size = part = 0
    for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        buf.append(para)
        size += len(para)
        if size >= _TXT_DOC_CHARS:
            yield Document(f"{name}#{part}", "\n\n".join(buf))
            buf, size, part = [], 0, part + 1
    if "".join(buf).strip():
        yield Document(f"{name}#{part}", "\n\n".join(buf))


def _jsonl_documents(path: Path, name: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(
                    f'{path}:{lineno}: each line must be a JSON object with a "text" field ({e})'
                ) from None
            if isinstance(text, str) and text:
                yield Document(f"{name}:{lineno}", text)


def _parquet_documents(path: Path, name: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq  # only a parquet corpus needs pyarrow (not in [train])
    except ImportError:
        raise ConfigError(
            f"{path}: a .parquet corpus needs pyarrow; `pip install pyarrow`, or give the "
            "corpus as .txt / .jsonl"
        ) from None

    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ConfigError(f'{path}: no "text" column (columns: {pf.schema_arrow.names})')
    row = 0
    for batch in pf.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text:
                yield Document(f"{name}:{row}", text)
            row += 1


def load_documents(path: str | os.PathLike) -> list[Document]:
    """Documents of a .txt / .jsonl / .parquet file, or of every such file under a folder (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in CORPUS_SUFFIXES)
        if not files:
            raise ConfigError(f"--corpus {p}: no {'/'.join(CORPUS_SUFFIXES)} files in this folder")
        base = p
    elif p.is_file():
        if p.suffix not in CORPUS_SUFFIXES:
            raise ConfigError(f"--corpus {p}: use a {'/'.join(CORPUS_SUFFIXES)} file or a folder")
        files, base = [p], p.parent
    else:
        raise ConfigError(f"--corpus {p}: no such file or folder")
    reader = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    docs = []
    for f in files:
        docs.extend(reader[f.suffix](f, f.relative_to(base).as_posix()))
    if not docs:
        raise ConfigError(f"--corpus {p}: no text found")
    return docs


def load_corpus(corpus: str | os.PathLike | None = None) -> list[Document]:
    """The user's corpus at `corpus`, or the stdlib documentation when None or "stdlib"."""
    if corpus is None or str(corpus) == "stdlib":
        return stdlib_documents()
    return load_documents(corpus)


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over every document's text: equal corpora give equal keys, any edit a new one."""
    h = hashlib.sha256()
    for d in docs:
        data = d.text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def split_documents(
    docs: list[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """(train, val): every round(1/val_fraction)-th document goes to validation, so both splits
    span the whole corpus rather than its alphabetical tail."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must lie in (0, 1)")
    if len(docs) < 2:
        raise ConfigError("the corpus needs at least 2 documents to hold out a validation split")
    every = max(2, round(1 / val_fraction))
    val = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, val


# ---------------------------------------------------------------- tokens and batches


class TokenDataset:
    """Token streams of the train and val splits (documents joined by EOT_ID), and batches of them."""

    def __init__(self, train: np.ndarray, val: np.ndarray, vocab_size: int):
        self.split_tokens = {"train": train, "val": val}
        self.vocab_size = vocab_size

    @classmethod
    def build(cls, docs: list[Document], tokenizer, val_fraction: float = 0.05) -> TokenDataset:
        train, val = split_documents(docs, val_fraction)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        return cls(_encode(train, tokenizer, vocab), _encode(val, tokenizer, vocab), vocab)

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            train=self.split_tokens["train"],
            val=self.split_tokens["val"],
            vocab_size=np.int64(self.vocab_size),
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> TokenDataset:
        with np.load(path) as z:
            return cls(z["train"], z["val"], int(z["vocab_size"]))

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is unknown; use one of {SPLITS}")
        return self.split_tokens[split]

    def _check(self, split: str, block_size: int) -> np.ndarray:
        toks = self.tokens(split)
        if len(toks) < block_size + 1:
            raise ConfigError(
                f"the {split} split has {len(toks)} tokens, fewer than block_size+1 = "
                f"{block_size + 1}; use a larger corpus or a smaller --seq-len"
            )
        return toks

    def batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        step: int = 0,
        rank: int = 0,
    ) -> np.ndarray:
        """int64 (B, T+1) random windows: a pure function of the arguments (inputs [:, :-1],
        targets [:, 1:]). Give each data-parallel worker its own rank."""
        toks = self._check(split, block_size)
        rng = np.random.default_rng([seed, rank, step])
        starts = rng.integers(0, len(toks) - block_size, size=batch_size)  # (B,)
        return toks[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)

    def batches(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
    ) -> Iterator[np.ndarray]:
        """Endless batch(step) for step = start_step, start_step+1, ..."""
        step = start_step
        while True:
            yield self.batch(split, batch_size, block_size, seed, step, rank)
            step += 1

    def eval_batches(
        self, split: str, batch_size: int, block_size: int, max_batches: int | None = None
    ) -> Iterator[np.ndarray]:
        """Consecutive non-overlapping (B, T+1) windows from the start of the split; finite."""
        toks = self._check(split, block_size)
        n_windows = (len(toks) - 1) // block_size
        n_batches = n_windows // batch_size
        if n_batches == 0:
            raise ConfigError(
                f"the {split} split holds {n_windows} windows of {block_size} tokens, "
                f"fewer than one batch of {batch_size}; lower --batch-size or --seq-len"
            )
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        offs = np.arange(block_size + 1)
        for b in range(n_batches):
            starts = (b * batch_size + np.arange(batch_size)) * block_size  # (B,)
            yield toks[starts[:, None] + offs].astype(np.int64)  # (B, T+1)


def _encode(docs: list[Document], tokenizer, vocab_size: int) -> np.ndarray:
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    encs = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    parts = []
    for enc in encs:
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.append(np.array([EOT_ID], dtype=dtype))  # the document boundary
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


T_ = TypeVar("T_")


class Lookahead(Generic[T_]):
    """An iterator whose next items can be inspected before they are consumed.

    `peek(k)` returns the next k items (fewer at the end) without consuming them; the prefetcher
    hashes the token ids of batches it has not trained on yet.
    """

    def __init__(self, it: Iterable[T_]):
        self._it = iter(it)
        self._buf: list[T_] = []

    def peek(self, k: int = 1) -> list[T_]:
        while len(self._buf) < k:
            try:
                self._buf.append(next(self._it))
            except StopIteration:
                break
        return self._buf[:k]

    def __iter__(self) -> Lookahead[T_]:
        return self

    def __next__(self) -> T_:
        if self._buf:
            return self._buf.pop(0)
        return next(self._it)


# ---------------------------------------------------------------- one call for the trainer


@dataclass
class PreparedData:
    tokenizer: object  # tokenizers.Tokenizer
    dataset: TokenDataset
    fingerprint: str
    cache_dir: Path
    trained_tokenizer: bool  # False: the tokenizer came from the cache


def prepare_data(
    corpus: str | os.PathLike | None = None,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    docs: list[Document] | None = None,
) -> PreparedData:
    """Load the corpus, load or train its tokenizer, load or encode its token splits.

    Everything derived is cached under cache_dir (default ~/.cache/engram) in a folder keyed by
    the corpus fingerprint and vocab size. `docs` overrides `corpus` (tests, slices).
    """
    docs = docs if docs is not None else load_corpus(corpus)
    fp = corpus_fingerprint(docs)
    tok, trained = load_or_train_tokenizer((d.text for d in docs), fp, vocab_size, cache_dir)
    folder = tokenizer_dir(cache_dir, fp, vocab_size)
    tokens_path = folder / f"tokens-val{val_fraction:g}.npz"
    if tokens_path.exists() and not trained:
        dataset = TokenDataset.load(tokens_path)
    else:
        dataset = TokenDataset.build(docs, tok, val_fraction)
        dataset.save(tokens_path)
    return PreparedData(tok, dataset, fp, folder, trained)
