"""One small Ray for the cluster tests: a trainer node (no store resource) and a store node, both on
this machine (ray.cluster_utils.Cluster), started once for this package and shut down after it
(other packages' tests start Ray their own way)."""

from __future__ import annotations

import pathlib
import threading
import time
import uuid

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.config import ClusterConfig  # noqa: E402
from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig  # noqa: E402
from engram_store.rpc.config import ClientConfig, ServerConfig  # noqa: E402

STORE = "engram_store_test"  # the store resource of these tests
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def ray_cluster():
    """(cluster_utils.Cluster, store node id, trainer node id); this process is connected."""
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )  # trainer node
    store = c.add_node(num_cpus=4, resources={STORE: 100})
    ray.init(
        address=c.address,
        namespace="engram-test",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )  # actors import this checkout
    yield c, store.node_id, c.head_node.node_id
    ray.shutdown()
    c.shutdown()


def cluster_config(root, num_shards: int = 2, **kw) -> ClusterConfig:
    """A small cluster under `root` with a unique name (tests share one Ray)."""
    kw.setdefault("name", "t-" + uuid.uuid4().hex[:8])
    kw.setdefault("num_slots", 64)
    return ClusterConfig(
        num_shards=num_shards,
        data_root=str(root),
        store_resource=STORE,
        cpus_per_shard=0.25,
        namespace="engram-test",
        server=ServerConfig(
            ShardConfig(data_dir="-", memory_bytes=64 << 20, map_size=1 << 28), workers=4
        ),
        client=ClientConfig(timeout_s=20, retries=14, backoff_s=0.02, backoff_max_s=1.0, threads=4),
        ready_timeout_s=60,
        reshard_group_slots=8,
        **kw,
    )


def table_spec(name: str = "emb", num_rows: int = 20_000, dim: int = 8) -> TableConfig:
    return TableConfig(
        name=name, num_rows=num_rows, dim=dim, optimizer=OptimizerConfig(kind="adam", lr=0.01)
    )


def push_batch(k: int, num_rows: int, dim: int, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Push number k (deterministic): n distinct ids and their gradients."""
    rng = np.random.default_rng(k)
    ids = rng.choice(num_rows, size=n, replace=False).astype(np.int64)
    return ids, rng.standard_normal((n, dim)).astype(np.float32)


class Pusher(threading.Thread):
    """Pushes batches 1, 2, ... in order through a client, each with a fixed request id and step;
    a push that fails is retried as the same request until it is acknowledged, so the
    acknowledged pushes are exactly 1..acked in order."""

    def __init__(
        self, client, spec: TableConfig, max_pushes: int = 5000, max_seconds: float = 120.0
    ):
        super().__init__(daemon=True)
        self.client, self.spec = client, spec
        self.max_pushes, self.max_seconds = max_pushes, max_seconds
        self.acked = 0
        self.failures: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        k = 1
        while k <= self.max_pushes and not self.stop_event.is_set() and time.monotonic() < deadline:
            ids, grads = push_batch(k, self.spec.num_rows, self.spec.dim)
            try:
                self.client.push(self.spec.name, ids, grads, step=k, request_id=f"push-{k}")
            except Exception as e:  # counted; the same push is sent again
                self.failures.append(f"{k}: {type(e).__name__}: {e}")
                if len(self.failures) > 50:
                    return
                time.sleep(0.2)
                continue
            self.acked = k
            k += 1

    def wait_for(self, count: int, timeout_s: float) -> bool:
        """True once `count` pushes are acknowledged (False after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while self.acked < count and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.02)
        return self.acked >= count

    def stop(self) -> int:
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "pusher did not stop"
        return self.acked


def reference_table(tmp_path, spec: TableConfig, pushes: int):
    """A plain one-shard Shard fed pushes 1..pushes; returns (touched ids, their rows)."""
    from engram_store.engine.shard import Shard

    with Shard(
        ShardConfig(data_dir=str(tmp_path / f"ref-{uuid.uuid4().hex[:6]}"), map_size=1 << 28)
    ) as ref:
        ref.create_table(spec)
        touched = set()
        for k in range(1, pushes + 1):
            ids, grads = push_batch(k, spec.num_rows, spec.dim)
            ref.push(spec.name, ids, grads, request_id=f"push-{k}", step=k)
            touched.update(ids.tolist())
        ids = np.array(sorted(touched), dtype=np.int64)
        return ids, ref.lookup(spec.name, ids).copy()
