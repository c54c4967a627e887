"""EngramCluster: bring a sharded store up on Ray, watch it, scale it, take it down.

    cluster = EngramCluster.up(ClusterConfig(num_shards=2, data_root="data/c"), tables=[spec])
    with cluster.client() as c:                  # a StoreClient that follows the live shard map
        rows = c.lookup(spec.name, ids)
    cluster.scale(4)                             # live: pushes and lookups keep going
    print(cluster.status().format())
    cluster.down()                               # data stays in data_root; `up` again reopens it

The registry is a detached actor, so the cluster outlives the process that started it when Ray
itself does (`ray start --head` + `--address`); `EngramCluster.connect(address)` finds it again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

import ray

from cluster.config import ClusterConfig
from cluster.registry import Registry, ray_get, registry_actor_options
from cluster.runtime import start_local_ray
from engram_store.engine.config import TableConfig
from engram_store.engine.errors import ConfigError, DataDirLocked, EngramError, ShardUnavailable
from engram_store.engine.routing import ShardMap
from engram_store.rpc.client import StoreClient, probe_shard
from engram_store.rpc.config import ClientConfig

log = logging.getLogger(__name__)


# These register by class name when defined (engram_store/engine/errors.py), so they keep their
# class across gRPC (engram_store/rpc/status.py) as well as across Ray (ray_get re-raises the
# remote error itself); none is the default class of its status code.
class ClusterExists(EngramError):
    """A cluster of that name is already up in the Ray namespace."""

    code = "ALREADY_EXISTS"
    hint = "connect to it (EngramCluster.connect, `engram cluster status`) or pick another --name"


class ClusterNotFound(EngramError):
    """No cluster of that name is up in the Ray namespace."""

    code = "NOT_FOUND"
    hint = "start it (`engram cluster up`), or check --name, --namespace and --address"


class RayUnreachable(ShardUnavailable):
    """Nothing answers at the Ray address given."""

    hint = "give the Ray head's GCS address (host:6379), or leave --address out for a local Ray"


@dataclass(frozen=True)
class ShardStatus:
    index: int
    address: str
    node_ip: str
    node_id: str
    pid: int
    stored_rows: int
    stored_bytes: int
    requests_per_s: float
    map_version: int  # the version this shard holds (equal to the cluster's when settled)
    error: str = ""


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    layout: str
    data_root: str
    ray_address: str
    map_version: int
    num_slots: int
    shards: tuple[ShardStatus, ...]
    last_reshard: dict

    @property
    def nodes(self) -> list[str]:
        """Node ids that host shards."""
        return sorted({s.node_id for s in self.shards})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A human-readable table (what `engram cluster status` prints)."""
        lines = [
            f"cluster {self.name}  layout {self.layout}  map v{self.map_version}  "
            f"{len(self.shards)} shards on {len(self.nodes)} node(s)  "
            f"{self.num_slots} slots  data {self.data_root}  ray {self.ray_address}",
            f"{'shard':>5}  {'address':<21} {'node':<15} {'pid':>7} {'rows':>12} "
            f"{'bytes':>12} {'req/s':>9}  map",
        ]
        for s in self.shards:
            lines.append(
                f"{s.index:>5}  {s.address:<21} {s.node_ip:<15} {s.pid:>7} "
                f"{s.stored_rows:>12} {s.stored_bytes:>12} {s.requests_per_s:>9.1f}  "
                f"v{s.map_version}" + (f"  ERROR {s.error}" if s.error else "")
            )
        if self.last_reshard:
            r = self.last_reshard
            lines.append(
                f"last reshard: {r['from']} -> {r['to']} shards, {r['moved_slots']} "
                f"slots / {r['moved_rows']} rows moved in {r['duration_s']} s"
            )
        return "\n".join(lines)


def _probe_tcp(address: str, timeout_s: float = 3.0) -> None:
    """Raise RayUnreachable unless something accepts TCP connections at "host:port"."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise RayUnreachable(
            f"cannot reach a Ray cluster at {address!r} ({e}); give the head's GCS address "
            "(`ray start --head` prints it, default port 6379) or leave --address out to start "
            "a local Ray"
        ) from None


def _connect_ray(address: str | None, config: ClusterConfig) -> tuple[str, bool]:
    """Connect this process to Ray; returns (GCS address, whether we started Ray here).

    None: reuse this process's Ray if connected, else start a local Ray whose only node is a
    store node. An address: probe it first, so a wrong one fails fast and changes nothing.
    """
    if address is None:
        if ray.is_initialized():
            return ray.get_runtime_context().gcs_address, False
        need = math.ceil(config.num_shards * config.cpus_per_shard)
        # Logical CPUs: room to scale to twice the shards even on a small machine.
        start_local_ray(
            num_cpus=2 * need, resources={config.store_resource: 1000}, namespace=config.namespace
        )
        return ray.get_runtime_context().gcs_address, True
    if address != "auto" and "://" not in address:
        _probe_tcp(address)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in ("auto", current):
            raise ConfigError(
                f"this process is connected to Ray at {current}, not {address}; "
                "use one Ray cluster per process"
            )
        return current, False
    try:
        ray.init(address=address, namespace=config.namespace, log_to_driver=False)
    except ConnectionError as e:
        raise RayUnreachable(f"cannot connect to Ray at {address!r}: {e}") from None
    return ray.get_runtime_context().gcs_address, False


def _existing_registry(config: ClusterConfig):
    try:
        return ray.get_actor(config.registry_name, namespace=config.namespace)
    except ValueError:
        return None


class EngramCluster:
    """Facade over the registry actor; every method blocks until the cluster has done it."""

    def __init__(self, registry, config: ClusterConfig, ray_address: str, owns_ray: bool = False):
        self._registry = registry
        self.config = config
        self.ray_address = ray_address
        self._owns_ray = owns_ray

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def up(
        cls, config: ClusterConfig, address: str | None = None, tables: Iterable[TableConfig] = ()
    ) -> EngramCluster:
        """Start (or reopen from config.data_root) a cluster of config.num_shards shards and
        create `tables`. Refuses, changing nothing, a data root of another layout
        (LayoutMismatch), one a live cluster serves (DataDirLocked), a cluster name already up
        (ClusterExists) and an unreachable address (RayUnreachable)."""
        config.validate()
        tables = list(tables)
        for t in tables:
            t.validate()
        ray_address, owns_ray = _connect_ray(address, config)
        try:
            existing = _existing_registry(config)
            if existing is not None:
                other = ray_get(existing.get_config.remote(), timeout=30)
                if os.path.abspath(other.data_root) == os.path.abspath(config.data_root):
                    raise DataDirLocked(
                        f"cluster {config.name!r} already serves {config.data_root}; use "
                        "EngramCluster.connect() / `engram cluster status`, or `down` it first"
                    )
                raise ClusterExists(
                    f"a cluster named {config.name!r} is already up in Ray namespace "
                    f"{config.namespace!r} (data {other.data_root}); pick another name"
                )
            registry = ray.remote(Registry).options(**registry_actor_options(config)).remote(config)
            try:
                summary = ray_get(
                    registry.start.remote([t.to_dict() for t in tables]),
                    timeout=config.ready_timeout_s + 60,
                )
            except BaseException:
                ray.kill(registry, no_restart=True)
                raise
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        cluster = cls(registry, config, ray_address, owns_ray)
        try:
            if tables:
                with cluster.client() as c:
                    for t in tables:
                        c.create_table(t)
                ray_get(registry.record_tables.remote([t.to_dict() for t in tables]), timeout=30)
            if summary["num_shards"] != config.num_shards:
                cluster.scale(config.num_shards)  # reopened with another shard count
        except BaseException:
            cluster.down()
            raise
        return cluster

    @classmethod
    def connect(
        cls, address: str | None = None, name: str = "engram", namespace: str = "engram"
    ) -> EngramCluster:
        """The cluster `name` that is up on the Ray cluster at `address` (None: this process's
        Ray, else a local `ray start` one)."""
        probe = ClusterConfig(name=name, namespace=namespace)
        if address is None and not ray.is_initialized():
            address = "auto"
        try:
            ray_address, _ = _connect_ray(address, probe)
        except ConnectionError as e:
            raise RayUnreachable(f"no Ray cluster to connect to ({e}); give --address") from None
        registry = _existing_registry(probe)
        if registry is None:
            raise ClusterNotFound(
                f"no cluster named {name!r} is up in Ray namespace "
                f"{namespace!r} at {ray_address}; run `engram cluster up`"
            )
        config = ray_get(registry.get_config.remote(), timeout=30)
        return cls(registry, config, ray_address)

    # -- operations --------------------------------------------------------------------------
    def shard_map(self) -> ShardMap:
        """The current shard map."""
        return ray_get(self._registry.get_map.remote(), timeout=30)

    def client(self, config: ClientConfig | None = None) -> StoreClient:
        """A StoreClient that refreshes its map from the registry when a shard says it is stale."""
        return StoreClient(
            self.shard_map(), config or self.config.client, map_provider=self.shard_map
        )

    def status(self, interval_s: float = 1.0) -> ClusterStatus:
        """Shards with their node, address, stored rows/bytes, and requests/s measured over
        `interval_s` (0: not measured)."""
        summary = ray_get(self._registry.summary.remote(), timeout=30)
        infos = {i["index"]: i for i in ray_get(self._registry.shard_info.remote(), timeout=60)}
        first = ray_get(self._registry.shard_stats.remote(), timeout=60)
        second = first
        if interval_s > 0:
            time.sleep(interval_s)
            second = ray_get(self._registry.shard_stats.remote(), timeout=60)
        shards = []
        for a, b in zip(first, second, strict=True):
            info = infos.get(b["index"], {})
            rate = 0.0
            if "error" not in a and "error" not in b and b["sampled_at"] > a["sampled_at"]:
                rate = max(0, b["requests"] - a["requests"]) / (b["sampled_at"] - a["sampled_at"])
            shards.append(
                ShardStatus(
                    index=b["index"],
                    address=b["address"],
                    node_ip=info.get("node_ip", ""),
                    node_id=info.get("node_id", ""),
                    pid=info.get("pid", 0),
                    stored_rows=b.get("stored_rows", 0),
                    stored_bytes=b.get("stored_bytes", 0),
                    requests_per_s=round(rate, 1),
                    map_version=b.get("map_version", 0),
                    error=b.get("error", ""),
                )
            )
        return ClusterStatus(
            name=summary["name"],
            layout=summary["layout"],
            data_root=summary["data_root"],
            ray_address=self.ray_address,
            map_version=summary["map_version"],
            num_slots=summary["num_slots"],
            shards=tuple(shards),
            last_reshard=summary["last_reshard"],
        )

    def scale(self, num_shards: int) -> dict:
        """Reshard to `num_shards` while serving. Returns {from, to, moved_slots, moved_rows,
        duration_s, version}."""
        if num_shards < 1:
            raise ConfigError(
                f"cannot scale to {num_shards} shards; a cluster keeps at least 1 "
                "(use `engram cluster down` to stop it)"
            )
        return ray_get(self._registry.scale.remote(int(num_shards)))

    def shard_pid(self, index: int) -> int:
        """Process id of shard `index`'s actor (tests kill it to check restarts)."""
        return ray_get(self._registry.shard_pid.remote(index), timeout=60)

    def registry_pid(self) -> int:
        """Process id of the registry actor."""
        return ray_get(self._registry.pid.remote(), timeout=60)

    def down(self) -> None:
        """Stop every shard and the registry; the data stays in data_root for the next `up`."""
        try:
            ray_get(self._registry.stop.remote(), timeout=120)
        finally:
            ray.kill(self._registry, no_restart=True)
            self.close()

    def close(self) -> None:
        """Let go of the cluster without stopping it; shuts down a Ray that `up` started."""
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> EngramCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def discover_store(
    address: str,
    config: ClientConfig | None = None,
    name: str = "engram",
    namespace: str = "engram",
) -> StoreClient:
    """A StoreClient for the store at `address`: a shard's "host:port" (the map comes from the
    shards' published state, no Ray needed) or a Ray address (the map comes from the registry)."""
    config = config or ClientConfig()
    if address != "auto" and "://" not in address:
        try:
            if probe_shard(address, config):
                return StoreClient(address, config)
        except ShardUnavailable:
            raise RayUnreachable(
                f"nothing answers at {address!r}; give a shard's host:port or a Ray address"
            ) from None
        # It answers, but not as a shard: a Ray GCS (gRPC UNIMPLEMENTED).
        log.debug("%s is no shard; trying it as a Ray address", address)
    return EngramCluster.connect(address, name=name, namespace=namespace).client(config)
