"""docs/algorithm.md steps 1-4: vocabulary compression, hash multipliers, prime head sizes, n-gram hashing.

Everything here is numpy + stdlib so the store, the client and the trainer share one definition of
"which row does this n-gram read". It matches the authors' demo (`engram_demo_v1.py`) bit for bit:
the same normaliser (the demo's HF `tokenizers` sequence, trainer/tokenizer.py, handed in as a
function), the same `default_rng` draws, the same primes and the same int64 arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import ConfigError, InvalidArgument

_PRIME_1 = 10007  # per-layer seed stride of the reference
_INT64_MAX = int(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class HashConfig:
    """Where Engram sits and how its n-grams are hashed (docs/algorithm.md reference settings by default).

    layers: backbone layer indices (0-based block indices) carrying an Engram, in configured order:
        the order decides which layer gets which primes (step 3).
    base_sizes: one target table size per order 2..max_ngram; each head gets a prime just above.
    """

    layers: tuple[int, ...] = (1, 15)
    max_ngram: int = 3
    heads: int = 8
    base_sizes: tuple[int, ...] = (646400, 646400)
    pad_id: int = 2
    seed: int = 0
    n_embed_per_ngram: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "base_sizes", tuple(int(x) for x in self.base_sizes))
        self.validate()

    def validate(self) -> None:
        if self.max_ngram < 2:
            raise ConfigError(
                f"max_ngram={self.max_ngram}: Engram hashes n-grams of order 2..max_ngram, "
                "so max_ngram must be >= 2"
            )
        if len(self.base_sizes) != self.max_ngram - 1:
            raise ConfigError(
                f"base_sizes has {len(self.base_sizes)} entries; give one per n-gram order "
                f"2..{self.max_ngram} ({self.max_ngram - 1} entries)"
            )
        if any(b < 2 for b in self.base_sizes):
            raise ConfigError(f"base_sizes {self.base_sizes} must all be >= 2")
        if self.heads < 1:
            raise ConfigError(f"heads={self.heads} must be >= 1")
        if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.heads:
            raise ConfigError(
                f"n_embed_per_ngram={self.n_embed_per_ngram} must be a positive multiple of "
                f"heads={self.heads} (each head row is n_embed_per_ngram / heads wide)"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers {self.layers} contain a duplicate")
        if any(layer < 0 for layer in self.layers):
            raise ConfigError(f"layers {self.layers} must be >= 0 (0-based block indices)")
        if self.pad_id < 0:
            raise ConfigError(f"pad_id={self.pad_id} must be >= 0")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")

    @property
    def d_head(self) -> int:
        """Width of one head's row."""
        return self.n_embed_per_ngram // self.heads

    @property
    def heads_per_layer(self) -> int:
        """(N-1)*K: rows read per position per Engram layer."""
        return (self.max_ngram - 1) * self.heads

    @property
    def memory_dim(self) -> int:
        """Width of a position's concatenated memory vector e: (N-1) * n_embed_per_ngram."""
        return (self.max_ngram - 1) * self.n_embed_per_ngram


# ---------------------------------------------------------------- step 1: vocabulary compression


def compress_vocab(
    decoded: Sequence[str], raw: Sequence[str], normalize: Callable[[str], str]
) -> tuple[np.ndarray, int]:
    """Map every base token id to a canonical id (docs/algorithm.md step 1).

    decoded[i]: token i decoded on its own; raw[i]: its raw vocabulary string (used as the key when
    the decoded text holds U+FFFD, i.e. is a partial UTF-8 sequence); normalize: the reference's
    normaliser (trainer.tokenizer.reference_normalizer().normalize_str). Returns (lookup int64
    (V,), compressed vocabulary size V'); canonical ids are numbered in order of first appearance.
    """
    if len(decoded) != len(raw):
        raise InvalidArgument(f"decoded has {len(decoded)} tokens but raw has {len(raw)}")
    key_to_id: dict[str, int] = {}
    lookup = np.empty(len(decoded), dtype=np.int64)
    for tid, (text, raw_text) in enumerate(zip(decoded, raw, strict=True)):
        if "\ufffd" in text:
            key = raw_text
        else:
            key = normalize(text) or text
        lookup[tid] = key_to_id.setdefault(key, len(key_to_id))
    return lookup, len(key_to_id)


def compress_tokenizer(
    tokenizer: Any, normalize: Callable[[str], str] | None = None
) -> tuple[np.ndarray, int]:
    """compress_vocab for a HF `tokenizers.Tokenizer` (or anything with the same methods).

    Uses get_vocab_size(with_added_tokens=True), decode([id], skip_special_tokens=False) (through
    decode_batch where the tokenizer has it) and id_to_token(id), as the reference does through
    transformers. normalize defaults to the reference's HF `tokenizers` normaliser sequence
    (trainer/tokenizer.py): the only call here that needs more than numpy, and only when the
    caller brings no normaliser of its own.
    """
    if normalize is None:
        from trainer.tokenizer import reference_normalizer

        normalize = reference_normalizer().normalize_str
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    singles = [[i] for i in range(size)]
    if hasattr(tokenizer, "decode_batch"):
        decoded = tokenizer.decode_batch(singles, skip_special_tokens=False)
    else:
        decoded = [tokenizer.decode(s, skip_special_tokens=False) for s in singles]
    raw = [tokenizer.id_to_token(i) or "" for i in range(size)]
    return compress_vocab(decoded, raw, normalize)


# ---------------------------------------------------------------- step 2: multipliers


def layer_multipliers(layer: int, compressed_vocab: int, max_ngram: int, seed: int) -> np.ndarray:
    """The N odd int64 multipliers of one Engram layer (docs/algorithm.md step 2)."""
    if compressed_vocab < 1:
        raise InvalidArgument(f"compressed vocabulary size {compressed_vocab} must be >= 1")
    half = max(1, _INT64_MAX // compressed_vocab // 2)
    rng = np.random.default_rng(int(seed + _PRIME_1 * int(layer)))
    r = rng.integers(0, half, size=(max_ngram,), dtype=np.int64)
    return r * 2 + 1


# ---------------------------------------------------------------- step 3: primes


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (far beyond any table size)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def head_primes(config: HashConfig) -> dict[int, list[list[int]]]:
    """{layer: [[prime per head] per order 2..N]} (docs/algorithm.md step 3); distinct across everything."""
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer in config.layers:
        orders = []
        for n in range(2, config.max_ngram + 1):
            start = config.base_sizes[n - 2] - 1
            heads = []
            for _ in range(config.heads):
                cand = start + 1
                while cand in seen or not is_prime(cand):
                    cand += 1
                seen.add(cand)
                heads.append(cand)
                start = cand
            orders.append(heads)
        out[layer] = orders
    return out


# ---------------------------------------------------------------- step 4: hashing


class NgramHasher:
    """Hashes batches of base-token ids into Engram table rows for every configured layer.

    `hash` gives the row within each head's table (docs/algorithm.md step 4); `global_ids` adds each head's
    offset, giving the row id of the layer's concatenated table `engram_l{layer}` (step 5).
    """

    def __init__(
        self, config: HashConfig, lookup: np.ndarray, compressed_vocab_size: int | None = None
    ):
        self.config = config
        self.lookup = np.ascontiguousarray(lookup, dtype=np.int64)  # (V,) base id -> compressed id
        if self.lookup.ndim != 1 or self.lookup.size == 0:
            raise InvalidArgument("lookup must be a non-empty 1-D array (one entry per base token)")
        if compressed_vocab_size is None:
            compressed_vocab_size = int(self.lookup.max()) + 1
        self.compressed_vocab_size = int(compressed_vocab_size)
        if not 0 <= config.pad_id < self.lookup.size:
            raise ConfigError(
                f"pad_id={config.pad_id} is not a token id of this vocabulary (size {self.lookup.size})"
            )
        self.compressed_pad = int(self.lookup[config.pad_id])
        self.primes = head_primes(config)
        self.multipliers = {
            layer: layer_multipliers(
                layer, self.compressed_vocab_size, config.max_ngram, config.seed
            )
            for layer in config.layers
        }
        # Per layer, order-major flattening: (H,) primes and (H,) head offsets, H = (N-1)*K.
        self._mods = {
            layer: np.array([p for order in ps for p in order], dtype=np.int64)
            for layer, ps in self.primes.items()
        }
        self._offsets = {
            layer: np.concatenate([[0], np.cumsum(m)[:-1]]).astype(np.int64)
            for layer, m in self._mods.items()
        }

    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    def compress(self, ids: np.ndarray) -> np.ndarray:
        """Base ids (B, T) -> compressed ids (B, T); raises InvalidArgument on ids outside the vocab."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise InvalidArgument(f"ids must have shape (B, T), got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgument(f"ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.lookup.size):
            raise InvalidArgument(
                f"token ids must lie in [0, {self.lookup.size}); got [{ids.min()}, {ids.max()}]"
            )
        return self.lookup[ids]

    def _mix(self, x: np.ndarray, layer: int) -> list[np.ndarray]:
        """One (B, T) int64 mix per order 2..N, from compressed ids x (B, T)."""
        N = self.config.max_ngram
        B, T = x.shape
        m = self.multipliers[layer]
        shifted = [x]
        for k in range(1, N):
            s = np.full((B, T), self.compressed_pad, dtype=np.int64)  # first k positions: pad
            s[:, k:] = x[:, : max(T - k, 0)]
            shifted.append(s)
        mixes = []
        with np.errstate(over="ignore"):  # int64 wrap-around is part of the definition
            mix = shifted[0] * m[0]
            for k in range(1, N):
                mix = np.bitwise_xor(mix, shifted[k] * m[k])  # (B, T)
                mixes.append(mix)
        return mixes

    def hash(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """{layer: int64 (B, T, (N-1)*K)} rows within each head, order-major (docs/algorithm.md step 4)."""
        x = self.compress(ids)  # (B, T)
        K = self.config.heads
        out = {}
        for layer in self.config.layers:
            mods = self._mods[layer].reshape(-1, K)  # (N-1, K)
            per_order = [
                np.mod(mix[:, :, None], mods[i])  # (B, T, K) floor modulo: never negative
                for i, mix in enumerate(self._mix(x, layer))
            ]
            out[layer] = np.concatenate(per_order, axis=2)  # (B, T, (N-1)*K)
        return out

    def global_ids(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """{layer: int64 (B, T, (N-1)*K)} row ids of the layer's concatenated table."""
        return {layer: rows + self._offsets[layer] for layer, rows in self.hash(ids).items()}

    hash_global = global_ids

    def head_rows(self, layer: int) -> tuple[int, ...]:
        """The layer's primes in order-major head order: its table's head_rows."""
        return tuple(int(p) for p in self._mods[layer])

    def head_offsets(self, layer: int) -> np.ndarray:
        """int64 ((N-1)*K,) start row of each head in the layer's concatenated table."""
        return self._offsets[layer].copy()

    def num_rows(self, layer: int) -> int:
        return int(self._mods[layer].sum())

    def table_spec(self, layer: int, dim: int | None = None, **fields: Any) -> TableConfig:
        """TableConfig `engram_l{layer}` with head_rows = the layer's primes; extra fields pass
        through (dtype, init, init_std, seed, optimizer)."""
        if layer not in self._mods:
            raise ConfigError(
                f"layer {layer} is not an Engram layer; configured: {self.config.layers}"
            )
        fields.setdefault("optimizer", OptimizerConfig())
        return TableConfig(
            name=table_name(layer),
            dim=self.config.d_head if dim is None else dim,
            head_rows=self.head_rows(layer),
            **fields,
        )

    def table_specs(self, **fields: Any) -> Mapping[int, TableConfig]:
        """{layer: table_spec(layer, **fields)} for every Engram layer."""
        return {layer: self.table_spec(layer, **fields) for layer in self.config.layers}


def table_name(layer: int) -> str:
    """The store table holding one Engram layer's memory."""
    return f"engram_l{layer}"
