"""Configuration of a Ray-hosted engram store: how many shards, where their data lives, what they
reserve on a node. Frozen, like every config of the project; the CLI builds it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engram_store.engine.config import ShardConfig
from engram_store.engine.errors import ConfigError
from engram_store.engine.routing import DEFAULT_SLOTS
from engram_store.rpc.config import ClientConfig, ServerConfig

LOCAL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ClusterConfig:
    """A store of `num_shards` shard servers, each an actor on a node that has `store_resource`.

    `server` is a template: each shard server gets a copy whose shard has data_dir
    `<data_root>/shard-<index>`, listening on the host/port the cluster picks. `host` is the
    address shards listen on and advertise: "" picks 127.0.0.1 when every Ray node is on one
    machine and the node's IP otherwise; "node" always uses the node's IP; anything else is used
    as given.
    """

    num_shards: int = 2
    data_root: str = "data/cluster"
    store_resource: str = "engram_store"
    cpus_per_shard: float = 1.0
    memory_per_shard: int = 0  # bytes reserved with Ray per shard actor; 0 = no reservation
    num_slots: int = DEFAULT_SLOTS
    namespace: str = "engram"
    name: str = "engram"  # registry actor is "<name>.registry" in `namespace`
    max_restarts: int = -1  # Ray restarts of a killed shard actor; -1 = unlimited
    host: str = ""
    server: ServerConfig = field(
        default_factory=lambda: ServerConfig(ShardConfig(data_dir="-"), workers=8)
    )
    client: ClientConfig = field(default_factory=ClientConfig)
    # data_root is one shared filesystem (NFS, ...): a shard may reopen its directory from any
    # store node. Off: each shard is pinned to the node its data was written on.
    shared_storage: bool = False
    ready_timeout_s: float = 120.0  # how long up/scale wait for shard actors to start
    # Slots moved per freeze while resharding: fewer = shorter pauses of pushes to the moving
    # slots, more map versions (one per group).
    reshard_group_slots: int = 64
    # Each shard serves Prometheus /metrics on a free port of its host (`engram cluster status`
    # reads them; ShardHost.info() says where). Off: no metrics server per shard.
    metrics: bool = True

    @property
    def registry_name(self) -> str:
        return f"{self.name}.registry"

    def shard_actor_name(self, index: int) -> str:
        return f"{self.name}.shard-{index}"

    def validate(self) -> None:
        """Raise ConfigError naming the field to change."""
        if self.num_shards < 1:
            raise ConfigError(f"num_shards={self.num_shards}: a cluster needs at least 1 shard")
        if self.num_shards > self.num_slots:
            raise ConfigError(
                f"num_shards={self.num_shards} exceeds num_slots={self.num_slots}; "
                "raise --slots or lower --shards"
            )
        if not self.data_root:
            raise ConfigError("a cluster needs a data root (--data DIR)")
        if self.cpus_per_shard < 0 or self.memory_per_shard < 0:
            raise ConfigError("cpus_per_shard and memory_per_shard must be >= 0")
        if not self.store_resource:
            raise ConfigError("store_resource must name a Ray custom resource")
        if self.reshard_group_slots < 1:
            raise ConfigError(f"reshard_group_slots={self.reshard_group_slots} must be >= 1")
        if self.max_restarts < -1:
            raise ConfigError(f"max_restarts={self.max_restarts} must be -1 (unlimited) or >= 0")
        self.client.validate()

    def server_config(self, index: int, host: str, port: int = 0) -> ServerConfig:
        """The ServerConfig of shard `index`: the template with its own data dir and address,
        and /metrics on any free port when `metrics` is on (shards of one node cannot share one)."""
        shard = dataclasses.replace(self.server.shard, data_dir=shard_dir(self.data_root, index))
        return dataclasses.replace(
            self.server,
            shard=shard,
            host=host,
            port=port,
            metrics_port=0 if self.metrics else None,
        )


def shard_dir(data_root: str, index: int) -> str:
    """LMDB directory of shard `index` under a cluster's data root."""
    return f"{data_root.rstrip('/')}/shard-{index}"
