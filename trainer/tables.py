"""What the trainer asks of the store: one table per Engram layer, and a connection that fails at
once, with what to do, when no shard answers. Torch-free."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import EngramError, ShardUnavailable
from engram_store.rpc.config import ClientConfig
from trainer.config import TrainConfig
from trainer.hashing import NgramHasher

if TYPE_CHECKING:
    from engram_store.rpc.client import StoreClient


def table_specs(cfg: TrainConfig, hasher: NgramHasher) -> dict[int, TableConfig]:
    """One table per Engram layer: the layer's primes as heads, Adam at table_lr, no decay."""
    opt = OptimizerConfig(kind="adam", lr=cfg.table_lr)
    return {
        layer: dataclasses.replace(
            hasher.table_spec(layer, optimizer=opt), name=cfg.table_prefix + f"engram_l{layer}"
        )
        for layer in cfg.model.engram_layers
    }


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
