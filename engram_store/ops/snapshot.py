"""Consistent snapshots of a running store, the coordinator's side.

Restoring one onto any number of shards is engram_store/ops/restore.py.

    manifest = snapshot("127.0.0.1:7000", "/backups/s1")       # every shard, one push-stream point
    restore("/backups/s1", "/data/restored", shards=4)          # offline, re-routed to 4 shards

Snapshot protocol (coordinator `snapshot()`, shard side `SnapshotGate` + `SnapshotServicer`):
1. FREEZE every shard: it refuses writes (pushes, imports, deletes, creates, drops) with UNAVAILABLE
   "snapshot in progress" (the client retries with backoff) and waits for writes in flight.
2. A push spans shards (one sub-request per shard, ids `<logical id>/<shard>[.<chunk>]~<parts>`),
   so one part may have been applied just before its shard froze while another was refused or is
   still on its way. The coordinator asks every shard which sub-requests it applied in the last
   seconds and which logical pushes it refused; a push with some part applied and not all of its
   `<parts>` applied (or a part refused) is half applied: it ALLOWs those pushes through and waits
   until all their parts are applied. Each push is then wholly in the snapshot or wholly out.
3. COPY: each shard copies its LMDB environment (compacted) into `<dir>/shard-<i>`.
4. THAW every shard (also on failure; a shard thaws by itself when the lease runs out, so a dead
   coordinator cannot stop training for longer than `lease_s`).
The manifest (`manifest.json`) records the shard map, table specs, per-shard table steps and time.

The directory is written by the shard servers, so `<dir>` must be a path they can write (the same
machine, or a shared filesystem); the manifest is written by the coordinator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from engram_store.engine.config import ShardConfig
from engram_store.engine.errors import ConfigError, LayoutMismatch, ShardUnavailable
from engram_store.engine.routing import ShardMap
from engram_store.engine.shard import Shard, ShardStateInfo
from engram_store.rpc import wire
from engram_store.rpc.admin import WINDOW_S, half_applied
from engram_store.rpc.auth import open_channel
from engram_store.rpc.config import ClientConfig
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.proto import store_pb2_grpc as pb_grpc
from engram_store.rpc.status import error_from_rpc

MANIFEST = "manifest.json"
FORMAT = "engram-snapshot/1"


# ---- coordinator ----


def _addresses(target, config: ClientConfig | None) -> tuple[ShardMap, ClientConfig]:
    """The shard map and client config of a StoreClient, a ShardMap, or an address (list);
    `config` (its token and TLS) is used to ask an address for the map."""
    from engram_store.rpc.client import StoreClient

    if isinstance(target, StoreClient):
        return target.refresh_map(), config or target.config
    if isinstance(target, ShardMap):
        return target, config or ClientConfig()
    cfg = config or ClientConfig()
    with StoreClient(target, dataclasses.replace(cfg, retries=2)) as c:
        return c.shard_map, cfg


def snapshot(
    target,
    directory: str,
    config: ClientConfig | None = None,
    lease_s: float = 60.0,
    settle_s: float = 0.2,
    timeout_s: float = 30.0,
) -> str:
    """Take a consistent snapshot of every shard of the store into `directory` (created; must
    not exist) and return the path of its manifest.json.

    `target`: a StoreClient (its shard map and credentials are used), a ShardMap, or any shard's
    "host:port" (the others are found from its published map). Pushes are refused (and retried by
    their clients) from the freeze until the copies are done; a push is wholly in the snapshot or
    wholly out. Raises ShardUnavailable when a shard cannot be reached or a half-applied push did
    not complete within timeout_s; every shard is thawed either way.
    """
    m, cfg = _addresses(target, config)
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise ConfigError(f"{directory} exists; snapshot into a new directory")
    os.makedirs(directory)
    sid = uuid.uuid4().hex
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes)]
    channels = [open_channel(a, cfg, opts) for a in m.addresses]
    stubs = [pb_grpc.StoreAdminStub(c) for c in channels]
    pool = ThreadPoolExecutor(max_workers=max(1, len(stubs)))
    t0 = time.time()

    def call(i: int, timeout: float = cfg.timeout_s, **fields) -> pb.SnapshotResponse:
        try:
            return stubs[i].Snapshot(pb.SnapshotRequest(snapshot_id=sid, **fields), timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"shard {m.addresses[i]}") from None

    def each(**fields) -> list[pb.SnapshotResponse]:
        return list(pool.map(lambda i: call(i, **fields), range(len(stubs))))

    try:
        each(phase=pb.SNAPSHOT_FREEZE, lease_s=lease_s, timeout=lease_s)
        frozen_at = time.time()
        allowed: set[str] = set()
        deadline = time.monotonic() + timeout_s
        time.sleep(settle_s)  # let parts sent with an applied one arrive (and be refused)
        while True:
            # half-applied pushes (some part applied, some not): let them in and wait for them
            status = each(phase=pb.SNAPSHOT_STATUS, window_s=WINDOW_S)
            pending = half_applied(
                {x for r in status for x in r.applied}, {x for r in status for x in r.rejected}
            )
            if not pending:
                break
            if not pending <= allowed:
                allowed |= pending
                each(phase=pb.SNAPSHOT_ALLOW, allow=sorted(allowed))
            if time.monotonic() > deadline:
                raise ShardUnavailable(
                    f"{len(pending)} half-applied push(es) did not complete within {timeout_s}s "
                    f"(e.g. {sorted(pending)[0]}); is a client stuck? Retry the snapshot"
                )
            time.sleep(0.02)
        copies = list(
            pool.map(
                lambda i: call(
                    i,
                    timeout=max(cfg.timeout_s, lease_s),
                    phase=pb.SNAPSHOT_COPY,
                    path=os.path.join(directory, f"shard-{i}"),
                ),
                range(len(stubs)),
            )
        )
        copied_at = time.time()
    except BaseException:
        _thaw(stubs, sid)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=False)
    _thaw(stubs, sid)
    for c in channels:
        c.close()
    tables: dict[str, dict] = {}
    shards: list[dict] = []
    for i, r in enumerate(copies):
        for t in r.tables:
            tables.setdefault(t.spec.name, wire.spec_from_pb(t.spec).to_dict())
        shards.append(
            {
                "index": i,
                "address": m.addresses[i],
                "dir": f"shard-{i}",
                "bytes": r.bytes,
                "standalone": not r.shard.owned,
                "map_version": r.shard.map_version,
                "tables": {
                    t.spec.name: {"step": t.step, "pushes": t.pushes, "stored_rows": t.stored_rows}
                    for t in r.tables
                },
            }
        )
    manifest = {
        "format": FORMAT,
        "snapshot_id": sid,
        "created": t0,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "writes_paused_s": round(copied_at - frozen_at, 3),
        "half_applied_completed": len(allowed),
        "shard_map": json.loads(m.to_json()),
        "num_shards": m.num_shards,
        "tables": tables,
        "steps": {
            name: max(s["tables"].get(name, {}).get("step", 0) for s in shards) for name in tables
        },
        "shards": shards,
    }
    path = os.path.join(directory, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def _thaw(stubs, sid: str) -> None:
    for s in stubs:
        try:
            s.Snapshot(pb.SnapshotRequest(phase=pb.SNAPSHOT_THAW, snapshot_id=sid), timeout=10)
        except grpc.RpcError:
            pass  # that shard thaws by itself when the lease runs out


def load_manifest(directory: str) -> dict:
    """The manifest of a snapshot directory (LayoutMismatch if it is not one)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise LayoutMismatch(
            f"{path} is missing or unreadable ({e}); give a directory written by `engram snapshot`"
        ) from None
    if m.get("format") != FORMAT:
        raise LayoutMismatch(f"{path} has format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def open_snapshot_shard(directory: str, index: int) -> Shard:
    """Shard `index` of a snapshot directory, opened read-only (close it when done)."""
    return Shard(
        ShardConfig(
            data_dir=os.path.join(directory, f"shard-{index}"),
            read_only=True,
        )
    )


def owned_mask(state: ShardStateInfo, num_slots: int) -> np.ndarray:
    """Slots whose rows this shard is authoritative for (all, for a standalone shard)."""
    if state.owned:
        return np.frombuffer(state.owned, np.uint8).astype(bool)
    return np.ones(max(num_slots, 1), bool)
