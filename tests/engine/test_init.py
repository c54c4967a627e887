"""init: deterministic initial rows and optimizer state."""

import numpy as np

from engram_store.engine.config import OptimizerConfig, TableConfig
from engram_store.engine.init import initial_rows, initial_state


def test_rows_depend_only_on_seed_id_and_column():
    spec = TableConfig("t", num_rows=10_000, dim=9, seed=7)
    ids = np.arange(10_000, dtype=np.int64)
    full = initial_rows(spec, ids)
    perm = np.random.default_rng(0).permutation(ids)[:500]
    np.testing.assert_array_equal(initial_rows(spec, perm), full[perm])
    np.testing.assert_array_equal(initial_rows(spec, np.array([42, 42])), full[[42, 42]])
    # a wider table shares the leading columns: the value is a function of the column
    wide = TableConfig("t", num_rows=10_000, dim=16, seed=7)
    np.testing.assert_array_equal(initial_rows(wide, perm)[:, :9], full[perm])
    other = TableConfig("t", num_rows=10_000, dim=9, seed=8)
    assert not np.allclose(initial_rows(other, perm), full[perm])


def test_same_rows_under_any_shard_split():
    from engram_store.engine.routing import slot_of

    spec = TableConfig("t", num_rows=5_000, dim=4, seed=1)
    ids = np.arange(5_000, dtype=np.int64)
    whole = initial_rows(spec, ids)
    for shards in (2, 3, 7):
        owner = slot_of("t", ids, shards)
        for s in range(shards):
            part = ids[owner == s]
            np.testing.assert_array_equal(initial_rows(spec, part), whole[part])


def test_normal_moments():
    spec = TableConfig("t", num_rows=1 << 20, dim=64, init_std=0.02, seed=3)
    x32 = initial_rows(spec, np.arange(4096, dtype=np.int64))
    assert x32.dtype == np.float32 and x32.shape == (4096, 64)
    x = x32.astype(np.float64)
    assert abs(x.mean()) < 0.02 * 0.01
    assert abs(x.std() / 0.02 - 1) < 0.01
    assert abs((x / 0.02) ** 4).mean() - 3 < 0.1  # kurtosis of a normal
    # columns are not correlated with each other (the Box-Muller pairs included)
    c = np.corrcoef(x[:, :4].T)
    assert np.abs(c - np.eye(4)).max() < 0.05


def test_zeros_and_state():
    spec = TableConfig("t", num_rows=10, dim=3, init="zeros")
    assert not initial_rows(spec, np.arange(10)).any()
    assert initial_rows(spec, np.empty(0, np.int64)).shape == (0, 3)
    ada = TableConfig(
        "t",
        num_rows=10,
        dim=3,
        optimizer=OptimizerConfig(kind="adagrad", initial_accumulator_value=0.5),
    )
    np.testing.assert_array_equal(initial_state(ada, 2), np.full((2, 3), 0.5, np.float32))
    adam = TableConfig("t", num_rows=10, dim=3)
    assert initial_state(adam, 2).shape == (2, 6) and not initial_state(adam, 2).any()
    sgd = TableConfig("t", num_rows=10, dim=3, optimizer=OptimizerConfig(kind="sgd"))
    assert initial_state(sgd, 2).shape == (2, 0)


def test_normal_rows_follow_the_documented_box_muller_in_float64():
    """The float32 polynomials against numpy's float64 log/cos/sin on the same hash bits."""
    from engram_store.engine.init import _G, _G2, _seed_salt
    from engram_store.engine.routing import fmix64

    spec = TableConfig("t", num_rows=1 << 30, dim=10, seed=123, init_std=0.5)
    ids = np.random.default_rng(0).integers(0, 1 << 30, 3000).astype(np.int64)
    base = fmix64(ids.astype(np.uint64) * _G ^ _seed_salt(spec.seed))
    h = fmix64(base[:, None] + np.arange(1, 6, dtype=np.uint64) * _G2)
    u1 = ((h >> np.uint64(40)).astype(np.float64) + 1) * 2.0**-24
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float32).astype(np.float64) * 2.0**-32 - 0.5
    r = 0.5 * np.sqrt(-2 * np.log(u1))
    want = np.empty((3000, 10))
    want[:, 0::2] = r * np.cos(2 * np.pi * u2)
    want[:, 1::2] = r * np.sin(2 * np.pi * u2)
    np.testing.assert_allclose(initial_rows(spec, ids), want, rtol=0, atol=5e-7)
