"""Reshard planning as a pure function (cluster/planning.py): no Ray is started here."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from cluster.planning import (
    ReshardPlan,
    SlotMove,
    grown,
    moved,
    plan_reshard,
    planned_maps,
    shrunk,
)
from engram_store.engine.errors import ConfigError
from engram_store.engine.routing import ShardMap

SLOTS = 64
ROOT = pathlib.Path(__file__).resolve().parents[2]


def fresh(num_shards: int, num_slots: int = SLOTS) -> ShardMap:
    return ShardMap.balanced([f"a{i}" for i in range(num_shards)], num_slots, version=3, layout="L")


def run(
    current: ShardMap, num_shards: int, group_slots: int = 8
) -> tuple[ReshardPlan, list[ShardMap]]:
    """Plan `current` -> `num_shards` and check what every plan must hold; returns the plan and
    the maps it publishes."""
    plan = plan_reshard(current, num_shards, group_slots)
    maps = planned_maps(current, plan)
    final = maps[-1] if maps else current
    n, m = current.num_shards, num_shards
    assert (plan.from_shards, plan.to_shards) == (n, m)
    assert final.num_shards == m and final.assignment == plan.assignment
    assert final.layout == current.layout and final.num_slots == current.num_slots
    # every slot owned exactly once, by a shard of the new map, in every published map
    for mp in maps:
        assert len(mp.assignment) == mp.num_slots
        assert all(0 <= s < mp.num_shards for s in mp.assignment)
    # versions go up by one per published map
    assert [mp.version for mp in maps] == list(
        range(current.version + 1, current.version + 1 + len(maps))
    )
    # the moves carry exactly the slots whose owner changes, each once, from its old owner
    changed = {s for s in range(current.num_slots) if current.assignment[s] != plan.assignment[s]}
    slots = [s for mv in plan.moves for s in mv.slots]
    assert sorted(slots) == sorted(changed) and len(slots) == len(set(slots))
    for mv in plan.moves:
        assert 1 <= len(mv.slots) <= group_slots and mv.source != mv.dest
        assert all(
            current.assignment[s] == mv.source and plan.assignment[s] == mv.dest for s in mv.slots
        )
        assert list(mv.slots) == sorted(mv.slots)
    # moves run source by source, destination by destination
    order = [(mv.source, mv.dest) for mv in plan.moves]
    assert order == sorted(order)
    # balanced: the shard counts differ by at most one
    counts = [plan.assignment.count(i) for i in range(m)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == current.num_slots
    # minimal: no plan reaching these counts moves fewer slots
    before = [current.assignment.count(i) for i in range(m)]
    assert plan.moved_slots == sum(max(0, c - b) for c, b in zip(counts, before, strict=True))
    assert list(plan.started) == list(range(n, max(n, m)))
    assert list(plan.removed) == list(range(m, max(n, m)))
    return plan, maps


def test_grow_1_2_4():
    m1 = fresh(1)
    plan, maps = run(m1, 2)
    assert plan.moved_slots == SLOTS // 2 and {mv.dest for mv in plan.moves} == {1}
    # the first map knows the new shard, which owns nothing yet
    assert maps[0].num_shards == 2 and 1 not in maps[0].assignment
    m2 = maps[-1]
    plan, maps = run(m2, 4)
    assert plan.moved_slots == SLOTS // 2  # each of the two new shards takes a quarter
    assert {mv.dest for mv in plan.moves} == {2, 3} and {mv.source for mv in plan.moves} == {0, 1}


def test_shrink_4_3_1():
    m4 = fresh(4)
    plan, maps = run(m4, 3)
    assert {mv.source for mv in plan.moves} == {3}  # only the removed shard gives slots away
    assert plan.moved_slots == SLOTS // 4
    assert maps[-1].num_shards == 3 and maps[-1].addresses == m4.addresses[:3]
    plan, maps = run(maps[-1], 1)
    assert set(plan.assignment) == {0} and maps[-1].addresses == ("a0",)
    assert {mv.dest for mv in plan.moves} == {0}


def test_uneven_counts_and_group_sizes():
    current = fresh(3, num_slots=100)
    for m in (1, 2, 4, 5, 7, 100):
        for group in (1, 3, 64, 1000):
            run(current, m, group)


def test_equal_counts_move_nothing():
    for n in (1, 2, 3, 4):
        current = fresh(n)
        plan = plan_reshard(current, n, 8)
        assert plan.is_noop and plan.moves == () and planned_maps(current, plan) == []
    # a plan's result, planned again at its own count, moves nothing either
    _, maps = run(fresh(2), 4)
    again = plan_reshard(maps[-1], 4, 8)
    assert again.is_noop and again.assignment == maps[-1].assignment


def test_an_interrupted_plan_finishes_at_the_same_count():
    """A registry that crashed mid-reshard re-runs scale(m) from the map it saved: planning
    that map again at m finishes the moves."""
    current = fresh(2)
    plan = plan_reshard(current, 4, 4)
    maps = planned_maps(current, plan)
    half = maps[len(plan.moves) // 2]  # new shards known, some groups moved
    rest, rest_maps = run(half, 4, 4)
    assert not rest.is_noop and rest.moved_slots < plan.moved_slots
    assert rest_maps[-1].assignment == plan.assignment


@pytest.mark.parametrize("count", [0, -1, SLOTS + 1])
def test_bad_counts_are_refused(count):
    with pytest.raises(ConfigError, match="at least 1|exceed the 64 slots"):
        plan_reshard(fresh(2), count, 8)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="integer"):
        plan_reshard(fresh(2), 2.5, 8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="group size"):
        plan_reshard(fresh(2), 3, 0)
    m2 = fresh(2)
    with pytest.raises(ConfigError, match="not on shard 1"):
        moved(m2, SlotMove(1, 0, (0,)))  # slot 0 is shard 0's
    with pytest.raises(ConfigError, match="not in map"):
        moved(m2, SlotMove(0, 5, (0,)))
    with pytest.raises(ConfigError, match="still own slots"):
        shrunk(m2, 1)
    assert grown(m2, ["a2"]).addresses == ("a0", "a1", "a2")


def test_planning_needs_no_ray():
    """Importing the planner imports no Ray (the cluster package only checks it is installed)."""
    code = "import sys, cluster.planning; assert 'ray' not in sys.modules, 'ray imported'"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
