"""The cluster layout file and the data-root lock (engram_store/ops/layout.py), without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.errors import DataDirLocked, LayoutMismatch
from engram_store.engine.routing import ShardMap
from engram_store.ops.layout import (
    LAYOUT_FILE,
    LOCK_FILE,
    ClusterLayout,
    layout_path,
    lock_data_root,
    read_layout,
    write_layout,
)

SPEC = TableConfig(name="emb", num_rows=100, dim=4, optimizer=OptimizerConfig(kind="adam"))


def sample(num_shards: int = 3) -> ClusterLayout:
    m = ShardMap.balanced(
        [f"127.0.0.1:{7000 + i}" for i in range(num_shards)], 64, version=5, layout="abc"
    )
    return ClusterLayout(
        layout="abc",
        name="c1",
        shard_map=m,
        placement={i: "10.0.0.1" for i in range(num_shards)},
        tables={SPEC.name: SPEC.to_dict()},
    )


def test_round_trip(tmp_path):
    assert read_layout(str(tmp_path)) is None  # no file: a new data root
    layout = sample()
    write_layout(str(tmp_path), layout, now=123.0)
    back = read_layout(str(tmp_path))
    assert back == ClusterLayout(
        layout="abc",
        name="c1",
        shard_map=layout.shard_map,
        placement=layout.placement,
        tables=layout.tables,
        updated=123.0,
    )
    assert back.tables["emb"] == json.loads(json.dumps(SPEC.to_dict()))
    d = json.loads((tmp_path / LAYOUT_FILE).read_text())
    # the fields other tools read (tests, operators editing placement)
    assert set(d) == {
        "layout",
        "name",
        "num_slots",
        "num_shards",
        "shard_map",
        "placement",
        "tables",
        "updated",
    }
    assert d["num_slots"] == 64 and d["num_shards"] == 3 and d["placement"]["0"] == "10.0.0.1"
    assert ShardMap.from_json(d["shard_map"]) == layout.shard_map
    assert not os.path.exists(layout_path(str(tmp_path)) + ".tmp")
    restored = ClusterLayout(
        layout="abc", name="engram", shard_map=layout.shard_map, restored_from="/snap"
    )
    write_layout(str(tmp_path), restored)
    assert read_layout(str(tmp_path)).restored_from == "/snap"


def test_placement_of_removed_shards_is_not_written(tmp_path):
    layout = sample(2)
    write_layout(
        str(tmp_path),
        ClusterLayout(
            layout="abc", name="c1", shard_map=layout.shard_map, placement={0: "a", 1: "b", 2: "c"}
        ),
    )
    assert read_layout(str(tmp_path)).placement == {0: "a", 1: "b"}


def _damage(d: dict, how: str) -> object:
    if how == "not-json":
        return None
    if how == "list":
        return [d]
    d = dict(d)
    if how == "no-layout":
        del d["layout"]
    elif how == "slots":
        d["num_slots"] = 128
    elif how == "shards":
        d["num_shards"] = 7
    elif how == "map":
        d["shard_map"] = "{not json"
    elif how == "owner":
        m = json.loads(d["shard_map"])
        m["assignment"][3] = 9
        d["shard_map"] = json.dumps(m)
    elif how == "placement":
        d["placement"] = {"zero": "10.0.0.1"}
    elif how == "tables":
        d["tables"] = {"emb": {"name": "other"}}
    return d


@pytest.mark.parametrize(
    "how",
    ["not-json", "list", "no-layout", "slots", "shards", "map", "owner", "placement", "tables"],
)
def test_a_damaged_file_is_refused_naming_it(tmp_path, how):
    write_layout(str(tmp_path), sample())
    path = tmp_path / LAYOUT_FILE
    damaged = _damage(json.loads(path.read_text()), how)
    path.write_text('{"layout": ' if damaged is None else json.dumps(damaged))
    before = path.read_text()
    with pytest.raises(LayoutMismatch, match="cluster.json is (damaged|unreadable)") as e:
        read_layout(str(tmp_path))
    assert str(path) in str(e.value)
    assert path.read_text() == before  # refused, not repaired


def test_compatibility_checks_name_the_file(tmp_path):
    layout = sample()
    layout.check_compatible(64, [SPEC.to_dict()], "x/cluster.json")
    layout.check_compatible(64, [dict(SPEC.to_dict(), name="new")], "x/cluster.json")
    with pytest.raises(LayoutMismatch, match="x/cluster.json: layout abc has 64 slots"):
        layout.check_compatible(128, [], "x/cluster.json")
    with pytest.raises(LayoutMismatch, match="another spec.*num_rows"):
        layout.check_compatible(64, [dict(SPEC.to_dict(), num_rows=99)], "x/cluster.json")
    assert layout.with_tables([dict(SPEC.to_dict(), name="t2")]).tables.keys() == {"emb", "t2"}


def test_the_lock_excludes_a_second_holder(tmp_path):
    root = str(tmp_path / "root")
    lock = lock_data_root(root, {"cluster": "c1"})
    assert lock.held and os.path.exists(os.path.join(root, LOCK_FILE))
    with pytest.raises(DataDirLocked, match="served by a live cluster.*c1"):
        lock_data_root(root, {"cluster": "c2"})
    # another process too (flock is per open file, and goes with its holder's death)
    code = (
        "import sys; from engram_store.ops.layout import lock_data_root; "
        "lock_data_root(sys.argv[1], {'cluster': 'c3'})"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, root],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert other.returncode != 0 and "DataDirLocked" in other.stderr
    lock.release()
    lock.release()  # idempotent
    with lock_data_root(root, {"restore": "/snap"}) as again:
        assert again.held
        with pytest.raises(DataDirLocked, match="being written by a live process"):
            lock_data_root(root, {"cluster": "c2"})
    assert not again.held
    lock_data_root(root, {"cluster": "c2"}).release()
