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
import time
from collections.abc import Iterable
from dataclasses import dataclass

import ray

from cluster.config import ClusterConfig
from cluster.registry import Registry, ray_get, registry_actor_options
from cluster.runtime import (
    RayAuthRequired,
    RayUnreachable,
    SeveralRays,
    join_ray,
    local_rays,
    pick_local_ray,
    probe_gcs,
    ray_token,
    start_local_ray,
)
from engram_store.engine.config import TableConfig
from engram_store.engine.errors import ConfigError, DataDirLocked, EngramError, ShardUnavailable
from engram_store.engine.routing import ShardMap
from engram_store.rpc.client import StoreClient, probe_shard
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.metrics import scrape, summarize

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
    metrics_address: str = ""  # the shard's Prometheus /metrics "host:port" ("" = off)
    # read from /metrics: requests and errors (calls not OK) so far, p99 latency (ms) of Lookup
    # and PushGradients; {"error": ...} when the scrape failed, {} without metrics
    metrics: dict = dataclasses.field(default_factory=dict)


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
            f"{'bytes':>12} {'req/s':>9}  map  {'requests':>9} {'errors':>7} "
            f"{'lookup p99':>10} {'push p99':>9}  metrics",
        ]
        for s in self.shards:
            lines.append(
                f"{s.index:>5}  {s.address:<21} {s.node_ip:<15} {s.pid:>7} "
                f"{s.stored_rows:>12} {s.stored_bytes:>12} {s.requests_per_s:>9.1f}  "
                f"v{s.map_version:<3} {_metrics_columns(s)}"
                + (f"  ERROR {s.error}" if s.error else "")
            )
        if self.last_reshard:
            r = self.last_reshard
            lines.append(
                f"last reshard: {r['from']} -> {r['to']} shards, {r['moved_slots']} "
                f"slots / {r['moved_rows']} rows moved in {r['duration_s']} s"
            )
        return "\n".join(lines)


def _metrics_columns(s: ShardStatus) -> str:
    """The /metrics part of a status line: requests, errors, p99s, and where it was read."""
    m = s.metrics
    if not m or "error" in m:
        why = f"unreadable ({m['error']})" if m else "off"
        return f"{'-':>9} {'-':>7} {'-':>10} {'-':>9}  {s.metrics_address or ''} {why}".rstrip()

    def ms(key: str) -> str:
        v = m.get(key)
        return "-" if v is None or math.isnan(v) else f"{v:.1f}ms"

    return (
        f"{m['requests']:>9} {m['errors']:>7} {ms('lookup_p99_ms'):>10} "
        f"{ms('push_p99_ms'):>9}  {s.metrics_address}/metrics"
    )


def read_shard_metrics(address: str, client: ClientConfig, timeout_s: float = 2.0) -> dict:
    """What `engram cluster status` shows of a shard's /metrics at "host:port" (read with the
    cluster client's token and TLS certificate): requests and errors so far, p99 latency (ms)
    of Lookup and PushGradients; {"error": ...} if unreadable."""
    try:
        families = scrape(
            address, timeout_s=timeout_s, token=client.token, tls_root_cert=client.tls_root_cert
        )
        summary = summarize(families)
    except (OSError, ValueError) as e:  # refused, timed out, not Prometheus text
        return {"error": f"{type(e).__name__}: {e}"}
    methods = summary["methods"]
    return {
        "requests": sum(m["requests"] for m in methods.values()),
        "errors": sum(sum(m["errors"].values()) for m in methods.values()),
        "lookup_p99_ms": methods.get("Lookup", {}).get("p99_ms"),
        "push_p99_ms": methods.get("PushGradients", {}).get("p99_ms"),
    }


def _connect_ray(
    address: str | None, config: ClusterConfig, timeout_s: float = 5.0
) -> tuple[str, bool]:
    """Connect this process to Ray for `up`; returns (GCS address, whether we started Ray here).

    None: reuse this process's Ray if connected, else start a local Ray (on 127.0.0.1) whose only
    node is a store node. An address: probe it first (runtime.join_ray), so a wrong one, or a
    missing or wrong Ray token, fails within about `timeout_s` and changes nothing.
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
    if ray.is_initialized():
        return _same_ray(address, timeout_s), False
    if address == "auto":  # Ray's "any local Ray": here, the only one, or a refusal
        return _join_local_ray(config.namespace, timeout_s)[0], False
    return join_ray(address, namespace=config.namespace, timeout_s=timeout_s), False


def _same_ray(address: str | None, timeout_s: float) -> str:
    """This process's Ray address; ConfigError when `address` names another one (after a probe
    of it, so that a dead address is said to be dead)."""
    current = ray.get_runtime_context().gcs_address
    if address not in (None, "auto", current):
        if "://" not in address:
            probe_gcs(address, timeout_s)
        raise ConfigError(
            f"this process is connected to Ray at {current}, not {address}; "
            "use one Ray cluster per process"
        )
    return current


def attach_ray(
    address: str | None, namespace: str, timeout_s: float = 5.0, log_to_driver: bool = False
) -> tuple[str, str]:
    """Connect to a running Ray (status/scale/down, a training job's --address); returns (GCS
    address, how it was chosen). None or "auto": this process's Ray if connected, else the only
    Ray running on this machine; several are refused with a list (SeveralRays), none with
    NoLocalRay: a command never attaches to an arbitrary Ray.
    """
    if ray.is_initialized():
        return _same_ray(address, timeout_s), ""
    if address not in (None, "auto"):
        return join_ray(
            address, namespace=namespace, timeout_s=timeout_s, log_to_driver=log_to_driver
        ), ""
    return _join_local_ray(namespace, timeout_s, log_to_driver)


def _join_local_ray(
    namespace: str, timeout_s: float, log_to_driver: bool = False
) -> tuple[str, str]:
    """Join the only Ray running on this machine (pick_local_ray); (address, which one it is).
    One that wants this machine's token (~/.ray/auth_token) gets it, as Ray's own
    `address="auto"` does; an explicit address gets it only with RAY_AUTH_MODE=token."""
    chosen = pick_local_ray(local_rays())
    target = chosen.address
    try:
        probe_gcs(chosen.address, timeout_s)
    except RayAuthRequired:
        if not ray_token()[0] or not probe_gcs(chosen.address, timeout_s, use_token=True):
            raise
        target = "auto"  # Ray sends this machine's token only to a local Ray it finds itself
    address = join_ray(
        target, namespace=namespace, timeout_s=timeout_s, log_to_driver=log_to_driver
    )
    if address != chosen.address:  # another Ray started in between
        ray.shutdown()
        raise SeveralRays(f"Ray connected to {address}, not {chosen.address}; give --address")
    return address, f"using the only Ray on this machine, {chosen.describe()}"


def clusters_on_ray() -> list[tuple[str, str]]:
    """(name, namespace) of every engram cluster up on the connected Ray (its registry actors)."""
    suffix = ClusterConfig(name="").registry_name  # ".registry"
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        (a["name"][: -len(suffix)], a["namespace"]) for a in actors if a["name"].endswith(suffix)
    )


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
        self.chosen = ""  # how connect() picked a local Ray, when no address was given

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        config: ClusterConfig,
        address: str | None = None,
        tables: Iterable[TableConfig] = (),
        timeout_s: float = 5.0,
    ) -> EngramCluster:
        """Start (or reopen from config.data_root) a cluster of config.num_shards shards and
        create `tables`. Refuses, changing nothing, a data root of another layout
        (LayoutMismatch), one a live cluster serves (DataDirLocked), a cluster name already up
        (ClusterExists), an unreachable address (RayUnreachable, within about `timeout_s`) and a
        missing or wrong Ray token (RayAuthRequired, RayTokenRefused)."""
        config.validate()
        tables = list(tables)
        for t in tables:
            t.validate()
        ray_address, owns_ray = _connect_ray(address, config, timeout_s)
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
        cls,
        address: str | None = None,
        name: str = "engram",
        namespace: str = "engram",
        timeout_s: float = 5.0,
    ) -> EngramCluster:
        """The cluster `name` that is up on the Ray at `address` (None: this process's Ray, else
        the only Ray on this machine; see attach_ray). `chosen` on the result says how a local
        Ray was picked ("" when it was given). ClusterNotFound lists the clusters that are up."""
        ray_address, chosen = attach_ray(address, namespace, timeout_s)
        registry = _existing_registry(ClusterConfig(name=name, namespace=namespace))
        if registry is None:
            where = f" ({chosen})" if chosen else ""
            up = ", ".join(f"{n} (namespace {ns})" for n, ns in clusters_on_ray()) or "none"
            raise ClusterNotFound(
                f"no cluster named {name!r} is up in Ray namespace {namespace!r} at "
                f"{ray_address}{where}; clusters up there: {up}"
            )
        config = ray_get(registry.get_config.remote(), timeout=30)
        cluster = cls(registry, config, ray_address)
        cluster.chosen = chosen
        return cluster

    # -- operations --------------------------------------------------------------------------
    def shard_map(self) -> ShardMap:
        """The current shard map."""
        return ray_get(self._registry.get_map.remote(), timeout=30)

    def client(self, config: ClientConfig | None = None) -> StoreClient:
        """A StoreClient that refreshes its map from the registry when a shard says it is stale."""
        return StoreClient(
            self.shard_map(), config or self.config.client, map_provider=self.shard_map
        )

    def status(self, interval_s: float = 1.0, metrics: bool = True) -> ClusterStatus:
        """Shards with their node, address, stored rows/bytes, requests/s measured over
        `interval_s` (0: not measured) and, with `metrics`, what each shard's /metrics says
        (read from this process: requests, errors, p99 latencies)."""
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
                    metrics_address=info.get("metrics", ""),
                    metrics=read_shard_metrics(info["metrics"], self.config.client)
                    if metrics and info.get("metrics")
                    else {},
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

    def describe(self) -> str:
        """Which cluster this is: name, shards, data root, namespace and Ray (what `engram
        cluster down` says it stops)."""
        summary = ray_get(self._registry.summary.remote(), timeout=30)
        return (
            f"cluster {summary['name']!r} ({summary['num_shards']} shard(s), data "
            f"{summary['data_root']}) in Ray namespace {self.config.namespace!r} at "
            f"{self.ray_address}"
        )

    def alive(self, timeout_s: float = 10.0) -> bool:
        """Whether the registry still runs (False once a `down`, from anywhere, stopped it; a
        registry that is busy or restarting counts as alive)."""
        try:
            ray.get(self._registry.pid.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return True
        except ray.exceptions.RayError as e:  # the actor is dead (a down), or Ray itself is
            log.info("registry of cluster %r is gone: %s", self.config.name, type(e).__name__)
            return False
        return True

    def down(self) -> None:
        """Stop every shard and the registry; the data stays in data_root for the next `up`.
        A cluster that is down already (stopped from elsewhere) is left as it is."""
        try:
            ray_get(self._registry.stop.remote(), timeout=120)
        except ray.exceptions.RayActorError:
            log.info("cluster %r was down already", self.config.name)
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
    return EngramCluster.connect(
        address, name=name, namespace=namespace, timeout_s=config.timeout_s
    ).client(config)
