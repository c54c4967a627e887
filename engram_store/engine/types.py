"""The values a shard hands out (table stats, push results, shard state): plain dataclasses that
the client and the operations tools import without loading lmdb."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from engram_store.engine.config import TableConfig


@dataclass(frozen=True)
class ShardStateInfo:
    """Which hash slots this shard owns and which are frozen (proto ShardState).

    `owned` / `frozen`: num_slots bytes, 1 = owned / being moved. Empty `owned`: every slot is owned
    (a standalone shard); empty `frozen`: nothing frozen.
    """

    shard_index: int = 0
    map_version: int = 0
    num_slots: int = 0
    owned: bytes = b""
    frozen: bytes = b""
    layout: str = ""
    shard_map_json: str = ""

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["owned"] = base64.b64encode(self.owned).decode()
        d["frozen"] = base64.b64encode(self.frozen).decode()
        return json.dumps(d)

    @classmethod
    def from_json(cls, s: str | bytes) -> ShardStateInfo:
        d = json.loads(s)
        d["owned"] = base64.b64decode(d["owned"])
        d["frozen"] = base64.b64decode(d["frozen"])
        return cls(**d)


@dataclass(frozen=True)
class TableStats:
    """A table as this shard holds it (proto TableInfo)."""

    spec: TableConfig
    stored_rows: int = 0  # rows pushed (or imported) at least once
    stored_bytes: int = 0  # their records
    step: int = 0  # highest optimizer step applied
    pushes: int = 0  # push requests applied


@dataclass(frozen=True)
class PushResult:
    rows_updated: int  # distinct rows changed
    duplicate: bool  # the request id was applied before; nothing changed now
    step: int  # the step the update was applied as
