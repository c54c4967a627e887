"""Frozen configuration dataclasses, one per concern. The CLI builds them; nothing else reads flags."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from engram_store.engine.errors import ConfigError, InvalidArgument

#: storage and wire dtypes. float8_e4m3: one e4m3 byte per value plus one e8m0 (power-of-two)
#: scale byte per 32 values, DeepSeek-V4.1's Engram row encoding (dim must be a multiple of 32)
DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3")
FP8_BLOCK = 32
#: rowwise_adagrad: FBGEMM's EXACT_ROWWISE_ADAGRAD (one float32 accumulator per row);
#: rowwise_adam: Adam with an element-wise first moment and a row-wise second moment
#: (FBGEMM's PARTIAL_ROWWISE_ADAM)
OPTIMIZERS = ("sgd", "adagrad", "adam", "rowwise_adagrad", "rowwise_adam")
INITS = ("normal", "zeros")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # fullmatch: "$" would let a final newline in


def row_bytes(dtype: str, dim: int) -> int:
    """Bytes of one `dim`-wide row in `dtype` (float8_e4m3: dim codes + dim / 32 scales)."""
    if dtype == "float8_e4m3":
        return dim + dim // FP8_BLOCK
    if dtype == "float32":
        return 4 * dim
    if dtype in ("bfloat16", "float16"):
        return 2 * dim
    raise InvalidArgument(f"dtype {dtype!r} is unknown; use one of {DTYPES}")


@dataclass(frozen=True)
class OptimizerConfig:
    """Server-side sparse optimizer of one table. Defaults follow torch.optim."""

    kind: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float | None = None  # see resolved_eps
    initial_accumulator_value: float = 0.0  # adagrad's and rowwise_adagrad's first accumulator
    lr_decay: float = 0.0  # adagrad and rowwise_adagrad: lr / (1 + (step - 1) * lr_decay)

    @property
    def resolved_eps(self) -> float:
        """eps, or the default of the library each optimizer follows: torch.optim's Adagrad
        1e-10 and SparseAdam 1e-8; FBGEMM's table-batched embeddings 1e-8 for the row-wise
        ones (SplitTableBatchedEmbeddingBagsCodegen's eps)."""
        if self.eps is not None:
            return self.eps
        return 1e-10 if self.kind == "adagrad" else 1e-8

    def state_floats(self, dim: int) -> int:
        """float32 optimizer-state values stored per row of width `dim`."""
        return {
            "sgd": 0,
            "adagrad": dim,
            "adam": 2 * dim,
            "rowwise_adagrad": 1,
            "rowwise_adam": dim + 1,
        }[self.kind]

    def validate(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise InvalidArgument(f"optimizer {self.kind!r} is unknown; use one of {OPTIMIZERS}")
        for name in ("lr", "beta1", "beta2", "initial_accumulator_value", "lr_decay"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise InvalidArgument(f"optimizer {name}={v} must be a finite number >= 0")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise InvalidArgument(f"adam betas ({self.beta1}, {self.beta2}) must lie in [0, 1)")
        if self.eps is not None and (not math.isfinite(self.eps) or self.eps <= 0):
            raise InvalidArgument(f"optimizer eps={self.eps} must be > 0")


@dataclass(frozen=True)
class TableConfig:
    """One memory table: its row space, row width, storage dtype, initialisation and optimizer.

    The row space is either `num_rows`, or the concatenation of `head_rows` (one block per hash
    head, docs/algorithm.md step 5), in which case num_rows is their sum.
    """

    name: str
    num_rows: int = 0
    dim: int = 64
    head_rows: tuple[int, ...] = ()
    dtype: str = "float32"
    init: str = "normal"
    init_std: float = 1.0
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        if self.head_rows and not self.num_rows:
            object.__setattr__(self, "num_rows", int(sum(self.head_rows)))
        object.__setattr__(self, "head_rows", tuple(int(h) for h in self.head_rows))

    def validate(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidArgument(
                f"table name {self.name!r} is invalid; use 1-128 characters of A-Z a-z 0-9 _ . -"
            )
        if self.head_rows:
            if any(h <= 0 for h in self.head_rows):
                raise InvalidArgument(f"head_rows {self.head_rows} must all be > 0")
            if sum(self.head_rows) != self.num_rows:
                raise InvalidArgument(
                    f"num_rows={self.num_rows} differs from sum(head_rows)={sum(self.head_rows)}; "
                    "give one or the other"
                )
        if not 0 < self.num_rows < 2**62:
            raise InvalidArgument(
                f"table {self.name!r}: num_rows={self.num_rows} must be in [1, 2^62)"
            )
        if not 0 < self.dim <= 65536:
            raise InvalidArgument(f"table {self.name!r}: dim={self.dim} must be in [1, 65536]")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"storage dtype {self.dtype!r} is unknown; use one of {DTYPES}")
        if self.dtype == "float8_e4m3" and self.dim % FP8_BLOCK:
            raise InvalidArgument(
                f"table {self.name!r}: float8_e4m3 rows carry one scale per {FP8_BLOCK} values, "
                f"so dim={self.dim} must be a multiple of {FP8_BLOCK}"
            )
        if self.init not in INITS:
            raise InvalidArgument(f"init {self.init!r} is unknown; use one of {INITS}")
        if not math.isfinite(self.init_std) or self.init_std < 0:
            raise InvalidArgument(f"init_std={self.init_std} must be a finite number >= 0")
        if not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"seed={self.seed} must be in [0, 2^64)")
        self.optimizer.validate()

    @property
    def row_bytes(self) -> int:
        """Bytes of one row in the storage dtype."""
        return row_bytes(self.dtype, self.dim)

    @property
    def state_floats(self) -> int:
        """float32 optimizer-state values per row (none for float8_e4m3 rows, which are served
        and never trained)."""
        return 0 if self.dtype == "float8_e4m3" else self.optimizer.state_floats(self.dim)

    def head_offsets(self) -> tuple[int, ...]:
        """Start row of each head in the concatenated row space (docs/algorithm.md step 5)."""
        out, acc = [], 0
        for h in self.head_rows:
            out.append(acc)
            acc += h
        return tuple(out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TableConfig:
        d = dict(d)
        d["optimizer"] = OptimizerConfig(**d.get("optimizer", {}))
        d["head_rows"] = tuple(d.get("head_rows", ()))
        return cls(**d)


@dataclass(frozen=True)
class ShardConfig:
    """One shard: where its LMDB lives, how much RAM its tables may use, what it accepts. How it
    is served (address, threads, auth, metrics) is the gRPC layer's ServerConfig, which nests
    this."""

    data_dir: str
    map_size: int = 1 << 40  # LMDB virtual map size; only used pages take disk
    memory_bytes: int = 0  # RAM for the tables' arrays and indexes; 0: 80 % of physical memory
    max_batch_rows: int = 1 << 20  # ids per Lookup/PushGradients request
    durable: bool = False  # fdatasync each commit; off: a commit survives kill -9, not a power cut
    read_only: bool = False
    request_log: int = 1 << 20  # request ids remembered for exactly-once pushes
    max_readers: int = 126  # LMDB reader slots: threads reading at once (a server raises it)
    max_abs_value: float = 1e9  # |gradient| / |imported value| accepted: float32 state stays finite
    checkpoint_ratio: float = 1.0  # checkpoint when the log holds this times the arrays' bytes
    checkpoint_min_bytes: int = 256 << 20  # ... and at least this many bytes

    def memory_budget(self) -> int:
        """The RAM budget in bytes (memory_bytes, or 80 % of the machine's physical memory)."""
        if self.memory_bytes:
            return self.memory_bytes
        try:
            phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            phys = 16 << 30
        return int(0.8 * phys)

    def validate(self) -> None:
        if not self.data_dir:
            raise ConfigError("a shard needs --data DIR")
        for name in ("map_size", "max_batch_rows", "request_log", "max_readers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.memory_bytes < 0:
            raise ConfigError(f"memory_bytes={self.memory_bytes} must be >= 0 (0: 80 % of RAM)")
        if not (math.isfinite(self.max_abs_value) and self.max_abs_value > 0):
            raise ConfigError(f"max_abs_value={self.max_abs_value} must be a finite number > 0")
        if not (math.isfinite(self.checkpoint_ratio) and self.checkpoint_ratio > 0):
            raise ConfigError(f"checkpoint_ratio={self.checkpoint_ratio} must be > 0")
        if self.checkpoint_min_bytes < 0:
            raise ConfigError(f"checkpoint_min_bytes={self.checkpoint_min_bytes} must be >= 0")
