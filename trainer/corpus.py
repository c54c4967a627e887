"""Tokens to train on: a Corpus (batches plus what the hasher needs of the tokenizer) from the
built-in corpus, a text path or synthetic tokens, and each worker's share of the global batch.

Torch-free: batches are int64 numpy arrays; the row source moves them to the device.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.config import TrainConfig

SPLIT_IDS = {"train": 0, "val": 1, "tune": 2}


@dataclass
class Corpus:
    """Tokens for training and validation plus what the hasher needs of the tokenizer."""

    vocab_size: int
    pad_id: int
    fingerprint: str  # identifies the tokenizer: a checkpoint only resumes with the same one
    lookup: np.ndarray  # (V,) base id -> compressed id (docs/algorithm.md step 1)
    compressed_vocab: int
    batches: Callable[..., Iterator[tuple[np.ndarray, np.ndarray]]]
    # batches(split, batch_size, seq_len, seed, start_step) -> endless (x, y) int64 (B, T)
    tokenizer: Any = None
    train_tokens: int | None = None  # the training split's size; None: an endless stream


def synthetic_corpus(vocab_size: int) -> Corpus:
    """Random tokens from a Zipf-like distribution (repeated n-grams, as in text). For tests."""
    p = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    p /= p.sum()

    def batches(split: str, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        step = start_step
        while True:
            rng = np.random.default_rng([seed, SPLIT_IDS[split], step])
            toks = rng.choice(vocab_size, size=(batch_size, seq_len + 1), p=p).astype(np.int64)
            yield toks[:, :-1], toks[:, 1:]  # (B, T) inputs, (B, T) targets
            step += 1

    return Corpus(
        vocab_size,
        0,
        f"synthetic-{vocab_size}",
        np.arange(vocab_size, dtype=np.int64),
        vocab_size,
        batches,
    )


def load_corpus(cfg: TrainConfig) -> Corpus:
    """The configured corpus: built-in (Python docstrings, BPE), a path, or synthetic tokens."""
    return _load_corpus(cfg.corpus, cfg.vocab_size)


@functools.lru_cache(maxsize=4)
def _load_corpus(corpus: str, vocab_size: int) -> Corpus:
    """Cached per process: reading the built-in corpus parses the stdlib (seconds)."""
    if corpus == "synthetic":
        return synthetic_corpus(vocab_size)
    from trainer import data

    return corpus_from_prepared(
        data.prepare_data(None if corpus in ("builtin", "") else corpus, vocab_size)
    )


def corpus_from_prepared(prep: Any) -> Corpus:
    """A Corpus over trainer.data.prepare_data's result (its tokenizer trained on the corpus)."""
    from trainer.tokenizer import PAD_ID

    vocab = prep.tokenizer.get_vocab_size(with_added_tokens=True)
    return corpus_over(prep.dataset, prep.tokenizer, vocab, PAD_ID)


def corpus_over(ds: Any, tokenizer: Any, vocab_size: int, pad_id: int) -> Corpus:
    """A Corpus over a trainer.data.TokenDataset and the tokenizer that encoded it: train
    batches from the seeded sampler, validation as the split's interleaved eval windows, cycled;
    the hash's lookup is the tokenizer's compression."""
    from trainer.hashing import compress_tokenizer

    lookup, compressed = compress_tokenizer(tokenizer)

    def batches(split: str, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        if split == "train":
            for b in ds.batches("train", batch_size, seq_len, seed, start_step=start_step):
                yield b[:, :-1], b[:, 1:]  # (B, T) inputs, (B, T) targets
            return
        while True:  # validation: the split's eval windows (interleaved over it), cycled
            for b in ds.eval_batches(split, batch_size, seq_len):
                yield b[:, :-1], b[:, 1:]

    fingerprint = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    return Corpus(
        vocab_size,
        pad_id,
        fingerprint,
        lookup,
        compressed,
        batches,
        tokenizer,
        train_tokens=int(len(ds.split_tokens["train"])),
    )


def worker_batches(
    corpus: Corpus, split: str, cfg: TrainConfig, rank: int, world: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This worker's share of the global batch: rows [rank*B, (rank+1)*B) of each global batch.

    Every worker draws the same global batch, so W workers see exactly the batch that a single
    process with batch_size * W sees (what makes multi-worker sync training exact).
    """
    B = cfg.batch_size
    for x, y in corpus.batches(split, B * world, cfg.seq_len, cfg.seed, start_step):
        yield x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]  # (B, T) each
