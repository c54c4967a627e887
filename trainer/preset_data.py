"""Tokens of a preset run: the corpus tokenized with the preset's own base tokenizer (not one
trained on the corpus), so the n-gram hash sees the ids, and the compressed vocabulary, that the
preset's tables were trained with. Torch-free.

    corpus = run_corpus(cfg)   # cfg.preset set: this module's Corpus; else trainer.corpus's
"""

from __future__ import annotations

import functools

from trainer.config import TrainConfig
from trainer.corpus import Corpus, corpus_over, load_corpus
from trainer.data import TokenDataset, encode_documents, split_documents

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
    from trainer.presets import get

    preset = get(name)
    tok = preset.load_tokenizer()
    docs = data.load_corpus(None if corpus in ("builtin", "") else corpus)
    train, val = split_documents(docs, val_fraction)
    eos = next((i for i in map(tok.token_to_id, _EOS_TOKENS) if i is not None), 0)
    dataset = TokenDataset(
        encode_documents(train, tok, preset.vocab_size, eos)[0],
        encode_documents(val, tok, preset.vocab_size, eos)[0],
        preset.vocab_size,
    )
    return corpus_over(dataset, tok, preset.vocab_size, preset.hash.pad_id)
