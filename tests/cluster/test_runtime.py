"""cluster.runtime without starting a Ray: which local Ray a command may use when no --address
is given, and what an address probe says about things that are no Ray. (The Ray-starting side is
tests/cli/test_cluster_commands.py, and every cluster test's fixture.)"""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from cluster.runtime import (  # noqa: E402
    LocalRay,
    NoLocalRay,
    RayUnreachable,
    SeveralRays,
    pick_local_ray,
    probe_gcs,
)
from engram_store.engine.errors import ConfigError  # noqa: E402

UP = LocalRay("127.0.0.1:40001", 1234, "engram cluster up --shards 2")
TRAIN = LocalRay("127.0.0.1:40002", 5678, "engram train --steps 200")
HEAD = LocalRay("127.0.0.1:6379", 0, "ray start")


def test_the_only_local_ray_is_used():
    assert pick_local_ray([UP]) is UP
    assert "started by pid 1234: engram cluster up" in UP.describe()
    assert "started by ray start" in HEAD.describe()


def test_several_local_rays_are_listed_never_picked():
    with pytest.raises(SeveralRays) as e:
        pick_local_ray([UP, TRAIN, HEAD])
    text = str(e.value)
    assert all(f"--address {r.address}" in text for r in (UP, TRAIN, HEAD)), text
    assert "engram train" in text  # says which Ray is whose
    assert isinstance(e.value, ConfigError)  # a usage error: the command must say which


def test_no_local_ray_says_how_to_get_one():
    with pytest.raises(NoLocalRay, match="no Ray runs on this machine") as e:
        pick_local_ray([])
    assert "engram cluster up" in e.value.hint


def test_probe_of_a_shard_or_nothing_is_no_ray(shard):
    with pytest.raises(RayUnreachable, match="no Ray GCS"):
        probe_gcs(shard.address, timeout_s=5)
    shard.stop()
    with pytest.raises(RayUnreachable, match="no Ray answers"):
        probe_gcs(shard.address, timeout_s=1)
