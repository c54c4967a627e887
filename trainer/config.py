"""What a training run is: TrainConfig, nesting the model (ArchConfig) and the prefetch
(PrefetchConfig) it uses, and ModelConfig, the GPT's complete shape.

Torch-free on purpose: the `engram train` parser reads its defaults from here, and building the
`engram` parser must not import torch (a store node has none).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram_store.engine.errors import ConfigError
from trainer.hashing import HashConfig

DEVICES = ("auto", "cpu", "cuda")
# The table size rule (README "Quality", benchmarks/quality.py's table-size study on the tuning
# splits). A run that reads its training split at most once: one row per hash head for every
# TOKENS_PER_ROW_ONCE tokens it reads. A run that reads it p >= PASSES_REPEATED times: one row
# per TOKENS_PER_ROW tokens of the split, divided by p. In between (unmeasured), geometric
# interpolation in p between the two, so the size never jumps. Never below MIN_TABLE_ROWS.
TOKENS_PER_ROW_ONCE = 32
TOKENS_PER_ROW = 1000
PASSES_REPEATED = 1.5  # at 1.6 passes (libdocs tuning split) the repeated-reading size won
MIN_TABLE_ROWS = 64
# The table lr rule (README "Quality", the table lr study on devdocs's tuning split): the best
# table lr multiplier (the tables' Adam lr / the backbone's peak lr) falls with the tokens a run
# reads. (run tokens, multiplier) at the lengths measured; between two, geometric interpolation
# in the tokens (linear in log-log), so the lr never jumps; outside them, the nearer end's.
TABLE_LR_POINTS = ((1.5e6, 100.0), (4e6, 25.0))
BACKENDS = ("store", "local")
UPDATES = ("sync", "async")


def rows_per_head(train_tokens: int | None, run_tokens: int) -> int:
    """Rows per hash head for a run of `run_tokens` tokens over a training split of
    `train_tokens` distinct tokens (None: an endless stream, never repeated).

    Two regimes, both measured on the tuning splits: text read once cannot be memorised, and
    more rows help while each still gets a few dozen updates (best near 15-75 tokens read per
    row); text read again is memorised by the rows, which then must be few (on a split read
    2.6 times 20,000 rows a head lost to dense and 156-625, about one per 1,000 split tokens
    divided by the passes, won; on a split read 1.6 times the same size, 1,553 rows, beat 8,213
    and 40,000). Between one pass and PASSES_REPEATED nothing was measured: the size falls
    geometrically in the passes from the one regime's to the other's, instead of
    jumping 30-fold when a run reads a few more tokens than its split holds."""
    if run_tokens <= 0:
        raise ConfigError(f"a run of {run_tokens} tokens: steps, batch and seq_len must be >= 1")
    distinct = run_tokens if train_tokens is None else train_tokens
    if distinct <= 0:
        raise ConfigError(f"the training split has {train_tokens} tokens; give a larger corpus")
    passes = run_tokens / distinct
    if passes <= 1.0:
        rows = run_tokens / TOKENS_PER_ROW_ONCE
    elif passes < PASSES_REPEATED:
        once = distinct / TOKENS_PER_ROW_ONCE  # the one-pass size at exactly one pass
        repeated = distinct / (TOKENS_PER_ROW * PASSES_REPEATED)
        rows = once * (repeated / once) ** (math.log(passes) / math.log(PASSES_REPEATED))
    else:
        rows = distinct / (TOKENS_PER_ROW * passes)
    return max(MIN_TABLE_ROWS, round(rows))


def table_lr_mult_for(run_tokens: int) -> float:
    """The table lr multiplier for a run of `run_tokens` training tokens (TABLE_LR_POINTS).

    Measured on devdocs's tuning split at the budget's model, one seed a point (README "The
    table lr by run length"): 100x best at 0.3 M tokens, 50x and 100x tied at 1.5 M (25x 0.6 %
    worse), 25x best at 4 M (0.5 % ahead of 50x, 0.9 % of 100x) and at 10 M (0.7 % ahead of
    100x). Below 25x nothing was measured at these lengths."""
    if run_tokens <= 0:
        raise ConfigError(f"a run of {run_tokens} tokens: steps, batch and seq_len must be >= 1")
    (t0, m0), *rest = TABLE_LR_POINTS
    if run_tokens <= t0:
        return m0
    for t1, m1 in rest:
        if run_tokens <= t1:
            f = math.log(run_tokens / t0) / math.log(t1 / t0)
            return m0 * (m1 / m0) ** f
        t0, m0 = t1, m1
    return m0


@dataclass(frozen=True)
class PrefetchConfig:
    """How far ahead rows are fetched and how pushes are ordered against lookups
    (trainer/prefetch.py's docstring has the semantics)."""

    depth: int = 1  # batches fetched ahead of the one in use; 0 = fetch on demand
    update: str = "async"  # "sync" | "async" (see trainer/prefetch.py)
    max_inflight: int = 2  # async: pushes outstanding at once
    cache_rows: int = 0  # async: hot-row cache capacity per layer, 0 = off
    cache_staleness: int = 0  # async: steps a cached row may be reused
    cache_drop_pushed: bool = True  # async: a push by this worker evicts the pushed rows

    def validate(self) -> None:
        """Raise ConfigError naming the setting to change."""
        if self.depth < 0:
            raise ConfigError(f"prefetch depth {self.depth} must be >= 0 (0 = fetch on demand)")
        if self.update not in UPDATES:
            raise ConfigError(f"update mode {self.update!r} is unknown; use one of {UPDATES}")
        if self.max_inflight < 0 or self.cache_rows < 0 or self.cache_staleness < 0:
            raise ConfigError("max_inflight, cache_rows and cache_staleness must be >= 0")
        if self.update == "sync" and self.cache_rows:
            raise ConfigError(
                "the hot-row cache serves stale rows; use --update async with it "
                "or set cache_rows=0"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Backbone shape plus where Engram sits: what trainer.model.GPT is built from.

    engram_layers: 0-based block indices carrying an Engram; () is the baseline. When given
        without `hash`, hash defaults to HashConfig(layers=engram_layers) (docs/algorithm.md settings).
    hash: how n-grams are hashed; its `layers` must equal engram_layers (it orders the primes).
    hc_mult: residual branches M; this backbone has one residual stream, so only 1 is supported.
    """

    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 256
    engram_layers: tuple[int, ...] = ()
    hash: HashConfig | None = None
    hc_mult: int = 1
    kernel_size: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "engram_layers", tuple(int(x) for x in self.engram_layers))
        self._check_layers()  # before a default HashConfig could complain about them first
        if self.engram_layers and self.hash is None:
            object.__setattr__(self, "hash", HashConfig(layers=self.engram_layers))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field to change."""
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "kernel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.hc_mult != 1:
            raise ConfigError(
                f"hc_mult={self.hc_mult}: this backbone has one residual stream; use hc_mult=1 "
                "(EngramModule itself supports M branches for a hyper-connected backbone)"
            )
        self._check_layers()
        if self.engram_layers:
            assert self.hash is not None
            if tuple(self.hash.layers) != self.engram_layers:
                raise ConfigError(
                    f"engram_layers {self.engram_layers} differ from hash.layers "
                    f"{self.hash.layers}; give the same layers in the same order"
                )
            if self.hash.pad_id >= self.vocab_size:
                raise ConfigError(
                    f"hash.pad_id={self.hash.pad_id} is not a token id (vocab_size={self.vocab_size})"
                )

    def _check_layers(self) -> None:
        bad = [x for x in self.engram_layers if not 0 <= x < self.n_layer]
        if bad:
            raise ConfigError(
                f"engram_layers {self.engram_layers}: layer(s) {bad} outside the backbone's "
                f"blocks 0..{self.n_layer - 1} (n_layer={self.n_layer}; indices are 0-based)"
            )
        if len(set(self.engram_layers)) != len(self.engram_layers):
            raise ConfigError(f"engram_layers {self.engram_layers} contain a duplicate")

    def baseline(self) -> ModelConfig:
        """The same backbone without Engram."""
        return dataclasses.replace(self, engram_layers=(), hash=None)


@dataclass(frozen=True)
class ArchConfig:
    """The model a run trains: backbone shape, where Engram sits and how its n-grams hash.

    The corpus completes it: model_config() adds the vocabulary size, the context length and the
    tokenizer's pad id, giving the ModelConfig that GPT is built from. Checked by validate(), not
    on construction, so that a run's validate() can word the error as a flag to change.
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    # 0-based block indices; () = baseline without Engram. Blocks 1 and 2: benchmarks/quality.py's
    # recipe study (README "Quality")
    engram_layers: tuple[int, ...] = (1, 2)
    max_ngram: int = 3
    hash_heads: int = 4  # K heads per n-gram order
    n_embed_per_ngram: int = 128  # d_head = n_embed_per_ngram / hash_heads
    # rows per head ~ this (a prime just above); 0 = "auto": TrainConfig.sized fills in the size
    # rule (rows_per_head) once the corpus is known, as `engram train` does by default
    table_base_size: int = 50_000
    hash_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "engram_layers", tuple(int(x) for x in self.engram_layers))

    def hash_config(self, pad_id: int) -> HashConfig | None:
        """The n-gram hashing for a tokenizer with this pad id; None for the baseline."""
        if not self.engram_layers:
            return None
        if not self.table_base_size:
            raise ConfigError(
                "table_base_size 0 (auto) is not sized yet: TrainConfig.sized(train_tokens) "
                "fills it in from the corpus"
            )
        return HashConfig(
            layers=self.engram_layers,
            max_ngram=self.max_ngram,
            heads=self.hash_heads,
            base_sizes=(self.table_base_size,) * (self.max_ngram - 1),
            pad_id=pad_id,
            seed=self.hash_seed,
            n_embed_per_ngram=self.n_embed_per_ngram,
        )

    def model_config(self, vocab_size: int, block_size: int, pad_id: int) -> ModelConfig:
        """The GPT's config for this corpus (vocabulary, pad id) and context length."""
        return ModelConfig(
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            block_size=block_size,
            engram_layers=self.engram_layers,
            hash=self.hash_config(pad_id),
        )

    def validate(self) -> None:
        """Raise ConfigError naming the `engram train` flag to change."""
        bad = [x for x in self.engram_layers if not 0 <= x < self.n_layer]
        if bad:
            raise ConfigError(
                f"Engram layer(s) {bad} lie beyond the model depth: --layers {self.n_layer} has "
                f"blocks 0..{self.n_layer - 1}; lower --engram-layers or raise --layers"
            )
        if self.engram_layers and self.max_ngram < 2:
            raise ConfigError(
                f"n-gram order {self.max_ngram} < 2: Engram hashes 2..N-grams; use max_ngram >= 2"
            )
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.table_base_size < 0:
            raise ConfigError(
                f"--table-size {self.table_base_size}: give rows per head >= 2, or auto"
            )
        if self.engram_layers:  # HashConfig.validate: heads, widths, base sizes (auto: later)
            dataclasses.replace(
                self, table_base_size=self.table_base_size or MIN_TABLE_ROWS
            ).hash_config(0)

    def baseline(self) -> ArchConfig:
        """The same backbone without Engram."""
        return dataclasses.replace(self, engram_layers=())


# The flat field names of checkpoints written before TrainConfig nested `prefetch`.
_FLAT_PREFETCH = {
    "prefetch_depth": "depth",
    "update": "update",
    "max_inflight": "max_inflight",
    "cache_rows": "cache_rows",
    "cache_staleness": "cache_staleness",
    "cache_drop_pushed": "cache_drop_pushed",
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The CLI builds it; workers receive it as a dict (to_dict/from_dict)."""

    model: ArchConfig = field(default_factory=ArchConfig)
    # data
    corpus: str = "builtin"  # "builtin", a text file/directory, or "synthetic" (random tokens)
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16  # per trainer worker; the global batch is batch_size * trainers
    seed: int = 1337
    # optimisation
    steps: int = 200
    max_minutes: float = 0.0  # stop early (at a logging step) after this long; 0 = no limit
    lr: float = 1e-3
    weight_decay: float = 0.1
    adam_eps: float = 1e-8  # dense AdamW eps
    # the tables' recipe (benchmarks/quality.py --study, README "Quality"): Adam at
    # table_lr_mult x lr, no weight decay, rows initialised N(0, table_init_std^2)
    # (the paper's 5x and std 1.0 rows lose to dense at small budgets: the study's table).
    # table_lr_mult 0 = "auto": table_lr_mult_for(run_tokens), filled in by sized()
    table_lr_mult: float = 0.0
    table_init_std: float = 0.01
    # store and prefetch
    backend: str = "store"  # "store" (remote tables) or "local" (LocalMemory + SparseAdam)
    store: tuple[str, ...] = ()  # shard addresses host:port; any shard publishes the others
    table_prefix: str = ""  # prepended to engram_l{layer}, so several runs can share a store
    store_token: str = ""  # bearer token of a store that requires authentication
    store_data_root: str = ""  # where the store cluster keeps its shards (for the checkpoint)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    # workers
    trainers: int = 1
    ray_train: bool = False  # use Ray Train even for one trainer (always for > 1)
    device: str = "auto"
    trainer_resource: str = ""  # e.g. "engram_trainer": a custom Ray resource each worker needs
    # evaluation, output
    eval_batches: int = 8
    eval_every: int = 0  # 0 = only before and after training
    log_every: int = 5
    out: str = ""  # run directory; "" = runs/<timestamp>
    resume: str = ""  # checkpoint to start from
    progress: bool = True
    # Prometheus /metrics of the trainer (trainer.metrics.TrainerMetrics) on 127.0.0.1: rank r
    # serves on metrics_port + r (0: any free port each); None: off
    metrics_port: int | None = None
    # a named model geometry (trainer/presets.py): its hashing, base tokenizer and full-height
    # tables in its training format; "" = the run's own tokenizer and tables
    preset: str = ""
    # the shards' Prometheus /metrics "host:port"s: the summary reads their RAM (memory_bytes)
    store_metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", tuple(self.store))
        object.__setattr__(self, "store_metrics", tuple(self.store_metrics))

    def to_dict(self) -> dict:
        """Plain data (nested dicts for model and prefetch): picklable, JSON-able."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config to_dict gave; also reads the flat form of checkpoints written before model
        and prefetch were nested (n_layer=..., prefetch_depth=...). Unknown keys are ignored."""
        rest = dict(d)
        model = _fields_of(ArchConfig, rest.pop("model", None))
        prefetch = _fields_of(PrefetchConfig, rest.pop("prefetch", None))
        arch_names = {f.name for f in dataclasses.fields(ArchConfig)}
        for key in list(rest):
            if key in arch_names:
                model.setdefault(key, rest.pop(key))
            elif key in _FLAT_PREFETCH:
                prefetch.setdefault(_FLAT_PREFETCH[key], rest.pop(key))
        top = {f.name for f in dataclasses.fields(cls)} - {"model", "prefetch"}
        return cls(
            model=ArchConfig(**model),
            prefetch=PrefetchConfig(**prefetch),
            **{k: v for k, v in rest.items() if k in top},
        )

    @property
    def run_tokens(self) -> int:
        """Training tokens the run reads: steps x the global batch x seq_len."""
        return self.steps * self.batch_size * self.trainers * self.seq_len

    def sized(
        self, train_tokens: int | None, resumed: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """This config with an auto table size (0) and an auto table lr (0) filled in: the
        resumed checkpoint's (its tables exist at their size, their optimizer at its lr), else
        rows_per_head for a training split of `train_tokens` tokens (None: an endless stream) and
        table_lr_mult_for the tokens the run reads. Given values are kept."""
        if not self.needs_sizing:
            return self
        old = TrainConfig.from_dict(resumed) if resumed is not None else None
        rows = self.model.table_base_size or (old.model.table_base_size if old else 0)
        mult = self.table_lr_mult or (old.table_lr_mult if old else 0.0)
        return dataclasses.replace(
            self,
            model=dataclasses.replace(
                self.model, table_base_size=rows or rows_per_head(train_tokens, self.run_tokens)
            ),
            table_lr_mult=mult or table_lr_mult_for(self.run_tokens),
        )

    @property
    def needs_sizing(self) -> bool:
        """The model has tables whose auto size or auto lr is still to be filled in (sized)."""
        return bool(self.model.engram_layers) and not (
            self.model.table_base_size and self.table_lr_mult
        )

    @property
    def table_lr(self) -> float:
        """The tables' Adam lr: table_lr_mult x the backbone's (auto: table_lr_mult_for the
        tokens the run reads)."""
        return self.lr * (self.table_lr_mult or table_lr_mult_for(self.run_tokens))

    def model_config(self, vocab_size: int, pad_id: int) -> ModelConfig:
        """The GPT's config for a corpus with this vocabulary and pad id, context seq_len."""
        return self.model.model_config(vocab_size, self.seq_len, pad_id)

    def validate(self) -> None:
        """Fail before anything starts, with a message that says what to change."""
        self.model.validate()
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r} is unknown; use one of {DEVICES}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is unknown; use one of {BACKENDS}")
        if self.backend == "store" and self.model.engram_layers and not self.store:
            raise ConfigError(
                "no store address: start shards (engram serve, or the cluster) and "
                "pass their host:port"
            )
        for name in ("seq_len", "batch_size", "trainers", "vocab_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1 ({_flag(name)})")
        for name in ("seed", "steps", "eval_batches", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 ({_flag(name)})")
        if not (self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise ConfigError(f"--minutes {self.max_minutes} must be >= 0 (0 = no time limit)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr {self.lr} must be a positive number")
        if not (self.table_lr_mult >= 0 and math.isfinite(self.table_lr_mult)):
            raise ConfigError(
                f"--table-lr-mult {self.table_lr_mult} must be a positive number (or 0 / auto: "
                "the rule by run length)"
            )
        if not (0 <= self.table_init_std <= 100 and math.isfinite(self.table_init_std)):
            raise ConfigError(f"--table-init-std {self.table_init_std} must lie in [0, 100]")
        if self.metrics_port is not None and not 0 <= self.metrics_port + self.trainers - 1 < 65536:
            raise ConfigError(
                f"--metrics-port {self.metrics_port}: rank r serves on that port + r, so it must "
                f"lie in [0, {65536 - self.trainers}] for {self.trainers} trainer(s)"
            )
        self.prefetch.validate()
        if self.backend == "local" and self.trainers > 1:
            raise ConfigError(
                "the local (in-process) table backend supports one trainer; "
                "use the store for several"
            )
        if self.preset:
            self._check_preset()

    def _check_preset(self) -> None:
        """A preset run trains the preset's hashing against its full-height store tables."""
        from trainer.presets import get

        preset = get(self.preset)  # ConfigError naming the known presets
        if self.backend != "store":
            raise ConfigError(
                f"--preset {self.preset}: its tables are full height ({sum(preset.heights.values()):,}"
                " rows); the local backend would allocate them whole; train against the store"
            )
        if self.corpus == "synthetic":
            raise ConfigError(
                f"--preset {self.preset} hashes the {preset.tokenizer} tokenizer's ids; a "
                "synthetic corpus has none: use --corpus builtin or a text file/folder"
            )
        if self.model.hash_config(preset.hash.pad_id) != preset.hash:
            raise ConfigError(
                f"--preset {self.preset} fixes the Engram layers {preset.hash.layers}, orders "
                f"2..{preset.hash.max_ngram}, {preset.hash.heads} heads and memory width "
                f"{preset.hash.n_embed_per_ngram}; drop --engram-layers, --max-ngram, "
                "--hash-heads, --memory-width, --table-size and --no-engram"
            )


#: the `engram train` flag of a TrainConfig field, where it is not --<field-with-dashes>
_FLAGS = {"max_minutes": "--minutes", "log_every": "no flag: TrainConfig.log_every"}


def _flag(name: str) -> str:
    """How an error names a TrainConfig field's `engram train` flag."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _fields_of(cls: type, value: Any) -> dict[str, Any]:
    """A sub-config (instance, dict or None) as a dict of cls's fields."""
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in dict(value).items() if k in names}


def default_out() -> str:
    """runs/<timestamp>: where a run without --out writes its checkpoint and summary."""
    return str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
