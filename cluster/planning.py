"""Reshard planning: which slots move from which shard to which, in what order, and the shard
maps the registry publishes on the way. Pure functions of a ShardMap (no Ray, no I/O), so every
property of a plan is testable on its own (tests/cluster/test_planning.py).

N -> M (docs/design.md "Routing and resharding"): the target assignment is
`ShardMap.rebalanced`, which moves only slots whose owner must change; the moves are grouped by
(source, destination) pair, in source then destination order, at most `group_slots` slots each,
because each group is one freeze of pushes to its slots on the source. The registry then
publishes `grown` (new shards known, owning nothing), one `moved` map per group, and `shrunk`
(removed shards dropped) when shrinking; every map has a version one above the one before.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from engram_store.engine.errors import ConfigError
from engram_store.engine.routing import ShardMap


@dataclass(frozen=True)
class SlotMove:
    """One group: `slots` (ascending) leave shard `source` for shard `dest`."""

    source: int
    dest: int
    slots: tuple[int, ...]


@dataclass(frozen=True)
class ReshardPlan:
    """How a map of `from_shards` shards becomes one of `to_shards` shards."""

    from_shards: int
    to_shards: int
    assignment: tuple[int, ...]  # the target: slot -> shard index (< to_shards)
    moves: tuple[SlotMove, ...]  # in the order to run them

    @property
    def started(self) -> range:
        """Indices of the shards to start before the moves (growing)."""
        return range(self.from_shards, max(self.from_shards, self.to_shards))

    @property
    def removed(self) -> range:
        """Indices of the shards to stop after the moves (shrinking)."""
        return range(self.to_shards, max(self.from_shards, self.to_shards))

    @property
    def moved_slots(self) -> int:
        return sum(len(m.slots) for m in self.moves)

    @property
    def is_noop(self) -> bool:
        """True when nothing is started, moved or stopped."""
        return not self.moves and self.from_shards == self.to_shards


def _integer(value: object, what: str) -> int:
    """`value` as an int (numpy integers too); ConfigError naming `what` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{what} must be an integer, not {value!r}") from None


def check_shard_count(num_shards: int, num_slots: int) -> None:
    """Raise ConfigError unless a layout of `num_slots` slots can have `num_shards` shards."""
    num_shards = _integer(num_shards, "the shard count")
    if num_shards < 1:
        raise ConfigError(
            f"cannot scale to {num_shards} shards; a cluster keeps at least 1 "
            "(use `engram cluster down` to stop it)"
        )
    if num_shards > num_slots:
        raise ConfigError(f"{num_shards} shards exceed the {num_slots} slots of this layout")


def plan_reshard(current: ShardMap, num_shards: int, group_slots: int) -> ReshardPlan:
    """The plan that takes `current` to `num_shards` shards moving as few slots as possible
    (only slots whose owner changes), each move at most `group_slots` slots.

    Planning a map whose shards already hold their fair shares, at its own shard count, gives a
    plan with no moves (`is_noop`). ConfigError for a count below 1 or above the slot count, or
    a group size below 1.
    """
    check_shard_count(num_shards, current.num_slots)
    num_shards = _integer(num_shards, "the shard count")
    group_slots = _integer(group_slots, "the reshard group size")
    if group_slots < 1:
        raise ConfigError(f"the reshard group size is {group_slots}; it must be >= 1")
    n, m = current.num_shards, num_shards
    # Placeholder addresses for the shards to start: only the assignment matters here.
    addresses = list(current.addresses[:m]) + [f"new-shard-{i}" for i in range(n, m)]
    target = current.rebalanced(addresses).assignment
    moves = []
    for src in range(n):
        for dst in range(max(n, m)):
            if dst == src:
                continue
            slots = [
                s
                for s in range(current.num_slots)
                if current.assignment[s] == src and target[s] == dst
            ]
            moves += [
                SlotMove(src, dst, tuple(slots[i : i + group_slots]))
                for i in range(0, len(slots), group_slots)
            ]
    return ReshardPlan(from_shards=n, to_shards=m, assignment=target, moves=tuple(moves))


def with_addresses(current: ShardMap, addresses: Sequence[str]) -> ShardMap:
    """The next version of `current` with shards at `addresses` (same slots owned)."""
    return dataclasses.replace(current, version=current.version + 1, addresses=tuple(addresses))


def grown(current: ShardMap, new_addresses: Sequence[str]) -> ShardMap:
    """The next version of `current` that knows the started shards at `new_addresses`; they own
    nothing yet."""
    return with_addresses(current, (*current.addresses, *new_addresses))


def moved(current: ShardMap, move: SlotMove) -> ShardMap:
    """The next version of `current` in which `move.dest` owns `move.slots`."""
    wrong = [s for s in move.slots if current.assignment[s] != move.source]
    if wrong:
        raise ConfigError(
            f"slots {wrong[:8]} are not on shard {move.source} in map "
            f"v{current.version}; plan the reshard from the current map"
        )
    if not 0 <= move.dest < current.num_shards:
        raise ConfigError(
            f"shard {move.dest} is not in map v{current.version} ({current.num_shards} shards)"
        )
    assignment = list(current.assignment)
    for s in move.slots:
        assignment[s] = move.dest
    return dataclasses.replace(current, version=current.version + 1, assignment=tuple(assignment))


def shrunk(current: ShardMap, num_shards: int) -> ShardMap:
    """The next version of `current` without the shards from `num_shards` on, which must own no
    slot any more."""
    left = sorted({s for s in current.assignment if s >= num_shards})
    if left:
        raise ConfigError(
            f"shards {left} still own slots in map v{current.version}; move them "
            "before dropping the shards"
        )
    return with_addresses(current, current.addresses[:num_shards])


def planned_maps(
    current: ShardMap, plan: ReshardPlan, new_addresses: Sequence[str] = ()
) -> list[ShardMap]:
    """Every map the registry publishes to carry out `plan` from `current`, in order (empty for
    a no-op plan); the last one has the plan's assignment. `new_addresses`: where the started
    shards listen (placeholders by default)."""
    if not new_addresses:
        new_addresses = [f"new-shard-{i}" for i in plan.started]
    if len(new_addresses) != len(plan.started):
        raise ConfigError(f"{len(new_addresses)} addresses for {len(plan.started)} new shards")
    maps = []
    m = current
    if plan.started:
        m = grown(m, new_addresses)
        maps.append(m)
    for move in plan.moves:
        m = moved(m, move)
        maps.append(m)
    if plan.removed:
        m = shrunk(m, plan.to_shards)
        maps.append(m)
    return maps
