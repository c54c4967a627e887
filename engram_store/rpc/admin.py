"""engram.v1.StoreAdmin on a shard server: the shard side of the snapshot protocol.

`SnapshotGate` (an interceptor) freezes writes and remembers which logical pushes it applied or
refused; `SnapshotServicer` answers the coordinator's FREEZE / STATUS / ALLOW / COPY / THAW. The
coordinator and the protocol are described in engram_store/ops/snapshot.py.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from engram_store.engine.errors import (
    EngramError,
    InvalidArgument,
    ShardUnavailable,
    SnapshotConflict,
    SnapshotExists,
    SnapshotInProgress,
)
from engram_store.engine.shard import Shard
from engram_store.rpc import wire
from engram_store.rpc.auth import wrap_handler
from engram_store.rpc.proto import store_pb2 as pb
from engram_store.rpc.status import abort

_GATED = frozenset({"PushGradients", "ImportRows", "DeleteRows", "CreateTable", "DropTable"})
_RECENT_S = 30.0  # how long a shard remembers that it applied a push sub-request
WINDOW_S = 10.0  # default STATUS window: parts of one push arrive well within it
_RECENT_MAX = 1 << 18
# the suffix StoreClient.push gives each sub-request: /<shard>[.<chunk>]~<parts> on the first
# routing, /<shard>[.<chunk>]@<map version> when re-sent after a stale map
_SUB_REQUEST = re.compile(r"/\d+(?:\.\d+)?(?:~(?P<parts>\d+)|@\d+)\Z")


def logical_id(request_id: str) -> str:
    """The logical push id of a sub-request id: everything before the client's last
    `/<shard>[.<chunk>]~<parts>` (or `@<map version>`) suffix. The logical id may hold `/`
    itself (the trainer's are `<run>/r<rank>/<split>/<step>/<layer>`); an id without that
    suffix (a push sent to one shard directly) is its own logical id."""
    m = _SUB_REQUEST.search(request_id)
    return request_id[: m.start()] if m else request_id


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
        suffixes = [_SUB_REQUEST.search(r) for r in subs]
        if any(m is not None and m["parts"] is None for m in suffixes):
            continue  # re-routed after a stale map
        counts = {int(m["parts"]) for m in suffixes if m is not None}
        if counts and len(subs) < max(counts):
            out.add(lid)
    return out


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
            raise SnapshotConflict(
                "no snapshot is in progress on this shard (it thawed, or its "
                "lease ran out); start again with FREEZE"
            )
        if snapshot_id != self._frozen_id:
            raise SnapshotConflict(
                f"snapshot {self._frozen_id!r} is in progress, not "
                f"{snapshot_id!r}; wait for it to finish"
            )

    def freeze(self, snapshot_id: str, lease_s: float) -> None:
        """Refuse writes from now on; return once no write is in flight."""
        if not snapshot_id:
            raise InvalidArgument("FREEZE needs a snapshot_id (any unique string)")
        if not 0 < lease_s <= 3600:
            raise InvalidArgument(f"lease_s={lease_s} must be in (0, 3600]")
        with self._cond:
            self._lapse_locked()
            if self._frozen_id and self._frozen_id != snapshot_id:
                raise SnapshotConflict(
                    f"snapshot {self._frozen_id!r} is already in progress; wait for it to finish"
                )
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
                raise ShardUnavailable(
                    "pushes admitted during the snapshot did not finish "
                    "within 60 s; retry the snapshot"
                )

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
                        "client does so with backoff)"
                    )
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
        if (
            handler is None
            or not method.startswith("/engram.v1.MemoryStore/")
            or name not in _GATED
        ):
            return handler

        def wrap(behaviour):
            if handler.request_streaming:
                return streamed(behaviour)

            def gated(request, context):
                try:
                    self._enter(name, request)
                except EngramError as e:
                    abort(context, e)
                applied = False
                try:
                    resp = behaviour(request, context)
                    applied = context.code() in (None, grpc.StatusCode.OK)
                    return resp
                finally:
                    self._exit(request, applied)

            return gated

        def streamed(behaviour):
            """A write that arrives as a stream (ImportRows) is admitted when its last message
            has arrived: the servicer stages the stream and stores it only after that, so a slow
            or idle stream is not a write in flight and never holds up a freeze. Frozen then:
            refused (SnapshotInProgress, from the servicer's loop), nothing stored."""

            def gated(requests, context):
                entered = []

                def admitted():
                    yield from requests
                    self._enter(name, None)
                    entered.append(True)

                applied = False
                try:
                    resp = behaviour(admitted(), context)
                    applied = context.code() in (None, grpc.StatusCode.OK)
                    return resp
                finally:
                    if entered:
                        self._exit(None, applied)

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
            self.Snapshot,
            request_deserializer=_parse_request,
            response_serializer=pb.SnapshotResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("engram.v1.StoreAdmin", {"Snapshot": handler}),)
        )

    def Snapshot(self, request: pb.SnapshotRequest, context) -> pb.SnapshotResponse:
        try:
            if isinstance(request, InvalidArgument):
                raise request
            return self._snapshot(request)
        except Exception as e:  # every failure becomes a status; the server keeps serving
            abort(context, e)

    def _snapshot(self, r: pb.SnapshotRequest) -> pb.SnapshotResponse:
        g, sid = self.gate, r.snapshot_id
        if r.phase == pb.SNAPSHOT_FREEZE:
            g.freeze(sid, r.lease_s or 60.0)
        elif r.phase == pb.SNAPSHOT_ALLOW:
            g.allow(sid, list(r.allow))
        elif r.phase == pb.SNAPSHOT_STATUS:
            applied, rejected = g.status(sid, r.window_s or WINDOW_S)
            return pb.SnapshotResponse(applied=applied, rejected=rejected, frozen=g.frozen)
        elif r.phase == pb.SNAPSHOT_COPY:
            return self._copy(sid, r.path)
        elif r.phase == pb.SNAPSHOT_THAW:
            g.thaw(sid)
        else:
            raise InvalidArgument(
                f"snapshot phase {r.phase} is unknown; use FREEZE, ALLOW, STATUS, COPY or THAW"
            )
        return pb.SnapshotResponse(frozen=g.frozen)

    def _copy(self, sid: str, path: str) -> pb.SnapshotResponse:
        if not path or not os.path.isabs(path) or "\0" in path:
            raise InvalidArgument(f"COPY path {path!r} must be an absolute directory path")
        self.gate.copy_check(sid)
        parent = os.path.dirname(os.path.normpath(path))
        if not os.path.isdir(parent):
            raise InvalidArgument(
                f"COPY path {path}: directory {parent} does not exist on the "
                "shard's machine; create it (a shared filesystem for shards on "
                "several machines)"
            )
        try:
            os.mkdir(path)
        except FileExistsError:
            raise SnapshotExists(f"{path} exists; snapshot into a new directory") from None
        except OSError as e:
            raise InvalidArgument(f"cannot create {path}: {e}") from None
        try:
            tables = self.shard.snapshot(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        nbytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        return pb.SnapshotResponse(
            tables=[wire.info_to_pb(t) for t in tables],
            shard=wire.state_to_pb(self.shard.shard_state()),
            bytes=nbytes,
            frozen=True,
        )
