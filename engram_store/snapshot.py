"""Consistent snapshots of a running store, and restoring them onto any number of shards.

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
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from . import wire
from .auth import open_channel, wrap_handler
from .config import ClientConfig, ShardConfig, TableConfig
from .errors import (
    ConfigError,
    EngramError,
    InvalidArgument,
    LayoutMismatch,
    ShardUnavailable,
    error_for_code,
)
from .proto import store_pb2 as pb
from .proto import store_pb2_grpc as pb_grpc
from .routing import DEFAULT_SLOTS, ShardMap
from .storage import Shard, ShardStateInfo

MANIFEST = "manifest.json"
FORMAT = "engram-snapshot/1"
_GATED = frozenset({"PushGradients", "ImportRows", "DeleteRows", "CreateTable", "DropTable"})
_RECENT_S = 30.0  # how long a shard remembers that it applied a push sub-request
_WINDOW_S = 10.0  # default STATUS window: parts of one push arrive well within it
_RECENT_MAX = 1 << 18


def logical_id(request_id: str) -> str:
    """The logical push id of a sub-request id (`<id>/<shard>[.<chunk>]~<parts>`, or
    `<id>/<shard>[.<chunk>]@<map version>` when re-sent after a stale map)."""
    return request_id.split("/", 1)[0]


def half_applied(applied: list[str] | set[str], refused: set[str]) -> set[str]:
    """Logical pushes with some part applied and some part not (yet): a part refused, or fewer
    distinct first-round parts applied than the `~<parts>` count their ids carry. A push re-sent
    after a stale map (`@` ids) is judged by refusals only: its parts were re-routed."""
    parts: dict[str, set[str]] = {}
    for rid in applied:
        parts.setdefault(logical_id(rid), set()).add(rid)
    out = set()
    for lid, subs in parts.items():
        if lid in refused:
            out.add(lid)
            continue
        if any("@" in r for r in subs):
            continue
        counts = {int(r.rsplit("~", 1)[1]) for r in subs
                  if "~" in r and r.rsplit("~", 1)[1].isdigit()}
        if counts and len(subs) < max(counts):
            out.add(lid)
    return out


class SnapshotInProgress(ShardUnavailable):
    """Writes are refused while a snapshot is taken; the client retries them."""


class SnapshotGate(grpc.ServerInterceptor):
    """Refuses writes while frozen (except ALLOWed logical pushes) and remembers, for a while,
    which logical pushes this shard applied and which it refused."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frozen_id = ""  # snapshot id while frozen
        self._deadline = 0.0  # monotonic time the freeze lapses (the lease)
        self._allow: set[str] = set()
        self._rejected: set[str] = set()
        self._inflight = 0
        self._recent: dict[str, float] = {}  # request id -> monotonic time applied (in order)

    # ---- state ----

    def _lapse_locked(self) -> None:
        if self._frozen_id and time.monotonic() > self._deadline:
            self._frozen_id, self._allow, self._rejected = "", set(), set()

    @property
    def frozen(self) -> bool:
        with self._cond:
            self._lapse_locked()
            return bool(self._frozen_id)

    def _check(self, snapshot_id: str) -> None:
        self._lapse_locked()
        if not self._frozen_id:
            raise error_for_code("FAILED_PRECONDITION", "no snapshot is in progress on this "
                                 "shard (it thawed, or its lease ran out); start again with FREEZE")
        if snapshot_id != self._frozen_id:
            raise error_for_code("FAILED_PRECONDITION", f"snapshot {self._frozen_id!r} is in "
                                 f"progress, not {snapshot_id!r}; wait for it to finish")

    def freeze(self, snapshot_id: str, lease_s: float) -> None:
        """Refuse writes from now on; return once no write is in flight."""
        if not snapshot_id:
            raise InvalidArgument("FREEZE needs a snapshot_id (any unique string)")
        if not 0 < lease_s <= 3600:
            raise InvalidArgument(f"lease_s={lease_s} must be in (0, 3600]")
        with self._cond:
            self._lapse_locked()
            if self._frozen_id and self._frozen_id != snapshot_id:
                raise error_for_code("FAILED_PRECONDITION", f"snapshot {self._frozen_id!r} is "
                                     "already in progress; wait for it to finish")
            self._frozen_id, self._deadline = snapshot_id, time.monotonic() + lease_s
            self._allow, self._rejected = set(), set()
            if not self._cond.wait_for(lambda: self._inflight == 0, timeout=lease_s):
                self._frozen_id = ""
                raise ShardUnavailable("writes in flight did not finish within the lease; retry")

    def allow(self, snapshot_id: str, ids: list[str]) -> None:
        with self._cond:
            self._check(snapshot_id)
            self._allow.update(ids)

    def status(self, snapshot_id: str, window_s: float) -> tuple[list[str], list[str]]:
        """(request ids applied here within window_s, logical ids refused since FREEZE and not
        applied since)."""
        with self._cond:
            self._check(snapshot_id)
            since = time.monotonic() - min(max(window_s, 0.0), _RECENT_S)
            applied = [r for r, t in self._recent.items() if t >= since]
            return applied, sorted(self._rejected)

    def copy_check(self, snapshot_id: str) -> None:
        """Close the door to ALLOWed pushes too and wait for those still running."""
        with self._cond:
            self._check(snapshot_id)
            self._allow = set()
            if not self._cond.wait_for(lambda: self._inflight == 0, timeout=60):
                raise ShardUnavailable("pushes admitted during the snapshot did not finish "
                                       "within 60 s; retry the snapshot")

    def thaw(self, snapshot_id: str) -> None:
        with self._cond:
            if self._frozen_id == snapshot_id or not snapshot_id:
                self._frozen_id, self._allow, self._rejected = "", set(), set()

    # ---- the interceptor ----

    def _enter(self, method: str, request: object) -> None:
        with self._cond:
            self._lapse_locked()
            if self._frozen_id:
                rid = getattr(request, "request_id", "")
                lid = logical_id(rid) if isinstance(rid, str) and rid else ""
                if not (method == "PushGradients" and lid and lid in self._allow):
                    if lid:
                        self._rejected.add(lid)
                    raise SnapshotInProgress(
                        "snapshot in progress: writes are paused for a moment; retry (the "
                        "client does so with backoff)")
            self._inflight += 1

    def _exit(self, request: object, applied: bool) -> None:
        with self._cond:
            self._inflight -= 1
            rid = getattr(request, "request_id", "")
            if applied and isinstance(rid, str) and rid:
                now = time.monotonic()
                self._recent.pop(rid, None)
                self._recent[rid] = now
                self._rejected.discard(logical_id(rid))
                # prune the oldest (dicts keep insertion order, and we re-insert on update)
                while self._recent:
                    k, t = next(iter(self._recent.items()))
                    if now - t < _RECENT_S and len(self._recent) <= _RECENT_MAX:
                        break
                    del self._recent[k]
            self._cond.notify_all()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        name = method.rsplit("/", 1)[-1]
        if handler is None or not method.startswith("/engram.v1.MemoryStore/") \
                or name not in _GATED:
            return handler

        def wrap(behaviour):
            def gated(request, context):
                try:
                    self._enter(name, None if handler.request_streaming else request)
                except EngramError as e:
                    context.abort(grpc.StatusCode[e.code], str(e))
                applied = False
                try:
                    resp = behaviour(request, context)
                    applied = context.code() in (None, grpc.StatusCode.OK)
                    return resp
                finally:
                    self._exit(request, applied)
            return gated

        return wrap_handler(handler, wrap)


def _parse_request(buf: bytes) -> pb.SnapshotRequest | InvalidArgument:
    """A SnapshotRequest, or the error to answer for bytes that do not parse (grpc's own
    deserializer failure would end the call with INTERNAL)."""
    try:
        return pb.SnapshotRequest.FromString(buf)
    except (DecodeError, ValueError, RuntimeError) as e:
        return InvalidArgument(f"request is not a valid engram.v1.SnapshotRequest ({e})")


class SnapshotServicer:
    """engram.v1.StoreAdmin: the shard's side of the snapshot protocol."""

    def __init__(self, shard: Shard, gate: SnapshotGate) -> None:
        self.shard = shard
        self.gate = gate

    def add_to_server(self, server: grpc.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.Snapshot, request_deserializer=_parse_request,
            response_serializer=pb.SnapshotResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "engram.v1.StoreAdmin", {"Snapshot": handler}),))

    def Snapshot(self, request: pb.SnapshotRequest, context) -> pb.SnapshotResponse:
        try:
            if isinstance(request, InvalidArgument):
                raise request
            return self._snapshot(request)
        except EngramError as e:
            context.abort(grpc.StatusCode[e.code], str(e))

    def _snapshot(self, r: pb.SnapshotRequest) -> pb.SnapshotResponse:
        g, sid = self.gate, r.snapshot_id
        if r.phase == pb.SNAPSHOT_FREEZE:
            g.freeze(sid, r.lease_s or 60.0)
        elif r.phase == pb.SNAPSHOT_ALLOW:
            g.allow(sid, list(r.allow))
        elif r.phase == pb.SNAPSHOT_STATUS:
            applied, rejected = g.status(sid, r.window_s or _WINDOW_S)
            return pb.SnapshotResponse(applied=applied, rejected=rejected, frozen=g.frozen)
        elif r.phase == pb.SNAPSHOT_COPY:
            return self._copy(sid, r.path)
        elif r.phase == pb.SNAPSHOT_THAW:
            g.thaw(sid)
        else:
            raise InvalidArgument(f"snapshot phase {r.phase} is unknown; use FREEZE, ALLOW, "
                                  "STATUS, COPY or THAW")
        return pb.SnapshotResponse(frozen=g.frozen)

    def _copy(self, sid: str, path: str) -> pb.SnapshotResponse:
        if not path or not os.path.isabs(path) or "\0" in path:
            raise InvalidArgument(f"COPY path {path!r} must be an absolute directory path")
        self.gate.copy_check(sid)
        parent = os.path.dirname(os.path.normpath(path))
        if not os.path.isdir(parent):
            raise InvalidArgument(f"COPY path {path}: directory {parent} does not exist on the "
                                  "shard's machine; create it (a shared filesystem for shards on "
                                  "several machines)")
        try:
            os.mkdir(path)
        except FileExistsError:
            raise error_for_code("ALREADY_EXISTS", f"{path} exists; snapshot into a new "
                                 "directory") from None
        except OSError as e:
            raise InvalidArgument(f"cannot create {path}: {e}") from None
        try:
            tables = self.shard.snapshot(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        nbytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        return pb.SnapshotResponse(tables=[wire.info_to_pb(t) for t in tables],
                                   shard=wire.state_to_pb(self.shard.shard_state()),
                                   bytes=nbytes, frozen=True)


# ---- coordinator ----

def _addresses(target) -> tuple[ShardMap, ClientConfig]:
    """The shard map and client config of a StoreClient, a ShardMap, or an address (list)."""
    from .client import StoreClient

    if isinstance(target, StoreClient):
        return target.refresh_map(), target.config
    if isinstance(target, ShardMap):
        return target, ClientConfig()
    with StoreClient(target, ClientConfig(retries=2)) as c:
        return c.shard_map, c.config


def snapshot(target, directory: str, config: ClientConfig | None = None, lease_s: float = 60.0,
             settle_s: float = 0.2, timeout_s: float = 30.0) -> str:
    """Take a consistent snapshot of every shard of the store into `directory` (created; must
    not exist) and return the path of its manifest.json.

    `target`: a StoreClient (its shard map and credentials are used), a ShardMap, or any shard's
    "host:port" (the others are found from its published map). Pushes are refused (and retried by
    their clients) from the freeze until the copies are done; a push is wholly in the snapshot or
    wholly out. Raises ShardUnavailable when a shard cannot be reached or a half-applied push did
    not complete within timeout_s; every shard is thawed either way.
    """
    m, cfg = _addresses(target)
    cfg = config or cfg
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
            return stubs[i].Snapshot(pb.SnapshotRequest(snapshot_id=sid, **fields),
                                     timeout=timeout)
        except grpc.RpcError as e:
            err = error_for_code(e.code().name, f"shard {m.addresses[i]}: {e.details()}")
            raise err from None

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
            status = each(phase=pb.SNAPSHOT_STATUS, window_s=_WINDOW_S)
            pending = half_applied({x for r in status for x in r.applied},
                                   {x for r in status for x in r.rejected})
            if not pending:
                break
            if not pending <= allowed:
                allowed |= pending
                each(phase=pb.SNAPSHOT_ALLOW, allow=sorted(allowed))
            if time.monotonic() > deadline:
                raise ShardUnavailable(
                    f"{len(pending)} half-applied push(es) did not complete within {timeout_s}s "
                    f"(e.g. {sorted(pending)[0]}); is a client stuck? Retry the snapshot")
            time.sleep(0.02)
        copies = list(pool.map(
            lambda i: call(i, timeout=max(cfg.timeout_s, lease_s), phase=pb.SNAPSHOT_COPY,
                           path=os.path.join(directory, f"shard-{i}")), range(len(stubs))))
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
    shards = []
    for i, r in enumerate(copies):
        for t in r.tables:
            tables.setdefault(t.spec.name, wire.spec_from_pb(t.spec).to_dict())
        shards.append({
            "index": i, "address": m.addresses[i], "dir": f"shard-{i}", "bytes": r.bytes,
            "standalone": not r.shard.owned, "map_version": r.shard.map_version,
            "tables": {t.spec.name: {"step": t.step, "pushes": t.pushes,
                                     "stored_rows": t.stored_rows} for t in r.tables}})
    manifest = {
        "format": FORMAT, "snapshot_id": sid, "created": t0,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "writes_paused_s": round(copied_at - frozen_at, 3), "half_applied_completed": len(allowed),
        "shard_map": json.loads(m.to_json()), "num_shards": m.num_shards, "tables": tables,
        "steps": {name: max(s["tables"].get(name, {}).get("step", 0) for s in shards)
                  for name in tables},
        "shards": shards}
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
        raise LayoutMismatch(f"{path} is missing or unreadable ({e}); give a directory written "
                             "by `engram snapshot`") from None
    if m.get("format") != FORMAT:
        raise LayoutMismatch(f"{path} has format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def open_snapshot_shard(directory: str, index: int) -> Shard:
    """Shard `index` of a snapshot directory, opened read-only (close it when done)."""
    return Shard(ShardConfig(data_dir=os.path.join(directory, f"shard-{index}"), read_only=True,
                             cache_rows=0, workers=1))


def _owned_mask(state: ShardStateInfo, num_slots: int) -> np.ndarray:
    """Slots whose rows this shard is authoritative for (all, for a standalone shard)."""
    if state.owned:
        return np.frombuffer(state.owned, np.uint8).astype(bool)
    return np.ones(max(num_slots, 1), bool)


def restore(source: str, data_root: str, shards: int | None = None,
            addresses: list[str] | None = None, num_slots: int | None = None,
            batch_rows: int = 65536, map_size: int | None = None) -> dict:
    """Restore a snapshot offline into `<data_root>/shard-<j>` for `shards` shards (default: as
    many as the snapshot had), re-routing every row with a new balanced ShardMap.

    One shard: a standalone data directory (`engram serve --data <data_root>/shard-0`). Several:
    a cluster layout (`cluster.json`), reopened with `engram cluster up --data <data_root>
    --shards M --slots S`, or served one by one with `engram serve` at `addresses` (the map the
    shards publish then names them). Returns a summary (rows per shard, table steps).
    """
    manifest = load_manifest(source)
    n_src = manifest["num_shards"]
    old_map = ShardMap.from_json(json.dumps(manifest["shard_map"]))
    m_new = shards or n_src
    if m_new < 1:
        raise ConfigError(f"--shards {m_new}: restore onto at least 1 shard")
    if addresses is not None and len(addresses) != m_new:
        raise ConfigError(f"{len(addresses)} addresses for {m_new} shards; give one per shard")
    slots = num_slots or (old_map.num_slots if old_map.num_slots > 1 else DEFAULT_SLOTS)
    layout = uuid.uuid4().hex
    new_map = ShardMap.balanced(addresses or [f"restored-shard-{j}" for j in range(m_new)],
                                slots, version=1, layout=layout)
    if os.path.exists(data_root) and os.listdir(data_root):
        raise ConfigError(f"{data_root} is not empty; restore into a new or empty directory")
    specs = [TableConfig.from_dict(d) for d in manifest["tables"].values()]
    steps = manifest.get("steps", {})
    template = ShardConfig(data_dir="-")
    dests = [Shard(dataclasses.replace(template, data_dir=os.path.join(data_root, f"shard-{j}"),
                                       cache_rows=0, map_size=map_size or template.map_size))
             for j in range(m_new)]
    rows_per_shard = [0] * m_new
    try:
        for spec in specs:
            for d in dests:
                d.create_table(spec)
            for i in range(n_src):
                with open_snapshot_shard(source, i) as src:
                    if spec.name not in {t.name for t in src.tables()}:
                        continue
                    mask = _owned_mask(src.shard_state(), old_map.num_slots)
                    for ids, rec, _ in src.export_rows(spec.name, mask, batch_rows):
                        owner = new_map.shard_of(spec.name, ids)
                        for j in np.unique(owner):
                            sel = owner == j
                            rows_per_shard[j] += dests[j].import_rows(
                                spec.name, ids[sel], np.ascontiguousarray(rec[sel]), 0)
            step = int(steps.get(spec.name, 0))
            for d in dests:  # every shard continues from the table's step (Adam bias correction)
                d.import_rows(spec.name, np.empty(0, np.int64),
                              np.empty((0, d.record_bytes(spec.name)), np.uint8), step)
        if m_new > 1 or addresses:
            for j, d in enumerate(dests):
                d.set_shard_state(ShardStateInfo(
                    shard_index=j, map_version=new_map.version, num_slots=slots,
                    owned=new_map.owned_mask(j), layout=layout,
                    shard_map_json=new_map.to_json() if addresses else ""))
    finally:
        for d in dests:
            d.close()
    cluster_meta = {"layout": layout, "name": "engram", "num_slots": slots, "num_shards": m_new,
                    "shard_map": new_map.to_json(), "placement": {},
                    "tables": {s.name: s.to_dict() for s in specs}, "updated": time.time(),
                    "restored_from": os.path.abspath(source)}
    with open(os.path.join(data_root, "cluster.json"), "w") as f:
        json.dump(cluster_meta, f, indent=1)
    return {"data_root": os.path.abspath(data_root), "shards": m_new, "num_slots": slots,
            "layout": layout, "rows_per_shard": rows_per_shard, "steps": steps,
            "tables": [s.name for s in specs], "from_snapshot": manifest["snapshot_id"]}
