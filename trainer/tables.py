"""What the trainer asks of the store: one table per Engram layer, and a connection that fails at
once, with what to do, when no shard answers. Torch-free."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import ConfigError, EngramError, ShardUnavailable
from engram_store.rpc.config import ClientConfig
from trainer.config import TrainConfig
from trainer.hashing import NgramHasher

if TYPE_CHECKING:
    from engram_store.rpc.client import StoreClient

log = logging.getLogger(__name__)


def table_specs(cfg: TrainConfig, hasher: NgramHasher) -> dict[int, TableConfig]:
    """One table per Engram layer: the layer's primes as heads, Adam at table_lr, no decay,
    rows initialised with std table_init_std.

    With cfg.preset: the preset's full-height tables in its training format (train_dtype rows,
    train_optimizer), checked to hold the rows the hasher addresses."""
    if cfg.preset:
        from trainer.presets import get

        preset = get(cfg.preset)
        specs = preset.table_configs(
            dtype=preset.train_dtype, optimizer=preset.train_optimizer, prefix=cfg.table_prefix
        )
        for layer, spec in specs.items():
            if tuple(spec.head_rows) != hasher.head_rows(layer):
                raise ConfigError(
                    f"preset {cfg.preset}: the model hashes layer {layer} into other heads "
                    "than the preset's tables; build the run with Preset.train_config()"
                )
        return specs
    opt = OptimizerConfig(kind="adam", lr=cfg.table_lr)
    return {
        layer: dataclasses.replace(
            hasher.table_spec(layer, optimizer=opt, init_std=cfg.table_init_std),
            name=cfg.table_prefix + f"engram_l{layer}",
        )
        for layer in cfg.model.engram_layers
    }


def open_tables(
    store: StoreClient, specs: dict[int, TableConfig], adopt: bool = False
) -> dict[int, TableConfig]:
    """Create the run's tables on the store (idempotent for the same spec) and return the specs
    the store holds. With `adopt`, a table the store already has with the same geometry (row
    width and head sizes, e.g. one `engram import --preset` wrote) is trained as it is stored,
    whatever its row format and optimizer; one of another geometry is a ConfigError."""
    held = {t.spec.name: t.spec for t in store.list_tables()} if adopt else {}
    out = {}
    for layer, spec in specs.items():  # every table checked before any is created
        have = held.get(spec.name)
        if have is None:
            out[layer] = spec
        elif (
            have.dim == spec.dim
            and have.num_rows == spec.num_rows
            and (not have.head_rows or tuple(have.head_rows) == tuple(spec.head_rows))
        ):
            out[layer] = have
        else:
            raise ConfigError(
                f"the store's table {spec.name!r} has {have.num_rows:,} rows of {have.dim}, "
                f"this run needs {spec.num_rows:,} rows of {spec.dim} in heads "
                f"{tuple(spec.head_rows)[:2]}...: drop it (`engram table drop`), or give this "
                "run another store (--data) or table prefix"
            )
    for spec in out.values():
        if spec.name not in held:
            store.create_table(spec)  # idempotent for the same spec
    return out


def connect_store(
    addresses: tuple[str, ...] | list[str], token: str = "", timeout_s: float = 10.0
) -> StoreClient:
    """A StoreClient to the shards; ShardUnavailable (a runtime error, not a usage one) at
    once if none answers."""
    from engram_store.rpc.client import StoreClient

    try:
        probe = StoreClient(
            list(addresses), ClientConfig(timeout_s=timeout_s, retries=2, token=token)
        )
        probe.stats()
        probe.close()
        return StoreClient(list(addresses), ClientConfig(token=token))
    except EngramError as e:
        raise ShardUnavailable(
            f"the memory store at {', '.join(addresses)} is unreachable ({e}); start it with "
            "`engram serve` / the cluster, or pass the right --store/--address"
        ) from None


def store_memory_bytes(metrics: tuple[str, ...] | list[str], token: str = "") -> int | None:
    """The RAM the shards' tables hold (the engine's arrays and indexes: engram_memory_bytes),
    summed over the shards' /metrics at "host:port"; None if there are none or one is unreadable
    (logged)."""
    from engram_store.rpc.metrics import scrape

    total = 0
    for address in metrics:
        try:
            samples = scrape(address, token=token).get("engram_memory_bytes", [])
        except (OSError, ValueError) as e:
            log.warning("the memory of shard /metrics %s is unreadable: %s", address, e)
            return None
        total += int(sum(v for _, v in samples))
    return total if metrics else None
