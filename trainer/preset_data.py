"""Tokens of a preset run: the corpus tokenized with the preset's own base tokenizer (not one
trained on the corpus), so the n-gram hash sees the ids, and the compressed vocabulary, that the
preset's tables were trained with. Torch-free.

    corpus = run_corpus(cfg)   # cfg.preset set: this module's Corpus; else trainer.corpus's
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from trainer.config import TrainConfig
from trainer.corpus import Corpus, load_corpus
from trainer.data import Document, TokenDataset, split_documents

#: the document separator of a preset corpus: the base tokenizer's end-of-sequence token
_EOS_TOKENS = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>")


def run_corpus(cfg: TrainConfig) -> Corpus:
    """The Corpus a run trains on: the preset's (preset_corpus) or trainer.corpus.load_corpus."""
    if cfg.preset:
        return preset_corpus(cfg.preset, cfg.corpus)
    return load_corpus(cfg)


@functools.lru_cache(maxsize=2)
def preset_corpus(name: str, corpus: str = "builtin", val_fraction: float = 0.05) -> Corpus:
    """`corpus` ("builtin": Python's docstrings; else a .txt/.jsonl/.parquet file or folder) as
    tokens of preset `name`'s base tokenizer, documents joined by its end-of-sequence token; the
    hash's lookup is that tokenizer's compression (Preset.hasher's), its pad id the preset's.
    Cached per process (the tokenizer's compression takes about a second)."""
    from trainer import data
    from trainer.hashing import compress_tokenizer
    from trainer.presets import get

    preset = get(name)
    tok = preset.load_tokenizer()
    docs = data.load_corpus(None if corpus in ("builtin", "") else corpus)
    train, val = split_documents(docs, val_fraction)
    eos = next((i for i in map(tok.token_to_id, _EOS_TOKENS) if i is not None), 0)
    dataset = TokenDataset(_encode(train, tok, eos), _encode(val, tok, eos), preset.vocab_size)
    lookup, compressed = compress_tokenizer(tok)

    def batches(split: str, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        if split == "train":
            for b in dataset.batches("train", batch_size, seq_len, seed, start_step=start_step):
                yield b[:, :-1], b[:, 1:]  # (B, T) inputs, (B, T) targets
            return
        while True:  # validation: the split's consecutive windows, from the start, cycled
            for b in dataset.eval_batches(split, batch_size, seq_len):
                yield b[:, :-1], b[:, 1:]

    fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    return Corpus(
        preset.vocab_size, preset.hash.pad_id, fingerprint, lookup, compressed, batches, tok
    )


def _encode(docs: list[Document], tokenizer, eos: int) -> np.ndarray:
    """The documents' token ids (int32: the vocabulary exceeds uint16), each followed by eos."""
    encs = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    parts = []
    for enc in encs:
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.array([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
