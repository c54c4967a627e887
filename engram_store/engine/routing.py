"""Row → shard routing by a versioned shard map.

A row id belongs to one of `num_slots` hash slots (fixed for the life of a cluster); the shard map
assigns slots to shards. Resharding moves whole slots, so adding a shard moves ~1/N of the rows and
no row id ever changes. The slot hash is the MurmurHash3 64-bit finaliser (fmix64) of the row id
mixed with an mmh3 hash of the table name, vectorised in numpy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import mmh3
import numpy as np

from engram_store.engine.errors import ConfigError

DEFAULT_SLOTS = 1024

_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, element-wise on a uint64 array (wrap-around arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> _S33
    x *= _C1
    x ^= x >> _S33
    x *= _C2
    x ^= x >> _S33
    return x


def table_salt(table: str) -> np.uint64:
    """A 64-bit salt for a table name, so equal row ids of two tables spread differently."""
    return np.uint64(mmh3.hash64(table.encode(), seed=0x5EED, signed=False)[0])


def slot_of(table: str, ids: np.ndarray, num_slots: int) -> np.ndarray:
    """The hash slot (int64 in [0, num_slots)) of each row id of `table`."""
    h = fmix64(np.asarray(ids).astype(np.uint64) ^ table_salt(table))
    return (h % np.uint64(num_slots)).astype(np.int64)


@dataclass(frozen=True)
class ShardMap:
    """Which shard owns each slot, and where each shard listens. `version` grows on every change."""

    version: int
    num_slots: int
    assignment: tuple[int, ...]  # slot -> shard index
    addresses: tuple[str, ...]  # shard index -> "host:port"
    layout: str = ""  # cluster id the map belongs to

    @property
    def num_shards(self) -> int:
        return len(self.addresses)

    def shard_of(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Shard index (int64) of each row id."""
        return np.asarray(self.assignment, dtype=np.int64)[slot_of(table, ids, self.num_slots)]

    def owned_mask(self, shard: int) -> bytes:
        """num_slots bytes, 1 where `shard` owns the slot (ShardState.owned)."""
        return (np.asarray(self.assignment) == shard).astype(np.uint8).tobytes()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> ShardMap:
        """The map a to_json() string describes; ConfigError naming what is wrong otherwise
        (a map every client would read must never be stored half-formed)."""
        try:
            d = json.loads(s)
            m = cls(
                version=int(d["version"]),
                num_slots=int(d["num_slots"]),
                assignment=tuple(int(a) for a in d["assignment"]),
                addresses=tuple(str(a) for a in d["addresses"]),
                layout=str(d.get("layout", "")),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"shard map JSON does not parse as a shard map ({e!r})") from None
        if m.version < 0 or m.num_slots <= 0 or len(m.assignment) != m.num_slots:
            raise ConfigError(
                f"shard map has num_slots={m.num_slots} and {len(m.assignment)} assignments; "
                "they must agree and be > 0"
            )
        if not m.addresses or any(not 0 <= a < len(m.addresses) for a in m.assignment):
            raise ConfigError(
                f"shard map assigns slots to shards outside its {len(m.addresses)} addresses"
            )
        return m

    @classmethod
    def single(cls, address: str) -> ShardMap:
        """The map of one standalone shard that owns every slot (version 0: unrouted)."""
        return cls(version=0, num_slots=1, assignment=(0,), addresses=(address,))

    @classmethod
    def balanced(
        cls,
        addresses: list[str] | tuple[str, ...],
        num_slots: int = DEFAULT_SLOTS,
        version: int = 1,
        layout: str = "",
    ) -> ShardMap:
        """A fresh map spreading slots round-robin over the shards."""
        if not addresses:
            raise ConfigError("a shard map needs at least one shard")
        if num_slots < len(addresses):
            raise ConfigError(f"{len(addresses)} shards need at least as many slots ({num_slots})")
        return cls(
            version=version,
            num_slots=num_slots,
            assignment=tuple(i % len(addresses) for i in range(num_slots)),
            addresses=tuple(addresses),
            layout=layout,
        )

    def rebalanced(self, addresses: list[str] | tuple[str, ...]) -> ShardMap:
        """A map over `addresses` (the first len(self.addresses) are the current shards, in order;
        extra ones are new shards) that moves as few slots as possible.

        Shards beyond the new count give up all their slots; each remaining shard keeps slots up to
        its fair share; freed slots go to shards below their share.
        """
        n = len(addresses)
        if n < 1:
            raise ConfigError("cannot scale to 0 shards; keep at least 1")
        if n > self.num_slots:
            raise ConfigError(f"{n} shards exceed the {self.num_slots} slots of this map")
        quota = [self.num_slots // n + (1 if i < self.num_slots % n else 0) for i in range(n)]
        assign = list(self.assignment)
        count = [0] * n
        free = []
        for slot, s in enumerate(assign):
            if s < n and count[s] < quota[s]:
                count[s] += 1
            else:
                free.append(slot)
        i = 0
        for slot in free:
            while count[i] >= quota[i]:
                i += 1
            assign[slot] = i
            count[i] += 1
        return ShardMap(
            version=self.version + 1,
            num_slots=self.num_slots,
            assignment=tuple(assign),
            addresses=tuple(addresses),
            layout=self.layout,
        )
