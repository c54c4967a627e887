"""Text corpus -> tokens -> deterministic (B, T+1) batches.

The default corpus needs no download: the docstrings of the Python standard library that ships
with the interpreter, plus pydoc's topic pages (about 2 MB of English technical prose). A second
built-in corpus, "libdocs", is the docstrings of numpy, networkx and sympy (installed with the
trainer's torch; about 8 MB). Two more are read from Debian's documentation packages
(trainer.debdocs), each about 40 MB of text, 10 M tokens, which a 10 M-token run reads only once:
"debdocs", the Linux kernel's and Python's documentation, and "devdocs", the manuals of fifteen
other projects (PostgreSQL, SQLite, Django, Rust, vim, scikit-learn, ...). A user corpus is a
.txt / .jsonl ("text" field) / .parquet ("text" column) file or a folder of them.

Splits are made by source document before any chunking (a .txt file cut into pieces keeps every
piece in one split), by a hash of the source's name, and the tokenizer is trained on the training
split only: no validation text is seen by the tokenizer or the model.

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

SPLITS = ("train", "val", "tune")  # tune: held apart for choosing recipes, never reported
CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TXT_DOC_CHARS = 16_000  # a .txt file is cut into documents of about this size at blank lines
LIBDOCS_PACKAGES = ("numpy", "networkx", "sympy")
_LIB_SKIP_DIRS = _SKIP_DIRS | {"testing", "_vendor", "vendor", "benchmarks"}


@dataclass(frozen=True)
class Document:
    name: str  # where it came from, e.g. "json/decoder.py" or "data.jsonl:17"
    text: str
    source: str = ""  # the source document it was cut from (a .txt file); "" = name

    @property
    def origin(self) -> str:
        """The unit a split keeps whole: the source document, else the document itself."""
        return self.source or self.name


# ---------------------------------------------------------------- corpora


def _docstring_documents(root: Path, prefix: str, skip: set[str]) -> list[Document]:
    """One document per .py file under root: its module, class and function docstrings, in a
    sorted walk (the same files always give the same corpus)."""
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
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
                docs.append(Document(prefix + path.relative_to(root).as_posix(), text))
    return docs


def stdlib_documents() -> list[Document]:
    """One document per stdlib module (its module, class and function docstrings) and one per
    pydoc topic page; sorted walk, so the same interpreter always yields the same corpus."""
    docs = _docstring_documents(Path(sysconfig.get_paths()["stdlib"]), "", _SKIP_DIRS)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        log.info("built-in corpus: this Python has no pydoc_data; using docstrings only")
        topics = {}
    for name in sorted(topics):
        if topics[name].strip():
            docs.append(Document(f"pydoc_data/topics:{name}", topics[name]))
    return docs


def libdocs_documents(packages: tuple[str, ...] = LIBDOCS_PACKAGES) -> list[Document]:
    """One document per module of the given installed packages (their docstrings; tests and
    vendored code skipped): technical prose written by those projects, not by this one."""
    import importlib.util

    docs = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"corpus libdocs needs the package {pkg!r} installed (it comes with "
                "`pip install engram[train]`); or give --corpus PATH"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        docs.extend(_docstring_documents(root, f"{pkg}/", _LIB_SKIP_DIRS))
    return docs


def _txt_documents(path: Path, name: str) -> Iterator[Document]:
    return _text_pieces(path.read_text(encoding="utf-8", errors="replace"), name)


def _text_pieces(text: str, name: str) -> Iterator[Document]:
    """One text file's documents: pieces of about _TXT_DOC_CHARS cut at blank lines, each with
    the file as its source (so a split keeps them together)."""
    buf: list[str] = []
    size = part = 0
    for para in text.split("\n\n"):
        buf.append(para)
        size += len(para)
        if size >= _TXT_DOC_CHARS:
            yield Document(f"{name}#{part}", "\n\n".join(buf), source=name)
            buf, size, part = [], 0, part + 1
    if "".join(buf).strip():
        yield Document(f"{name}#{part}", "\n\n".join(buf), source=name)


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


BUILTIN_CORPORA = {
    "stdlib": "Python standard library docstrings + pydoc topics",
    "libdocs": "docstrings of " + ", ".join(LIBDOCS_PACKAGES),
    "debdocs": "the Linux kernel and Python documentation (Debian's linux-doc-6.1, python3.11-doc)",
    "devdocs": "the manuals of 15 projects from Debian's doc packages (trainer.debdocs)",
}


def debdocs_documents(
    folder: str | os.PathLike | None = None, corpus: str = "debdocs"
) -> list[Document]:
    """The "debdocs" or "devdocs" corpus (trainer.debdocs): each text file of its packages cut
    into pieces as a .txt file of a folder corpus is, so the documents equal a folder's of them."""
    from trainer.debdocs import debdocs_texts

    return [
        doc
        for name, text in debdocs_texts(Path(folder) if folder else None, corpus)
        for doc in _text_pieces(text, name)
    ]


def load_corpus(corpus: str | os.PathLike | None = None) -> list[Document]:
    """The user's corpus at `corpus`, or a built-in one: the stdlib documentation when None or
    "stdlib", the numpy/networkx/sympy docstrings for "libdocs", the kernel and Python
    documentation for "debdocs", fifteen projects' manuals for "devdocs"."""
    if corpus is None or str(corpus) == "stdlib":
        return stdlib_documents()
    if str(corpus) == "libdocs":
        return libdocs_documents()
    if str(corpus) in ("debdocs", "devdocs"):
        return debdocs_documents(corpus=str(corpus))
    return load_documents(corpus)


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over every document's text: equal corpora give equal keys, any edit a new one."""
    h = hashlib.sha256()
    for d in docs:
        data = d.text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _rank(origin: str) -> float:
    """A uniform number in [0, 1) fixed by the source's name."""
    h = hashlib.sha256(origin.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_sources(
    docs: list[Document], val_fraction: float = 0.05, tune_fraction: float = 0.0
) -> dict[str, list[Document]]:
    """{"train", "val", "tune"} documents, split by source document (Document.origin) before any
    use: every piece of one source lands in one split. Sources are ranked by a hash of their name
    mapped to [0, 1): below val_fraction is validation, below val_fraction + tune_fraction the
    tuning split, the rest training. So the splits span the whole corpus, not its alphabetical
    tail, their sizes are the fractions in expectation, and adding a file moves no other. A split
    that comes out empty on a tiny corpus takes the source with the lowest hash.

    A corpus of a single source (one .txt file) cannot be split by source: its pieces are split in
    contiguous runs instead (validation the last pieces, tuning the ones before), with a warning.
    """
    for name, f in (("val_fraction", val_fraction), ("tune_fraction", tune_fraction)):
        if not 0.0 <= f < 1.0 or (name == "val_fraction" and f == 0.0):
            raise ConfigError(
                f"{name}={f} must lie in {'(0, 1)' if name == 'val_fraction' else '[0, 1)'}"
            )
    if val_fraction + tune_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + tune_fraction = {val_fraction + tune_fraction} leaves no training text"
        )
    n_splits = 3 if tune_fraction else 2
    if len(docs) < n_splits:
        raise ConfigError(
            f"the corpus needs at least {n_splits} documents to hold out "
            f"{'validation and tuning splits' if tune_fraction else 'a validation split'}"
        )
    origins = sorted({d.origin for d in docs}, key=_rank)
    if len(origins) >= n_splits:
        # a source's split is fixed by its hash alone, so adding a file moves no other
        where = {}
        for o in origins:
            u = _rank(o)
            where[o] = (
                "val"
                if u < val_fraction
                else "tune"
                if u < val_fraction + tune_fraction
                else "train"
            )
        # tiny corpora: make sure no asked-for split is empty (lowest / next hashes)
        wanted = ["val"] + (["tune"] if tune_fraction else [])
        for i, split in enumerate(wanted):
            if split not in where.values():
                where[origins[i]] = split
        if "train" not in where.values():
            where[origins[-1]] = "train"
        out: dict[str, list[Document]] = {"train": [], "val": [], "tune": []}
        for d in docs:
            out[where[d.origin]].append(d)
        return out
    log.warning(
        "the corpus has %d source document(s): splitting its %d pieces in contiguous runs "
        "(give a folder of several files to split by document)",
        len(origins),
        len(docs),
    )
    n = len(docs)
    n_val = max(1, round(val_fraction * n))
    n_tune = max(1, round(tune_fraction * n)) if tune_fraction else 0
    cut = n - n_val - n_tune
    return {"train": docs[:cut], "tune": docs[cut : cut + n_tune], "val": docs[cut + n_tune :]}


_MIN_PARAGRAPH = 40  # shorter paragraphs ("Returns", "Example:") are not counted as duplicates


def drop_seen_paragraphs(
    held: list[Document], train: list[Document]
) -> tuple[list[Document], dict[str, int]]:
    """The held-apart documents without the paragraphs (blank-line separated, >= 40 characters,
    compared with surrounding whitespace stripped) that occur verbatim in a training document:
    corpora repeat text across documents (a docstring copied into a topic page, a licence), and a
    repeat is training text, whatever document it sits in. Documents left empty are dropped.
    Returns (documents, {"paragraphs": dropped, "chars": dropped characters})."""

    def paragraphs(text: str) -> list[str]:
        return text.split("\n\n")

    seen = {
        p.strip() for d in train for p in paragraphs(d.text) if len(p.strip()) >= _MIN_PARAGRAPH
    }
    out, n_par, n_chars = [], 0, 0
    for d in held:
        keep = []
        for p in paragraphs(d.text):
            if len(p.strip()) >= _MIN_PARAGRAPH and p.strip() in seen:
                n_par += 1
                n_chars += len(p)
            else:
                keep.append(p)
        text = "\n\n".join(keep)
        if text.strip():
            out.append(Document(d.name, text, d.source))
    return out, {"paragraphs": n_par, "chars": n_chars}


def split_documents(
    docs: list[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """(train, val) by source document: split_sources without a tuning split."""
    s = split_sources(docs, val_fraction)
    return s["train"], s["val"]


# ---------------------------------------------------------------- tokens and batches


class TokenDataset:
    """Token streams of the train and val splits (documents joined by EOT_ID), and batches of them."""

    def __init__(
        self,
        train: np.ndarray,
        val: np.ndarray,
        vocab_size: int,
        tune: np.ndarray | None = None,
        doc_starts: dict[str, np.ndarray] | None = None,
    ):
        self.split_tokens = {"train": train, "val": val}
        if tune is not None:
            self.split_tokens["tune"] = tune
        self.vocab_size = vocab_size
        # {split: (n_docs,) stream offset of each document's first token}
        self.doc_starts = doc_starts or {}

    @classmethod
    def build(
        cls,
        docs: list[Document],
        tokenizer,
        val_fraction: float = 0.05,
        tune_fraction: float = 0.0,
        splits: dict[str, list[Document]] | None = None,
    ) -> TokenDataset:
        s = splits or split_sources(docs, val_fraction, tune_fraction)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        enc = {k: encode_documents(v, tokenizer, vocab) for k, v in s.items() if v or k != "tune"}
        return cls(
            enc["train"][0],
            enc["val"][0],
            vocab,
            enc["tune"][0] if "tune" in enc else None,
            {k: v[1] for k, v in enc.items()},
        )

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        arrays = {k: v for k, v in self.split_tokens.items()}
        arrays.update({f"starts_{k}": v for k, v in self.doc_starts.items()})
        np.savez(buf, vocab_size=np.int64(self.vocab_size), **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> TokenDataset:
        with np.load(path) as z:
            starts = {k[7:]: z[k] for k in z.files if k.startswith("starts_")}
            tune = z["tune"] if "tune" in z.files else None
            return cls(z["train"], z["val"], int(z["vocab_size"]), tune, starts)

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is unknown; use one of {SPLITS}")
        if split not in self.split_tokens:
            raise ConfigError(
                f"this dataset has no {split!r} split; prepare it with tune_fraction > 0"
            )
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

    def eval_windows(self, split: str, batch_size: int, block_size: int) -> int:
        """How many batches eval_batches yields over the whole split."""
        return ((len(self._check(split, block_size)) - 1) // block_size) // batch_size

    def eval_batches(
        self, split: str, batch_size: int, block_size: int, max_batches: int | None = None
    ) -> Iterator[np.ndarray]:
        """The split's non-overlapping (B, T+1) windows, interleaved: batch b holds windows b,
        b + n, b + 2n, ... (n = batches over the whole split), so any prefix of the batches is a
        fixed sample spread across every document, not the split's first documents. Finite; all
        batches together cover the split (but for its last partial batch of windows)."""
        toks = self._check(split, block_size)
        n_windows = (len(toks) - 1) // block_size
        n_batches = n_windows // batch_size
        if n_batches == 0:
            raise ConfigError(
                f"the {split} split holds {n_windows} windows of {block_size} tokens, "
                f"fewer than one batch of {batch_size}; lower --batch-size or --seq-len"
            )
        n_all = n_batches
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        offs = np.arange(block_size + 1)
        for b in range(n_batches):
            starts = (b + n_all * np.arange(batch_size)) * block_size  # (B,)
            yield toks[starts[:, None] + offs].astype(np.int64)  # (B, T+1)

    def eval_positions(
        self, split: str, batch_size: int, block_size: int, max_batches: int | None = None
    ) -> np.ndarray:
        """(n_batches * B * T,) stream position of every target eval_batches yields, in its
        order (target t of window w is the token at w * T + t + 1)."""
        toks = self._check(split, block_size)
        n_all = ((len(toks) - 1) // block_size) // batch_size
        n = n_all if max_batches is None else min(n_all, max_batches)
        b = np.arange(n)[:, None] + n_all * np.arange(batch_size)[None, :]  # (n, B) windows
        return (b[..., None] * block_size + np.arange(1, block_size + 1)).reshape(-1)


def encode_documents(
    docs: list[Document], tokenizer, vocab_size: int, eos: int = EOT_ID
) -> tuple[np.ndarray, np.ndarray]:
    """(stream, doc_starts): the documents' tokens each followed by `eos` (uint16 when the
    vocabulary fits, else int32), and where each document starts."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    encs = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    parts, lengths = [], []
    for enc in encs:
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.append(np.array([eos], dtype=dtype))  # the document boundary
        lengths.append(len(enc.ids) + 1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else None
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return stream, starts if starts is not None else np.zeros(0, np.int64)


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
    dropped: dict | None = None  # {split: paragraphs and characters seen verbatim in training}


def prepare_data(
    corpus: str | os.PathLike | None = None,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    docs: list[Document] | None = None,
    tune_fraction: float = 0.0,
) -> PreparedData:
    """Load the corpus, split it by source document, drop from the held-apart splits the
    paragraphs that occur verbatim in training, load or train the tokenizer on the training split
    only, load or encode the token splits.

    Everything derived is cached under cache_dir (default ~/.cache/engram) in a folder keyed by
    the training split's fingerprint and vocab size. `docs` overrides `corpus` (tests, slices).
    """
    docs = docs if docs is not None else load_corpus(corpus)
    splits = split_sources(docs, val_fraction, tune_fraction)
    dropped = {}
    for k in ("val", "tune"):
        if splits[k]:
            kept, dropped[k] = drop_seen_paragraphs(splits[k], splits["train"])
            splits[k] = kept or splits[k][:1]  # never empty: a corpus of pure repeats keeps one
    # the key covers the held-apart splits too: the token cache depends on them
    fp = corpus_fingerprint(splits["train"])
    held = corpus_fingerprint(splits["val"] + splits["tune"])[:12]
    tok, trained = load_or_train_tokenizer(
        (d.text for d in splits["train"]), fp, vocab_size, cache_dir
    )
    folder = tokenizer_dir(cache_dir, fp, vocab_size)
    tokens_path = folder / f"tokens-v2-{held}-val{val_fraction:g}-tune{tune_fraction:g}.npz"
    if tokens_path.exists() and not trained:
        dataset = TokenDataset.load(tokens_path)
    else:
        dataset = TokenDataset.build(docs, tok, splits=splits)
        dataset.save(tokens_path)
    return PreparedData(tok, dataset, fp, folder, trained, dropped)
