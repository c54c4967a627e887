"""A shard server hosted by a Ray actor on a store node.

`ShardHost` is a plain class: it opens the shard's LMDB directory and serves it over gRPC with
engram_store.rpc.server.create_server. The cluster turns it into an actor with `shard_actor_options`;
when Ray restarts the actor after a crash, the constructor runs again, reopens the same directory
(every committed push is in it) and tells the registry where it listens.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading

from cluster.admin import ShardAdmin
from cluster.config import LOCAL_HOST, ClusterConfig, shard_dir
from engram_store.engine.errors import EngramError, LayoutMismatch

log = logging.getLogger(__name__)


def shard_actor_options(config: ClusterConfig, index: int, node_id: str | None) -> dict:
    """Ray actor options of shard `index`: CPUs and memory from the config, a sliver of the store
    resource so it lands only on store nodes (never a GPU), restarts, and its node.

    Named and detached: a shard outlives a crash of the registry that started it, and the
    restarted registry finds it by name instead of starting another on the same directory.

    Placement is decided by the registry (spread over store nodes) and pinned with a hard node
    affinity, because a restarted actor must come back where its LMDB directory is.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict = {
        "num_cpus": config.cpus_per_shard,
        "num_gpus": 0,
        "resources": {config.store_resource: 0.001},
        "max_restarts": config.max_restarts,
        # A method call that a crash interrupts is retried on the restarted actor.
        "max_task_retries": -1 if config.max_restarts else 0,
        "namespace": config.namespace,
        "name": config.shard_actor_name(index),
        "lifetime": "detached",
    }
    if config.memory_per_shard:
        opts["memory"] = config.memory_per_shard
    if node_id is not None:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    else:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def _port_is_free(host: str, port: int) -> bool:
    """True when `port` can be bound on `host` now (no live server holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class ShardHost:
    """Serves shard `index` of a cluster from `<data_root>/shard-<index>`.

    host: the address to listen on and advertise ("node" = this node's IP). layout: the cluster
    id; a data directory that another layout wrote refuses to serve (LayoutMismatch).
    """

    def __init__(self, config: ClusterConfig, index: int, layout: str, host: str = LOCAL_HOST):
        self.config = config
        self.index = index
        self.layout = layout
        self._host = host
        self._server = None
        self._shard = None
        self._address = ""
        self._metrics = ""  # "host:port" of /metrics while serving with metrics on
        self._error: EngramError | None = None
        self._lock = threading.Lock()
        if _reconstructed():
            # Ray restarted this actor after a crash: serve again at once, then tell the registry.
            try:
                self.start()
            except EngramError as e:  # kept and raised by address(), so the registry sees why
                log.error(
                    "restarted shard %d of cluster %r cannot serve: %s", index, config.name, e
                )
                self._error = e
            else:
                log.warning(
                    "shard %d of cluster %r restarted by Ray, serving %s again",
                    index,
                    config.name,
                    self._address,
                )
                _notify_registry(config, index, self._address)

    # -- the actor's methods ---------------------------------------------------------------
    def start(self) -> str:
        """Open the data directory, serve it, and return "host:port". Idempotent."""
        from engram_store.rpc.server import create_server  # starts serving before it returns

        with self._lock:
            if self._address:
                return self._address
            host = _node_ip() if self._host == "node" else self._host
            data_dir = shard_dir(self.config.data_root, self.index)
            os.makedirs(data_dir, exist_ok=True)
            # Come back on the port we had, so clients holding the old map reach us again.
            port = self._previous_port(host)
            server, port, shard = create_server(self.config.server_config(self.index, host, port))
            self._server, self._shard = server, shard
            self._address = f"{host}:{port}"
            metrics_port = server.extras.metrics_port
            self._metrics = f"{host}:{metrics_port}" if metrics_port is not None else ""
            try:
                self._check_layout()
            except EngramError:
                self._stop_locked()
                raise
            self._remember_port(port)
            return self._address

    def address(self) -> str:
        """The server's "host:port"; raises the error that kept it from starting."""
        if self._error is not None:
            raise self._error
        return self._address or self.start()

    def info(self) -> dict:
        """Where this shard runs: index, address, /metrics address ("" = off), pid, node id and
        IP, data dir."""
        import ray

        return {
            "index": self.index,
            "address": self._address,
            "metrics": self._metrics,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": _node_ip(),
            "data_dir": shard_dir(self.config.data_root, self.index),
            "layout": self.layout,
        }

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        """Stop serving and close the LMDB environment (its data stays on disk)."""
        with self._lock:
            self._stop_locked()

    # -- internals --------------------------------------------------------------------------
    def _stop_locked(self) -> None:
        from engram_store.rpc.server import stop_server

        if self._server is not None:
            stop_server(self._server, self._shard, grace_s=1.0)
            self._server = self._shard = None
        self._address = self._metrics = ""

    def _check_layout(self) -> None:
        with ShardAdmin(self._address, self.config.client, timeout_s=10.0) as admin:
            state = admin.wait_ready().shard
        if state.layout and state.layout != self.layout:
            raise LayoutMismatch(
                f"{shard_dir(self.config.data_root, self.index)} belongs to cluster layout "
                f"{state.layout}, not {self.layout}; give this cluster its own --data directory"
            )

    def _port_file(self) -> str:
        return shard_dir(self.config.data_root, self.index) + ".addr"

    def _previous_port(self, host: str) -> int:
        try:
            with open(self._port_file()) as f:
                port = int(json.load(f)["port"])
        except FileNotFoundError:  # first start: any free port
            return 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "%s is unreadable (%s); shard %d takes a new port", self._port_file(), e, self.index
            )
            return 0
        return port if _port_is_free(host, port) else 0

    def _remember_port(self, port: int) -> None:
        tmp = self._port_file() + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": port, "pid": os.getpid()}, f)
        os.replace(tmp, self._port_file())


def _reconstructed() -> bool:
    """True inside an actor that Ray is restarting after a crash."""
    import warnings

    import ray

    if not ray.is_initialized():  # plain-class use (tests)
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # the driver or a task, not an actor
        return False
    with warnings.catch_warnings():  # Ray warns about an API it uses internally here
        warnings.simplefilter("ignore")
        return bool(context.was_current_actor_reconstructed)


def _node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def _notify_registry(config: ClusterConfig, index: int, address: str) -> None:
    """Tell the registry a restarted shard serves again (fire and forget: it may be busy)."""
    import ray

    try:
        registry = ray.get_actor(config.registry_name, namespace=config.namespace)
        registry.shard_restarted.remote(index, address)
    except ValueError:  # registry gone (cluster going down): nothing to tell
        log.info("shard %d of cluster %r restarted, but its registry is gone", index, config.name)
