"""The v2 engine's behaviour: memory that grows with rows stored, a byte budget, one version per
lookup, group commit under concurrency, row-wise optimizers and low-precision rows end to end,
read-only fp8 rows. Real LMDB directories in tmp_path, real threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engram_store.engine import init, kernels, optimizers
from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.engine.errors import ConfigError, InvalidArgument, ReadOnly, StoreFull
from engram_store.engine.index import Index, distinct
from engram_store.engine.shard import Shard


def _cfg(tmp_path, name="s", **kw):
    return ShardConfig(data_dir=str(tmp_path / name), map_size=512 << 20, **kw)


def test_memory_grows_with_rows_stored_not_with_the_table_height(tmp_path):
    huge = TableConfig("h", num_rows=384_006_168, dim=64, optimizer=OptimizerConfig("adam"))
    with Shard(_cfg(tmp_path, memory_bytes=1 << 30)) as shard:
        shard.create_table(huge)
        empty = shard.memory_bytes()
        assert empty < 1 << 20  # a 384 M-row table costs nothing until rows are stored
        ids = np.random.default_rng(0).choice(huge.num_rows, 20_000, replace=False)
        shard.push("h", ids, np.ones((20_000, 64), np.float32))
        per_row = (shard.memory_bytes() - empty) / 20_000
        # the row (256 B) + Adam state (512 B) + id (8 B) + index slots (<= 12 B)
        assert 776 <= per_row <= 800, per_row
        assert shard.table_stats("h").stored_rows == 20_000


def test_a_push_past_the_memory_budget_is_refused_and_changes_nothing(tmp_path):
    spec = TableConfig("t", num_rows=1_000_000, dim=32, optimizer=OptimizerConfig("adam"))
    per_row = 32 * 4 * 3 + 16
    with Shard(_cfg(tmp_path, memory_bytes=3000 * per_row)) as shard:
        shard.create_table(spec)
        shard.push("t", np.arange(2000), np.ones((2000, 32), np.float32))
        stored = np.arange(2000)
        before = shard.lookup("t", stored).copy(), shard.optimizer_state("t", stored).copy()
        stats = shard.table_stats("t")
        with pytest.raises(StoreFull, match="memory budget"):
            shard.push("t", np.arange(1000, 4000), np.ones((3000, 32), np.float32))
        np.testing.assert_array_equal(shard.lookup("t", stored), before[0])
        np.testing.assert_array_equal(shard.optimizer_state("t", stored), before[1])
        assert shard.table_stats("t") == stats
        shard.push("t", np.arange(500, 2500), np.ones((2000, 32), np.float32))  # 500 new: fits
    with Shard(_cfg(tmp_path, memory_bytes=3000 * per_row)) as shard:  # and nothing was logged
        assert shard.table_stats("t").pushes == 2


def test_every_lookup_sees_one_version_of_all_its_rows(tmp_path):
    """Each push adds 1 to every row of the table (SGD, lr 1, gradient -1); a lookup that saw
    part of a push would return rows of two values."""
    n = 4000
    spec = TableConfig("z", num_rows=n, dim=16, init="zeros", optimizer=OptimizerConfig("sgd", 1.0))
    ids = np.arange(n, dtype=np.int64)
    minus = -np.ones((n, 16), np.float32)
    with Shard(_cfg(tmp_path)) as shard:
        shard.create_table(spec)
        stop, torn, seen = threading.Event(), [], []

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                rows = shard.lookup("z", rng.permutation(ids)[: n // 2])
                seen.append(float(rows[0, 0]))
                if rows.min() != rows.max():
                    torn.append((rows.min(), rows.max()))

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for _ in range(60):
            shard.push("z", ids, minus)
        stop.set()
        for th in threads:
            th.join()
        assert not torn
        assert len(set(seen)) > 5  # the readers really overlapped the pushes
        assert shard.lookup("z", ids[:1])[0, 0] == 60.0


def test_concurrent_pushes_and_retries_are_each_applied_once(tmp_path):
    """8 threads push 25 times each, every push sent twice at once with the same request id."""
    spec = TableConfig(
        "c", num_rows=500, dim=4, init="zeros", optimizer=OptimizerConfig("sgd", 1.0)
    )
    with Shard(_cfg(tmp_path)) as shard:
        shard.create_table(spec)
        results = []

        def worker(w: int) -> None:
            for i in range(25):
                ids = np.arange(w * 50, w * 50 + 50, dtype=np.int64)
                g = np.full((50, 4), -1.0, np.float32)
                pair = [
                    threading.Thread(
                        target=lambda ids=ids, g=g, rid=f"w{w}-{i}": results.append(
                            shard.push("c", ids, g, rid)
                        )
                    )
                    for _ in range(2)
                ]
                for th in pair:
                    th.start()
                for th in pair:
                    th.join()

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(results) == 400
        assert sum(r.duplicate for r in results) == 200
        rows = shard.lookup("c", np.arange(400, dtype=np.int64))
        np.testing.assert_array_equal(rows, np.full((400, 4), 25.0, np.float32))
        assert shard.table_stats("c").pushes == 200


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "rowwise_adam", "adagrad", "sgd"])
def test_optimizers_through_the_shard_match_the_numpy_reference(tmp_path, kind):
    opt = OptimizerConfig(kind, lr=0.05)
    spec = TableConfig("r", num_rows=3000, dim=16, seed=4, optimizer=opt)
    rng = np.random.default_rng(1)
    rows = init.initial_rows(spec, np.arange(3000))
    state = init.initial_state(spec, 3000)
    with Shard(_cfg(tmp_path)) as shard:
        shard.create_table(spec)
        for step in range(1, 9):
            ids = rng.integers(0, 3000, 700).astype(np.int64)
            g = rng.standard_normal((700, 16)).astype(np.float32)
            shard.push("r", ids, g)
            u, gs = optimizers.coalesce(ids, g)
            rows[u], state[u] = optimizers.apply(opt, rows[u], state[u], gs, step)
        all_ids = np.arange(3000, dtype=np.int64)
        np.testing.assert_allclose(shard.lookup("r", all_ids), rows, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(shard.optimizer_state("r", all_ids), state, rtol=1e-6, atol=1e-6)
    assert shard.record_bytes("r") == 64 + 4 * opt.state_floats(16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_rows_train_reproducibly_close_to_float32(tmp_path, dtype):
    """Stochastic rounding is seeded by (seed, id, step, column): two shards (one reopened in
    between) end with the same bits, and within a few ulps of a float32 table."""
    opt = OptimizerConfig("rowwise_adagrad", lr=0.01)
    lo = TableConfig("b", num_rows=2000, dim=32, dtype=dtype, seed=9, optimizer=opt)
    hi = TableConfig("b", num_rows=2000, dim=32, dtype="float32", seed=9, optimizer=opt)
    rng = np.random.default_rng(2)
    pushes = [
        (
            rng.integers(0, 2000, 500).astype(np.int64),
            rng.standard_normal((500, 32)).astype(np.float32),
        )
        for _ in range(10)
    ]
    ids = np.arange(2000, dtype=np.int64)
    out = []
    for name, spec in (("a", lo), ("b", lo), ("f", hi)):
        shard = Shard(_cfg(tmp_path, name))
        shard.create_table(spec)
        for k, (i, g) in enumerate(pushes):
            shard.push("b", i, g)
            if name == "b" and k == 4:
                shard.close()
                shard = Shard(_cfg(tmp_path, name))
        out.append(shard.lookup_into("b", ids, spec.dtype).copy())
        shard.close()
    np.testing.assert_array_equal(out[0], out[1])
    low = kernels.decode(out[0], dtype, 32)
    f32 = out[2].view("<f4").reshape(2000, 32)
    ulp = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    assert np.abs(low - f32).max() <= 8 * ulp * max(1.0, np.abs(f32).max())


def test_float8_rows_are_served_as_stored_and_not_trained(tmp_path):
    spec = TableConfig("q", num_rows=10_000, dim=64, dtype="float8_e4m3", init="zeros")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 64)).astype(np.float32)
    enc = kernels.encode(x, "float8_e4m3")
    ids = rng.choice(10_000, 100, replace=False).astype(np.int64)
    with Shard(_cfg(tmp_path)) as shard:
        shard.create_table(spec)
        assert shard.record_bytes("q") == 64 + 2  # 64 codes + 2 scales, no optimizer state
        shard.import_rows("q", ids, enc, 0)
        np.testing.assert_array_equal(shard.lookup_into("q", ids, "float8_e4m3"), enc)
        np.testing.assert_array_equal(
            shard.lookup("q", ids), kernels.decode(enc, "float8_e4m3", 64)
        )
        with pytest.raises(ReadOnly, match="import it as bfloat16 or float32"):
            shard.push("q", ids, np.ones((100, 64), np.float32))


@pytest.mark.parametrize("bad", [1e20, -3e12])
def test_absurd_gradients_are_refused_before_they_reach_the_state(tmp_path, bad):
    spec = TableConfig("t", num_rows=100, dim=4, optimizer=OptimizerConfig("adam"))
    with Shard(_cfg(tmp_path)) as shard:
        shard.create_table(spec)
        g = np.ones((3, 4), np.float32)
        g[1, 2] = bad
        with pytest.raises(InvalidArgument, match="clip them"):
            shard.push("t", np.arange(3), g)
        with pytest.raises(InvalidArgument, match=r"step=.* must be an integer in \[0, 2\^62\)"):
            shard.push("t", np.arange(3), np.ones((3, 4), np.float32), step=2**63 - 1)
        assert shard.table_stats("t").pushes == 0
        shard.push("t", np.arange(3), np.ones((3, 4), np.float32))
        assert np.isfinite(shard.lookup("t", np.arange(3))).all()


def test_the_index_matches_a_dict_under_inserts_and_deletes():
    rng = np.random.default_rng(0)
    cap = 50_000
    ids_of = np.full(cap, -1, np.int64)
    index, ref, free = Index(), {}, list(range(cap))[::-1]
    for _ in range(200):
        keys = np.unique(rng.integers(0, 20_000, rng.integers(1, 1500)))
        out = np.empty(keys.shape[0], np.int64)
        index.find(ids_of, keys, out)
        assert out.tolist() == [ref.get(int(k), -1) for k in keys]
        if rng.random() < 0.6:
            new = keys[out < 0]
            offs = np.array([free.pop() for _ in new], np.int64)
            ids_of[offs] = new
            index.insert(ids_of, offs)
            ref.update(zip(new.tolist(), offs.tolist(), strict=True))
        else:
            gone = keys[out >= 0]
            assert index.delete(ids_of, gone) == gone.shape[0]
            for k in gone.tolist():
                o = ref.pop(k)
                ids_of[o] = -1
                free.append(o)
        assert index.n == len(ref)


def test_distinct_sums_duplicates_like_coalesce():
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 40, 500).astype(np.int64)
    g = rng.standard_normal((500, 3)).astype(np.float32)
    u, s = distinct(ids, g)
    cu, cs = optimizers.coalesce(ids, g)
    order = np.argsort(u)
    np.testing.assert_array_equal(u[order], cu)
    np.testing.assert_allclose(s[order], cs, rtol=1e-6, atol=1e-6)
    once = np.arange(10, dtype=np.int64)[::-1].copy()
    same = distinct(once, g[:10])
    assert same[0] is once and same[1] is g[:10].base or np.shares_memory(same[1], g)


def test_a_read_only_shard_serves_and_writes_nothing(tmp_path):
    spec = TableConfig("t", num_rows=1000, dim=8)
    with Shard(_cfg(tmp_path)) as shard:
        shard.create_table(spec)
        shard.push("t", np.arange(10), np.ones((10, 8), np.float32))
        want = shard.lookup("t", np.arange(20)).copy()
    data = tmp_path / "s" / "data.mdb"
    before = data.read_bytes()
    with Shard(_cfg(tmp_path, read_only=True)) as ro:
        np.testing.assert_array_equal(ro.lookup("t", np.arange(20)), want)
        with pytest.raises(ReadOnly):
            ro.push("t", np.arange(3), np.ones((3, 8), np.float32))
    assert data.read_bytes() == before
    with pytest.raises(ConfigError, match="holds none"):
        Shard(_cfg(tmp_path, "empty", read_only=True))


def test_deleting_the_lock_file_does_not_let_a_second_shard_in(tmp_path):
    from engram_store.engine.errors import DataDirLocked

    with Shard(_cfg(tmp_path)):
        (tmp_path / "s" / "shard.lock").unlink()
        with pytest.raises(DataDirLocked, match="in use by another shard process"):
            Shard(_cfg(tmp_path))
    with Shard(_cfg(tmp_path)):  # released on close
        pass


def test_a_table_name_with_a_final_newline_is_refused(tmp_path):
    with Shard(_cfg(tmp_path)) as shard, pytest.raises(InvalidArgument, match="table name"):
        shard.create_table(TableConfig("small\n", num_rows=10))


def test_a_recreated_table_does_not_inherit_the_dropped_ones_request_ids(tmp_path):
    spec = TableConfig("t", num_rows=100, dim=4, init="zeros", optimizer=OptimizerConfig("sgd", 1))
    g = -np.ones((2, 4), np.float32)
    with Shard(_cfg(tmp_path)) as shard:
        shard.create_table(spec)
        assert not shard.push("t", np.arange(2), g, request_id="same").duplicate
        assert shard.drop_table("t")
        shard.create_table(spec)
        assert not shard.push("t", np.arange(2), g, request_id="same").duplicate
        np.testing.assert_array_equal(shard.lookup("t", np.arange(2)), np.ones((2, 4)))
    with Shard(_cfg(tmp_path)) as shard:  # and after a restart
        assert shard.push("t", np.arange(2), g, request_id="same").duplicate
        assert shard.table_stats("t").pushes == 1


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        '{"version": 1}',
        '{"version": 1, "num_slots": 2, "assignment": [0, 5], "addresses": ["a:1"]}',
    ],
)
def test_a_malformed_shard_map_is_refused_and_the_state_kept(tmp_path, bad):
    from engram_store.engine.types import ShardStateInfo

    with Shard(_cfg(tmp_path)) as shard:
        before = shard.shard_state()
        with pytest.raises(InvalidArgument, match="shard map"):
            shard.set_shard_state(ShardStateInfo(shard_map_json=bad))
        assert shard.shard_state() == before
    with Shard(_cfg(tmp_path)) as shard:
        assert shard.shard_state() == before
