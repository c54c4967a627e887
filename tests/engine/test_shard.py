"""storage.Shard on real LMDB directories: persistence, exactly-once, validation, resharding."""

import threading

import numpy as np
import pytest

from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.engine.errors import (
    BatchTooLarge,
    DataDirLocked,
    InvalidArgument,
    LayoutMismatch,
    ReadOnly,
    ShardUnavailable,
    TableExists,
    TableNotFound,
    WrongShard,
)
from engram_store.engine.init import initial_rows, initial_state
from engram_store.engine.routing import ShardMap, slot_of
from engram_store.engine.shard import Shard, ShardStateInfo

ROWS, DIM = 500, 4
SPEC = TableConfig("t", num_rows=ROWS, dim=DIM, seed=11, optimizer=OptimizerConfig(lr=0.1))
ALL = np.arange(ROWS, dtype=np.int64)


def _grads(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _snapshot(shard, table="t"):
    st = shard.table_stats(table)
    parts = np.array_split(ALL, 10)  # within any max_batch_rows a test sets
    return (
        np.concatenate([shard.lookup(table, p) for p in parts]),
        np.concatenate([shard.optimizer_state(table, p) for p in parts]),
        st.step,
        st.pushes,
        st.stored_rows,
    )


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def trained(shard):
    shard.create_table(SPEC)
    for i in range(3):
        shard.push("t", np.arange(i * 10, i * 10 + 50, dtype=np.int64), _grads(50, i))
    return shard


def test_create_is_idempotent_and_checks_spec(shard):
    stats, created = shard.create_table(SPEC)
    assert created and stats.stored_rows == 0 and stats.step == 0
    stats, created = shard.create_table(SPEC)
    assert not created and stats.spec == SPEC
    with pytest.raises(TableExists):
        shard.create_table(TableConfig("t", num_rows=ROWS, dim=DIM + 1))
    with pytest.raises(InvalidArgument):
        shard.create_table(TableConfig("bad name!", num_rows=1))
    assert [t.name for t in shard.tables()] == ["t"]
    assert shard.drop_table("t") and not shard.drop_table("t")
    with pytest.raises(TableNotFound):
        shard.table("t")


def test_unpushed_rows_are_initial(shard):
    shard.create_table(SPEC)
    np.testing.assert_array_equal(shard.lookup("t", ALL[::-1]), initial_rows(SPEC, ALL[::-1]))
    assert shard.table_stats("t").stored_rows == 0
    assert not shard.optimizer_state("t", ALL).any()


def test_reopen_restores_everything(shard_config, trained):
    before = _snapshot(trained)
    state = ShardStateInfo(
        shard_index=1,
        map_version=3,
        num_slots=4,
        owned=b"\1\1\1\1",
        frozen=b"\0\0\0\0",
        layout="L",
        shard_map_json=ShardMap(3, 4, (1, 1, 1, 1), ("a:1", "b:2"), "L").to_json(),
    )
    trained.set_shard_state(state)
    trained.close()
    with Shard(shard_config) as again:
        _assert_same(_snapshot(again), before)
        assert again.shard_state() == state
        assert again.table("t") == SPEC
        # training continues from the restored step
        assert again.push("t", ALL[:3], _grads(3)).step == before[2] + 1


def test_lookup_returns_request_order_with_duplicates(trained):
    ids = np.array([7, 3, 7, 499, 0, 3], np.int64)
    full = trained.lookup("t", ALL)
    np.testing.assert_array_equal(trained.lookup("t", ids), full[ids])
    assert trained.lookup("t", np.empty(0, np.int64)).shape == (0, DIM)


def test_request_id_applies_once(shard_config, trained):
    ids = np.array([1, 2, 2], np.int64)
    first = trained.push("t", ids, _grads(3), request_id="req-1")
    assert not first.duplicate and first.rows_updated == 2
    before = _snapshot(trained)
    again = trained.push("t", ids, _grads(3, 9), request_id="req-1")
    assert again.duplicate and again.step == first.step and again.rows_updated == 2
    _assert_same(_snapshot(trained), before)
    trained.close()
    with Shard(shard_config) as reopened:
        assert reopened.push("t", ids, _grads(3), request_id="req-1").duplicate
        assert not reopened.push("t", ids, _grads(3), request_id="req-2").duplicate


def test_request_log_is_pruned(tmp_path):
    cfg = ShardConfig(data_dir=str(tmp_path / "s"), map_size=64 << 20, request_log=2)
    with Shard(cfg) as shard:
        shard.create_table(SPEC)
        for rid in ("a", "b", "c"):
            shard.push("t", ALL[:2], _grads(2), request_id=rid)
        assert shard.push("t", ALL[:2], _grads(2), request_id="c").duplicate
        assert not shard.push("t", ALL[:2], _grads(2), request_id="a").duplicate  # forgotten


def test_explicit_step(trained):
    assert trained.push("t", ALL[:2], _grads(2), step=10).step == 10
    assert trained.push("t", ALL[:2], _grads(2), step=5).step == 5
    assert trained.table_stats("t").step == 10
    assert trained.push("t", ALL[:2], _grads(2)).step == 11


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda s: s.lookup("nope", ALL[:2]), TableNotFound, "nope"),
        (lambda s: s.push("nope", ALL[:2], _grads(2)), TableNotFound, "nope"),
        (lambda s: s.push("t", ALL[:2].astype(np.int32), _grads(2)), InvalidArgument, "int64"),
        (lambda s: s.lookup("t", ALL[:4].reshape(2, 2)), InvalidArgument, "1-D"),
        (lambda s: s.lookup("t", [1, 2]), InvalidArgument, "1-D"),
        (
            lambda s: s.push("t", np.array([1, -3], np.int64), _grads(2)),
            InvalidArgument,
            r"-3 .*\[0, 500\)",
        ),
        (
            lambda s: s.push("t", np.array([1, ROWS], np.int64), _grads(2)),
            InvalidArgument,
            r"500 .*\[0, 500\)",
        ),
        (lambda s: s.lookup("t", np.array([ROWS + 7], np.int64)), InvalidArgument, "507"),
        (lambda s: s.push("t", ALL[:2], _grads(3)), InvalidArgument, "shape"),
        (
            lambda s: s.push("t", ALL[:2], np.zeros((2, DIM + 1), np.float32)),
            InvalidArgument,
            "shape",
        ),
        (lambda s: s.push("t", ALL[:2], _grads(2).astype(np.float64)), InvalidArgument, "float32"),
        (
            lambda s: s.push("t", ALL[:2], np.full((2, DIM), np.nan, np.float32)),
            InvalidArgument,
            "NaN",
        ),
        (
            lambda s: s.push("t", ALL[:2], np.array([[0, 0, np.inf, 0]] * 2, np.float32)),
            InvalidArgument,
            "Inf",
        ),
        (lambda s: s.push("t", ALL[:2], _grads(2), step=-1), InvalidArgument, "step"),
        (lambda s: s.push("t", ALL[:65], _grads(65)), BatchTooLarge, "max_batch_rows"),
        (lambda s: s.lookup("t", ALL[:65]), BatchTooLarge, "max_batch_rows"),
        (
            lambda s: s.create_table(TableConfig("t", num_rows=ROWS, dim=DIM, seed=12)),
            TableExists,
            "drop",
        ),
        (
            lambda s: s.import_rows("t", ALL[:2], np.zeros((2, 3), np.uint8), 1),
            InvalidArgument,
            "records",
        ),
        (lambda s: s.export_rows("t", np.zeros((2, 2), bool)), InvalidArgument, "slot mask"),
    ],
)
def test_bad_input_changes_nothing(tmp_path, call, err, match):
    cfg = ShardConfig(data_dir=str(tmp_path / "s"), map_size=64 << 20, max_batch_rows=64)
    with Shard(cfg) as shard:
        shard.create_table(SPEC)
        shard.push("t", ALL[:40], _grads(40), request_id="x")
        before = _snapshot(shard)
        with pytest.raises(err, match=match):
            call(shard)
        _assert_same(_snapshot(shard), before)


def test_ownership_and_frozen_slots(trained):
    before = _snapshot(trained)
    slots = slot_of("t", ALL, 8)
    owned = np.ones(8, np.uint8)
    owned[slots[0]] = 0
    trained.set_shard_state(ShardStateInfo(map_version=4, num_slots=8, owned=owned.tobytes()))
    with pytest.raises(WrongShard, match="version 4"):
        trained.lookup("t", ALL[:1])
    with pytest.raises(WrongShard):
        trained.push("t", ALL[:1], _grads(1))
    mine = ALL[slots != slots[0]]
    trained.lookup("t", mine)
    frozen = np.zeros(8, np.uint8)
    frozen[slots[mine[0]]] = 1
    trained.set_shard_state(
        ShardStateInfo(map_version=5, num_slots=8, owned=owned.tobytes(), frozen=frozen.tobytes())
    )
    with pytest.raises(ShardUnavailable, match="moving"):
        trained.push("t", mine[:3], _grads(3))
    trained.lookup("t", mine)  # lookups of frozen slots still work
    _assert_same(_snapshot_owned(trained, mine), (before[0][mine], before[1][mine]))
    with pytest.raises(InvalidArgument, match="num_slots"):
        trained.set_shard_state(ShardStateInfo(num_slots=8, owned=b"\1"))
    trained.set_shard_state(ShardStateInfo(layout="A"))
    with pytest.raises(LayoutMismatch):
        trained.set_shard_state(ShardStateInfo(layout="B"))


def _snapshot_owned(shard, ids):
    return shard.lookup("t", ids), shard.optimizer_state("t", ids)


def test_export_import_delete_moves_rows(tmp_path, trained):
    trained.push("t", ALL[::7], _grads(ALL[::7].shape[0], 5), step=20)
    want_rows, want_state = trained.lookup("t", ALL), trained.optimizer_state("t", ALL)
    stored = trained.table_stats("t").stored_rows
    mask = np.zeros(16, bool)
    mask[::3] = True
    moving = mask[slot_of("t", ALL, 16)]
    cfg = ShardConfig(data_dir=str(tmp_path / "dest"), map_size=64 << 20)
    with Shard(cfg) as dest:
        dest.create_table(SPEC)
        dest.lookup("t", ALL)  # a warm mirror on the destination must not hide imported rows
        moved = 0
        for ids, records, step in trained.export_rows("t", mask, batch_rows=7):
            assert ids.shape[0] <= 7 and records.shape == (ids.shape[0], trained.record_bytes("t"))
            assert moving[ids].all() and step == 20
            moved += dest.import_rows("t", ids, records, step)
        assert moved > 0
        assert trained.delete_rows("t", mask) == moved
        assert trained.table_stats("t").stored_rows == stored - moved
        assert dest.table_stats("t").stored_rows == moved and dest.table_stats("t").step == 20
        np.testing.assert_array_equal(dest.lookup("t", ALL[moving]), want_rows[moving])
        np.testing.assert_array_equal(dest.optimizer_state("t", ALL[moving]), want_state[moving])
        # the source keeps the other rows; the moved ones are back to their initial values there
        np.testing.assert_array_equal(trained.lookup("t", ALL[~moving]), want_rows[~moving])
        np.testing.assert_array_equal(
            trained.lookup("t", ALL[moving]), initial_rows(SPEC, ALL[moving])
        )
        np.testing.assert_array_equal(
            trained.optimizer_state("t", ALL[moving]), initial_state(SPEC, int(moving.sum()))
        )
        assert list(trained.export_rows("t", mask)) == []


def test_data_dir_lock(shard_config, shard):
    with pytest.raises(DataDirLocked, match="another"):
        Shard(shard_config)
    shard.close()
    with Shard(shard_config) as again:
        assert again.tables() == []


def test_read_only(shard_config, trained):
    trained.close()
    ro = ShardConfig(data_dir=shard_config.data_dir, map_size=64 << 20, read_only=True)
    with Shard(ro) as shard:
        shard.lookup("t", ALL)
        with pytest.raises(ReadOnly):
            shard.push("t", ALL[:1], _grads(1))
        with pytest.raises(ReadOnly):
            shard.create_table(TableConfig("u", num_rows=3))


def test_concurrent_lookups_never_see_torn_rows(tmp_path):
    # sgd lr 1, gradient -1 everywhere: each push adds 1 to every element of the pushed rows,
    # so an untorn row has all elements equal
    spec = TableConfig(
        "z", num_rows=2000, dim=32, init="zeros", optimizer=OptimizerConfig(kind="sgd", lr=1.0)
    )
    cfg = ShardConfig(data_dir=str(tmp_path / "s"), map_size=256 << 20)
    ids = np.arange(2000, dtype=np.int64)
    with Shard(cfg) as shard:
        shard.create_table(spec)
        stop, bad = threading.Event(), []

        def reader(seed):
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                rows = shard.lookup("z", rng.permutation(ids)[:700])
                if not (rows == rows[:, :1]).all():
                    bad.append(rows)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        g = -np.ones((2000, 32), np.float32)
        for _ in range(15):
            shard.push("z", ids, g)
        stop.set()
        for th in threads:
            th.join()
        assert not bad
        np.testing.assert_array_equal(shard.lookup("z", ids), np.full((2000, 32), 15, np.float32))


def test_stats(trained):
    s = trained.stats()
    assert s["stored_rows"] == trained.table_stats("t").stored_rows == 70
    assert s["stored_bytes"] == 70 * trained.record_bytes("t") == 70 * DIM * 12
    assert s["map_size_bytes"] == 64 << 20 and 0 < s["used_bytes"] <= s["map_size_bytes"]
    assert s["cache_rows"] >= 0


def test_retry_of_applied_push_is_acknowledged_while_frozen(trained):
    ids = ALL[:5]
    first = trained.push("t", ids, _grads(5), request_id="r")
    slots = slot_of("t", ids, 4)
    frozen = np.zeros(4, np.uint8)
    frozen[slots] = 1
    trained.set_shard_state(ShardStateInfo(num_slots=4, frozen=frozen.tobytes()))
    again = trained.push("t", ids, _grads(5), request_id="r")
    assert again.duplicate and again.step == first.step
    with pytest.raises(ShardUnavailable):
        trained.push("t", ids, _grads(5), request_id="new")
    with pytest.raises(InvalidArgument, match="too long"):
        trained.push("t", ids, _grads(5), request_id="x" * 600)


def test_full_map_raises_store_full_and_changes_nothing(tmp_path):
    from engram_store.engine.errors import StoreFull

    cfg = ShardConfig(data_dir=str(tmp_path / "s"), map_size=1 << 20)
    spec = TableConfig("big", num_rows=100_000, dim=64)
    with Shard(cfg) as shard:
        shard.create_table(spec)
        few = np.arange(10, dtype=np.int64)
        shard.push("big", few, np.ones((10, 64), np.float32))
        before = shard.lookup("big", few), shard.optimizer_state("big", few)
        many = np.arange(5000, dtype=np.int64)
        with pytest.raises(StoreFull, match="map-size"):
            shard.push("big", many, np.ones((5000, 64), np.float32), request_id="q")
        _assert_same((shard.lookup("big", few), shard.optimizer_state("big", few)), before)
        st = shard.table_stats("big")
        assert (st.stored_rows, st.step, st.pushes) == (10, 1, 1)
        # the request id was not recorded: the same push may be retried after a restart
        assert not shard.push("big", few, np.ones((10, 64), np.float32), request_id="q").duplicate


def test_dropped_table_is_gone_after_reopen(shard_config, trained):
    trained.create_table(TableConfig("u", num_rows=10, dim=2))
    assert trained.drop_table("t")
    trained.close()
    with Shard(shard_config) as again:
        assert [t.name for t in again.tables()] == ["u"]
        again.create_table(SPEC)  # a fresh table of the same name starts from its initial rows
        np.testing.assert_array_equal(again.lookup("t", ALL), initial_rows(SPEC, ALL))
        assert again.table_stats("t").step == 0


def test_snapshot_copy_opens_with_the_same_contents(tmp_path, trained):
    before = _snapshot(trained)
    dest = tmp_path / "snap"
    dest.mkdir()
    stats = trained.snapshot(str(dest))
    assert [s.spec.name for s in stats] == ["t"] and stats[0].stored_rows == before[4]
    with Shard(ShardConfig(data_dir=str(dest), map_size=64 << 20, read_only=True)) as copy:
        _assert_same(_snapshot(copy), before)


def test_failed_open_releases_the_directory(shard_config, shard):
    shard.create_table(SPEC)
    with shard._write() as txn:  # a corrupt table entry, as a bad disk or manual edit leaves
        txn.put(b"table:t", b"{not json", db=shard._meta)
    shard.close()
    for _ in range(2):  # the second attempt fails the same way, not with DataDirLocked
        with pytest.raises(ValueError):
            Shard(shard_config)
