"""The cluster layout file `<data_root>/cluster.json` and the data-root lock `cluster.lock`.

One home for both: the cluster registry (cluster/registry.py) writes the layout after every map
change and holds the lock while the cluster is up; `engram restore` (ops/restore.py) writes
a fresh layout for the shards it restores, under the same lock. It lives in the ops layer, below
the cluster, so both import it and neither needs Ray.

cluster.json (JSON object, written atomically: tmp file, fsync, rename):

    layout         the cluster id (hex); every shard directory of the cluster carries it
    name           the cluster name that wrote it ("engram" for a restore)
    num_slots      hash slots of the layout (fixed for its life)
    num_shards     shards in shard_map
    shard_map      routing.ShardMap.to_json() of the last published map (a JSON string)
    placement      {"<shard index>": "<store node IP>"}: where each shard's directory lives
    tables         {name: TableConfig.to_dict()} of every table created through the cluster
    updated        time.time() of the write
    restored_from  (only after a restore) the snapshot directory the shards came from
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from engram_store.engine.errors import ConfigError, DataDirLocked, LayoutMismatch
from engram_store.engine.routing import ShardMap

log = logging.getLogger(__name__)

LAYOUT_FILE = "cluster.json"
LOCK_FILE = "cluster.lock"


def layout_path(data_root: str) -> str:
    """Path of the layout file of `data_root`."""
    return os.path.join(data_root, LAYOUT_FILE)


def _as_json(value):
    """`value` as a JSON round trip gives it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class ClusterLayout:
    """What cluster.json records (see the module docstring for the file's fields)."""

    layout: str
    name: str
    shard_map: ShardMap
    placement: Mapping[int, str] = field(default_factory=dict)  # shard index -> node IP
    tables: Mapping[str, dict] = field(default_factory=dict)  # name -> TableConfig dict (JSON)
    updated: float = 0.0
    restored_from: str = ""

    def __post_init__(self) -> None:
        # Specs as the file holds them (tuples become lists), so comparisons with a read-back
        # layout hold; placement keys as ints.
        object.__setattr__(self, "tables", _as_json(dict(self.tables)))
        object.__setattr__(self, "placement", {int(k): v for k, v in self.placement.items()})

    @property
    def num_slots(self) -> int:
        return self.shard_map.num_slots

    @property
    def num_shards(self) -> int:
        return self.shard_map.num_shards

    def with_tables(self, tables: Iterable[dict]) -> ClusterLayout:
        """This layout that also records `tables` (TableConfig dicts; a name replaces its old spec)."""
        merged = dict(self.tables)
        merged.update({t["name"]: t for t in tables})
        return replace(self, tables=merged)

    def to_dict(self) -> dict:
        """The JSON object cluster.json holds."""
        d = {
            "layout": self.layout,
            "name": self.name,
            "num_slots": self.num_slots,
            "num_shards": self.num_shards,
            "shard_map": self.shard_map.to_json(),
            "placement": {
                str(k): v for k, v in sorted(self.placement.items()) if k < self.num_shards
            },
            "tables": dict(self.tables),
            "updated": self.updated,
        }
        if self.restored_from:
            d["restored_from"] = self.restored_from
        return d

    @classmethod
    def from_dict(cls, d: object, path: str = LAYOUT_FILE) -> ClusterLayout:
        """The layout a cluster.json object describes; LayoutMismatch naming `path` (and what is
        wrong) when a field is missing or inconsistent."""

        def damaged(what: str) -> LayoutMismatch:
            return LayoutMismatch(
                f"{path} is damaged ({what}); restore it (or the whole data root "
                "from a snapshot with `engram ops restore`) or use another "
                "--data directory"
            )

        if not isinstance(d, dict):
            raise damaged(f"a JSON object expected, found {type(d).__name__}")
        for key, kind in (
            ("layout", str),
            ("name", str),
            ("num_slots", int),
            ("num_shards", int),
            ("shard_map", str),
            ("placement", dict),
            ("tables", dict),
            ("updated", (int, float)),
        ):
            if key not in d:
                raise damaged(f"no {key!r} field")
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                raise damaged(f"{key!r} is a {type(d[key]).__name__}")
        if not d["layout"]:
            raise damaged("empty 'layout'")
        try:
            shard_map = ShardMap.from_json(d["shard_map"])
        except ConfigError as e:
            raise damaged(f"'shard_map' does not parse: {e}") from None
        if d["num_slots"] < 1 or shard_map.num_slots != d["num_slots"]:
            raise damaged(f"num_slots {d['num_slots']} but the shard map has {shard_map.num_slots}")
        if shard_map.num_shards < 1 or shard_map.num_shards != d["num_shards"]:
            raise damaged(
                f"num_shards {d['num_shards']} but the shard map has "
                f"{shard_map.num_shards} addresses"
            )
        if len(shard_map.assignment) != shard_map.num_slots or not all(
            isinstance(s, int) and 0 <= s < shard_map.num_shards for s in shard_map.assignment
        ):
            raise damaged(
                f"the shard map does not assign each of its {shard_map.num_slots} "
                f"slots to one of its {shard_map.num_shards} shards"
            )
        if shard_map.layout and shard_map.layout != d["layout"]:
            raise damaged(f"the shard map belongs to layout {shard_map.layout}, not {d['layout']}")
        placement = {}
        for k, v in d["placement"].items():
            if not (isinstance(k, str) and k.isdigit() and isinstance(v, str)):
                raise damaged(f"placement entry {k!r}: {v!r} is not a shard index and a node IP")
            placement[int(k)] = v
        for k, v in d["tables"].items():
            if not (isinstance(v, dict) and v.get("name") == k):
                raise damaged(f"table entry {k!r} is not a table spec of that name")
        restored_from = d.get("restored_from", "")
        if not isinstance(restored_from, str):
            raise damaged(f"'restored_from' is a {type(restored_from).__name__}")
        return cls(
            layout=d["layout"],
            name=d["name"],
            shard_map=shard_map,
            placement=placement,
            tables=dict(d["tables"]),
            updated=float(d["updated"]),
            restored_from=restored_from,
        )

    def check_compatible(
        self, num_slots: int, tables: Iterable[dict], path: str = LAYOUT_FILE
    ) -> None:
        """Raise LayoutMismatch (naming `path`) unless a cluster of `num_slots` slots that is
        about to create `tables` (TableConfig dicts) may reopen this layout: same slot count,
        and each table either new or of the recorded spec."""
        if self.num_slots != num_slots:
            raise LayoutMismatch(
                f"{path}: layout {self.layout} has {self.num_slots} slots, this cluster asks "
                f"for {num_slots}; use --slots {self.num_slots} or another --data directory"
            )
        for t in tables:
            t = _as_json(t)
            old = self.tables.get(t["name"])
            if old is not None and old != t:
                diff = sorted(k for k in set(old) | set(t) if old.get(k) != t.get(k))
                raise LayoutMismatch(
                    f"{path}: table {t['name']!r} was created with another spec (differs in "
                    f"{', '.join(diff)}); keep its spec, pick a new table name, or use another "
                    "--data directory"
                )


def read_layout(data_root: str) -> ClusterLayout | None:
    """The layout recorded in `data_root`, or None when it has no cluster.json. A file that does
    not parse or is inconsistent is a LayoutMismatch naming it; nothing is changed."""
    path = layout_path(data_root)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LayoutMismatch(
            f"{path} is unreadable ({e}); restore it or use another --data directory"
        ) from None
    return ClusterLayout.from_dict(d, path)


def write_layout(data_root: str, layout: ClusterLayout, now: float | None = None) -> None:
    """Replace `data_root`/cluster.json with `layout` (stamped `now`, default the time): a reader
    (or a crash) sees the old file or the new one, never a part."""
    d = replace(layout, updated=time.time() if now is None else now).to_dict()
    path = layout_path(data_root)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(d, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(data_root)


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        log.debug("cannot open %s to fsync the rename of %s: %s", path, LAYOUT_FILE, e)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataRootLock:
    """An exclusive flock on `<data_root>/cluster.lock`, held until release() (or the holder's
    death: the kernel drops it with the process). The file names its holder."""

    def __init__(self, data_root: str, fd: int):
        self.data_root = data_root
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go of the data root (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> DataRootLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_data_root(data_root: str, holder: Mapping[str, object]) -> DataRootLock:
    """Take `data_root`'s lock (creating the directory), recording `holder` (e.g. {"cluster":
    name}) with this pid and host. DataDirLocked, naming the live holder, when another holds it."""
    os.makedirs(data_root, exist_ok=True)
    fd = os.open(os.path.join(data_root, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        text = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        try:
            other = json.loads(text)
        except ValueError:
            other = {}
        if isinstance(other, dict) and "cluster" not in other:
            raise DataDirLocked(
                f"{data_root} is being written by a live process ({text}); wait for it to "
                "finish, or use another directory"
            ) from None
        raise DataDirLocked(
            f"{data_root} is served by a live cluster ({text}); stop it with "
            "`engram cluster down`, or give this cluster another --data directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({**holder, "pid": os.getpid(), "host": socket.gethostname()}).encode())
    return DataRootLock(data_root, fd)
