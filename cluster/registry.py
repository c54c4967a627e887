"""The cluster registry: one named, detached actor that owns the shard actors and the shard map.

It keeps the versioned routing.ShardMap (slot -> shard, shard -> address) and the layout id, pushes
each shard its ShardState (owned and frozen slots, map version, the whole map) over gRPC, serves
`get_map()` to clients' map_provider, and moves slots between shards when the cluster is scaled.
The layout lives in `<data_root>/cluster.json` and `<data_root>/cluster.lock` (flock) keeps a
second live cluster off the same directory; both are engram_store/ops/layout.py's.

Resharding N -> M follows docs/design.md "Routing and resharding", as cluster/planning.py plans
it: start new shards when growing; for each group of moving slots (one source, one destination,
at most reshard_group_slots slots): freeze them on the source, copy their rows (ExportRows ->
ImportRows, every table), publish the next map (destination first), delete the rows on the
source, unfreeze; stop the removed shards when shrinking. A push either commits before the freeze
(and is copied) or is answered UNAVAILABLE and retried by the client against the new owner, so
none is lost; lookups keep reading the committed rows on the source until the new owners hold
them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import numpy as np
import ray

from cluster import planning
from cluster.admin import ShardAdmin, request_totals, shard_state
from cluster.config import LOCAL_HOST, ClusterConfig, shard_dir
from cluster.planning import SlotMove
from cluster.shard_actor import ShardHost, _reconstructed, shard_actor_options
from engram_store.engine.errors import DataDirLocked, EngramError, ShardUnavailable
from engram_store.engine.routing import ShardMap
from engram_store.ops.layout import (
    ClusterLayout,
    DataRootLock,
    layout_path,
    lock_data_root,
    read_layout,
    write_layout,
)

log = logging.getLogger(__name__)


def ray_get(refs, timeout: float | None = None):
    """ray.get that raises the project's own error (LayoutMismatch, ...) a remote call raised,
    instead of Ray's wrapper with a remote traceback."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, EngramError):
            raise e.cause from None
        raise
    except ray.exceptions.GetTimeoutError:
        raise ShardUnavailable(
            f"a cluster actor did not answer within {timeout:.0f}s; check `ray status` for "
            "pending actors (is there a node with the store resource and free CPUs?)"
        ) from None


def _named_actor(name: str, namespace: str):
    """The live actor called `name`, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def store_nodes(resource: str) -> list[dict]:
    """Alive Ray nodes that offer `resource`, in a stable order (IP, then node id)."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(resource, 0) > 0]
    return sorted(nodes, key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))


def registry_actor_options(config: ClusterConfig) -> dict:
    """Named, detached, restartable, threaded (get_map answers while a reshard runs), on the first
    store node, because cluster.json lives in the data root there."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict = {
        "name": config.registry_name,
        "namespace": config.namespace,
        "lifetime": "detached",
        "num_cpus": 0,
        "max_restarts": config.max_restarts,
        # calls made while it restarts wait for it (a scale() it was running is
        # re-run from the map it saved, which makes the same target)
        "max_task_retries": -1 if config.max_restarts else 0,
        "max_concurrency": 16,
    }
    nodes = store_nodes(config.store_resource)
    if nodes:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nodes[0]["NodeID"], soft=False)
    else:
        opts["resources"] = {config.store_resource: 0.001}
    return opts


class Registry:
    """Owner of a cluster's shard actors and its shard map. Becomes a Ray actor in api.py."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self._lock = threading.RLock()  # one of start/scale/stop/restart handling at a time
        self._map: ShardMap | None = None
        self._hosts: list = []  # shard index -> ShardHost actor handle
        self._host_nodes: list[str] = []  # shard index -> Ray node id it is pinned to
        self._placement: dict[int, str] = {}  # shard index -> node IP (kept in cluster.json)
        self._frozen: dict[int, bytes] = {}
        self._receiving: dict[int, bytes] = {}  # shard index -> slots being copied to it
        self._admins: dict[str, ShardAdmin] = {}
        self._tables: dict[str, dict] = {}
        self._layout = ""
        self._restored_from = ""  # kept from a layout that `engram ops restore` wrote
        self._dir_lock: DataRootLock | None = None
        self._last_reshard: dict = {}
        if _reconstructed():
            # The registry crashed and Ray restarted it. Its shard actors are detached and kept
            # serving: adopt them (start any that are gone) from cluster.json.
            log.warning(
                "registry of cluster %r restarted by Ray: adopting its shards from %s",
                config.name,
                layout_path(config.data_root),
            )
            self.start([])

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, tables: list[dict]) -> dict:
        """Open or create the layout under data_root, start the shards, publish the map.

        `tables` are TableConfig dicts the caller is about to create; a table of the same name
        recorded with another spec is a LayoutMismatch. Nothing is changed when a check fails.
        """
        with self._lock:
            if self._map is not None:
                return self.summary()
            self._dir_lock = lock_data_root(self.config.data_root, {"cluster": self.config.name})
            try:
                stored = read_layout(self.config.data_root)
                if stored is not None:
                    stored.check_compatible(
                        self.config.num_slots, tables, layout_path(self.config.data_root)
                    )
                    self._layout = stored.layout
                    self._placement = dict(stored.placement)
                    self._tables = dict(stored.tables)
                    self._restored_from = stored.restored_from
                    addresses = self._start_hosts(range(stored.num_shards))
                    self._map = planning.with_addresses(stored.shard_map, addresses)
                else:
                    self._layout = uuid.uuid4().hex
                    addresses = self._start_hosts(range(self.config.num_shards))
                    self._map = ShardMap.balanced(
                        addresses, self.config.num_slots, version=1, layout=self._layout
                    )
                self._frozen = {}
                self._publish(range(self._map.num_shards))
                self._tables = dict(self._layout_record().with_tables(tables).tables)
                self._save_meta()
            except BaseException:
                self._kill_hosts(range(len(self._hosts)))
                self._map = None
                self._release_dir_lock()
                raise
            log.info(
                "cluster %r up: layout %s, %d shards, map v%d",
                self.config.name,
                self._layout,
                self._map.num_shards,
                self._map.version,
            )
            return self.summary()

    def stop(self) -> None:
        """Stop every shard server (data stays on disk) and release the data root."""
        with self._lock:
            if self._hosts:
                self._stop_servers(range(len(self._hosts)))
            self._kill_hosts(range(len(self._hosts)))
            for a in self._admins.values():
                a.close()
            self._admins.clear()
            self._map = None
            self._release_dir_lock()

    # -- queries -----------------------------------------------------------------------------
    def get_map(self) -> ShardMap:
        """The current shard map (clients' map_provider)."""
        if self._map is None:
            raise ShardUnavailable(
                f"cluster {self.config.name!r} is not up; run `engram cluster up`"
            )
        return self._map

    def get_config(self) -> ClusterConfig:
        return self.config

    def summary(self) -> dict:
        m = self._map
        return {
            "name": self.config.name,
            "layout": self._layout,
            "data_root": self.config.data_root,
            "num_shards": m.num_shards if m else 0,
            "map_version": m.version if m else 0,
            "num_slots": m.num_slots if m else self.config.num_slots,
            "addresses": list(m.addresses) if m else [],
            "last_reshard": self._last_reshard,
        }

    def shard_info(self) -> list[dict]:
        """Per shard: index, address, pid, node id/IP, data dir (from the actors)."""
        return ray_get([h.info.remote() for h in list(self._hosts)], timeout=30)

    def shard_pid(self, index: int) -> int:
        return ray_get(self._hosts[index].pid.remote(), timeout=30)

    def pid(self) -> int:
        return os.getpid()

    def shard_stats(self) -> list[dict]:
        """Per shard: rows, bytes, requests served, map version it holds (from Stats)."""
        m = self.get_map()
        out = []
        for i, addr in enumerate(m.addresses):
            try:
                s = self._admin(addr).stats(wait_s=2.0)
            except EngramError as e:
                log.warning("Stats of shard %d (%s) failed: %s", i, addr, e)
                out.append({"index": i, "address": addr, "error": str(e)})
                continue
            out.append(
                {
                    "index": i,
                    "address": addr,
                    "stored_rows": s.stored_rows,
                    "stored_bytes": s.stored_bytes,
                    "used_bytes": s.used_bytes,
                    "requests": request_totals(s),
                    "uptime_s": s.uptime_s,
                    "map_version": s.shard.map_version,
                    "tables": len(s.tables),
                    "sampled_at": time.time(),
                }
            )
        return out

    # -- events ------------------------------------------------------------------------------
    def shard_restarted(self, index: int, address: str) -> None:
        """A shard actor that Ray restarted serves again at `address`: give it its state (and
        everyone a new map if its address changed)."""
        with self._lock:
            m = self._map
            if m is None or index >= m.num_shards:
                log.info(
                    "shard %d restarted at %s, but it is not in the current map; ignored",
                    index,
                    address,
                )
                return
            if m.addresses[index] == address:
                log.info("shard %d restarted at its address %s: sending its state", index, address)
                self._publish([index])
                return
            log.info(
                "shard %d restarted at %s (was %s): publishing a new map",
                index,
                address,
                m.addresses[index],
            )
            addresses = list(m.addresses)
            addresses[index] = address
            self._map = planning.with_addresses(m, addresses)
            self._publish(range(self._map.num_shards))
            self._save_meta()

    def scale(self, num_shards: int) -> dict:
        """Reshard to `num_shards` while serving; returns what moved and how long it took."""
        with self._lock:
            old = self.get_map()
            plan = planning.plan_reshard(old, num_shards, self.config.reshard_group_slots)
            n, m = plan.from_shards, plan.to_shards
            t0 = time.monotonic()
            if plan.is_noop:
                return {
                    "from": n,
                    "to": m,
                    "moved_slots": 0,
                    "moved_rows": 0,
                    "duration_s": 0.0,
                    "start_s": 0.0,
                    "longest_freeze_s": 0.0,
                    "version": old.version,
                }
            log.info(
                "cluster %r: resharding %d -> %d shards, %d slots in %d groups",
                self.config.name,
                n,
                m,
                plan.moved_slots,
                len(plan.moves),
            )
            if plan.started:
                addresses = self._start_hosts(plan.started)
                try:
                    self._map = planning.grown(old, addresses)
                    self._publish(range(m))  # new shards: the map, owning nothing yet
                    self._copy_tables(plan.started)
                except BaseException:
                    self._map = old
                    self._kill_hosts(plan.started)
                    raise
            t_started = time.monotonic()
            moved_rows, longest_freeze = 0, 0.0
            current = self._map
            for move in plan.moves:
                current, rows, blocked = self._move(current, move)
                longest_freeze = max(longest_freeze, blocked)
                moved_rows += rows
            if plan.removed:
                # Every slot has left the removed shards; drop them from the map, then stop them
                # (their directories now hold no rows).
                self._map = current = planning.shrunk(current, m)
                self._publish(range(m))
                time.sleep(0.2)  # let in-flight requests on removed shards finish
                self._stop_hosts(plan.removed)
                for i in plan.removed:  # their directories hold no rows: no node to come back to
                    self._placement.pop(i, None)
            self._save_meta()
            # start_s: new shard actors starting; longest_freeze_s: the longest time any slot
            # refused pushes (one group's freeze -> copy -> new map on the source).
            self._last_reshard = {
                "from": n,
                "to": m,
                "moved_slots": plan.moved_slots,
                "moved_rows": moved_rows,
                "duration_s": round(time.monotonic() - t0, 3),
                "start_s": round(t_started - t0, 3),
                "longest_freeze_s": round(longest_freeze, 3),
                "version": current.version,
            }
            log.info("cluster %r resharded: %s", self.config.name, self._last_reshard)
            return dict(self._last_reshard)

    # -- resharding steps --------------------------------------------------------------------
    def _move(self, current: ShardMap, move: SlotMove) -> tuple[ShardMap, int, float]:
        """Move `move.slots` from shard `move.source` to shard `move.dest`. Returns the
        published map, the rows copied, and how long pushes to those slots were refused."""
        src, dst = move.source, move.dest
        mask = np.zeros(current.num_slots, dtype=np.uint8)
        mask[list(move.slots)] = 1
        source = self._admin(current.addresses[src])
        dest = self._admin(current.addresses[dst])
        tables = [t.spec for t in source.list_tables()]
        for spec in tables:  # before the freeze: new shards may lack tables created since
            dest.create_table(spec)  # idempotent
        self._receiving[dst] = mask.tobytes()
        self._publish([dst])  # the destination takes the rows of these slots (ImportRows)
        t_frozen = time.monotonic()
        self._frozen[src] = mask.tobytes()
        self._publish([src])  # freeze: from here on pushes to these slots are refused
        rows = 0
        try:
            for spec in tables:
                rows += source.copy_rows_to(dest, spec.name, mask.tobytes())
        except BaseException:
            self._receiving.pop(dst, None)  # the next publish takes them back
            raise
        nxt = planning.moved(current, move)
        self._map = nxt  # clients may fetch it now: the destination gets it first
        self._receiving.pop(dst, None)  # it owns them by the map now
        # The source last: once it has the new map it answers "stale map" for these slots, and
        # a client that then refreshes its map from any shard's Stats must find the new one.
        # The pause of pushes to these slots ends here, not after the delete.
        others = [i for i in range(nxt.num_shards) if i not in (src, dst)]
        self._publish([dst, *others, src])
        blocked = time.monotonic() - t_frozen
        for spec in tables:
            source.delete_rows(spec.name, mask.tobytes())
        self._frozen.pop(src, None)
        self._publish([src])  # unfreeze
        self._save_meta()
        log.debug(
            "moved %d slots (%d rows) %d -> %d, map v%d, pushes paused %.3fs",
            len(move.slots),
            rows,
            src,
            dst,
            nxt.version,
            blocked,
        )
        return nxt, rows, blocked

    def _copy_tables(self, indices) -> None:
        """Create every table of shard 0 on the shards `indices`."""
        specs = [t.spec for t in self._admin(self._map.addresses[0]).list_tables()]
        for i in indices:
            dest = self._admin(self._map.addresses[i])
            for spec in specs:
                dest.create_table(spec)

    def _publish(self, indices) -> None:
        """Push the current ShardState to the shards `indices`, in that order."""
        m = self._map
        for i in indices:
            self._admin(m.addresses[i]).set_state(
                shard_state(i, m, self._frozen.get(i, b""), self._receiving.get(i, b""))
            )

    # -- shard actors ------------------------------------------------------------------------
    def _host_mode(self) -> str:
        if self.config.host:
            return self.config.host
        ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        return LOCAL_HOST if len(ips) <= 1 else "node"

    def _pick_node(self, index: int, nodes: list[dict], load: dict[str, int]) -> str:
        """A store node for shard `index`: the node of its recorded IP if one is alive (its data
        is there), else the store node with the fewest shards (spread)."""
        want = self._placement.get(index)
        cands = [n for n in nodes if n["NodeManagerAddress"] == want]
        if not cands:
            if want is not None and not self.config.shared_storage:
                raise ShardUnavailable(
                    f"shard {index}'s data is on store node {want}, which is not in the Ray "
                    "cluster; start Ray there with the store resource, or copy "
                    f"{shard_dir(self.config.data_root, index)} to another store node and edit "
                    "its IP in cluster.json (or set shared_storage when data_root is shared)"
                )
            cands = nodes
        return min(cands, key=lambda n: load.get(n["NodeID"], 0))["NodeID"]

    def _start_hosts(self, indices) -> list[str]:
        """Start ShardHost actors for `indices` (appended to self._hosts); their addresses."""
        indices = list(indices)
        nodes = store_nodes(self.config.store_resource)
        if not nodes:
            raise ShardUnavailable(
                f"no alive Ray node offers the resource {self.config.store_resource!r}; start "
                f"store nodes with `ray start ... --resources='{{\"{self.config.store_resource}\": 1}}'`"
            )
        host = self._host_mode()
        load: dict[str, int] = {}
        for nid in self._host_nodes:
            load[nid] = load.get(nid, 0) + 1
        actor_cls = ray.remote(ShardHost)
        new = []
        for i in indices:
            h = _named_actor(self.config.shard_actor_name(i), self.config.namespace)
            if h is not None:
                # It outlived a registry that crashed: adopt it, it still serves its directory.
                info = ray_get(h.info.remote(), timeout=30)
                want = shard_dir(self.config.data_root, i)
                if info["data_dir"] != want or info["layout"] != self._layout:
                    raise DataDirLocked(
                        f"shard actor {self.config.shard_actor_name(i)!r} serves "
                        f"{info['data_dir']} (layout {info['layout']}), not {want}; stop it "
                        "(`ray kill` / `engram cluster down`) or pick another cluster --name"
                    )
                log.info("adopting the live shard actor %r", self.config.shard_actor_name(i))
                node_id = info["node_id"]
            else:
                node_id = self._pick_node(i, nodes, load)
                h = actor_cls.options(**shard_actor_options(self.config, i, node_id)).remote(
                    self.config, i, self._layout, host
                )
            load[node_id] = load.get(node_id, 0) + 1
            new.append(h)
            self._host_nodes.append(node_id)
        assert len(self._hosts) == indices[0], "shards start in index order"
        self._hosts.extend(new)
        addresses = ray_get([h.start.remote() for h in new], timeout=self.config.ready_timeout_s)
        for i, info in zip(
            indices, ray_get([h.info.remote() for h in new], timeout=30), strict=True
        ):
            self._placement[i] = info["node_ip"]
        return list(addresses)

    def _stop_servers(self, indices) -> None:
        """Ask the shard actors `indices` to stop serving and close LMDB. One that is dead or
        does not answer is logged and left to _kill_hosts: its commits are in LMDB already."""
        indices = list(indices)
        try:
            ray.get([self._hosts[i].stop.remote() for i in indices], timeout=30)
        except ray.exceptions.RayError as e:
            log.warning(
                "cluster %r: shards %s did not stop cleanly (%s: %s); killing them, "
                "their committed pushes are on disk",
                self.config.name,
                indices,
                type(e).__name__,
                e,
            )

    def _stop_hosts(self, indices) -> None:
        self._stop_servers(indices)
        self._kill_hosts(indices)

    def _kill_hosts(self, indices) -> None:
        """Kill the actors `indices` (the tail of self._hosts) for good, and wait until their
        names are free (a later scale-up starts shards of the same names)."""
        indices = sorted(indices)
        for i in indices:
            try:
                ray.kill(self._hosts[i], no_restart=True)
            except (ValueError, ray.exceptions.RayError) as e:  # gone already
                log.info("killing shard actor %r: %s", self.config.shard_actor_name(i), e)
        if indices:
            del self._hosts[indices[0] :]
            del self._host_nodes[indices[0] :]
        deadline = time.monotonic() + 15
        for i in indices:
            name = self.config.shard_actor_name(i)
            while (
                _named_actor(name, self.config.namespace) is not None
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            if time.monotonic() >= deadline and _named_actor(name, self.config.namespace):
                log.warning("shard actor name %r is still taken 15s after its kill", name)

    def _admin(self, address: str) -> ShardAdmin:
        a = self._admins.get(address)
        if a is None:
            a = self._admins[address] = ShardAdmin(address, self.config.client)
        return a

    # -- the data root (engram_store/ops/layout.py) ------------------------------------------
    def _release_dir_lock(self) -> None:
        if self._dir_lock is not None:
            self._dir_lock.release()
            self._dir_lock = None

    def _layout_record(self) -> ClusterLayout:
        """What cluster.json is to hold now."""
        return ClusterLayout(
            layout=self._layout,
            name=self.config.name,
            shard_map=self._map,
            placement=dict(self._placement),
            tables=dict(self._tables),
            restored_from=self._restored_from,
        )

    def _save_meta(self) -> None:
        write_layout(self.config.data_root, self._layout_record())

    def record_tables(self, tables: list[dict]) -> None:
        """Remember the specs of tables created through the cluster (layout checks on next up)."""
        with self._lock:
            if self._map is None:
                self._tables.update({t["name"]: t for t in tables})
                return
            self._tables = dict(self._layout_record().with_tables(tables).tables)
            self._save_meta()
