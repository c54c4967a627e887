"""Sparse optimizers, run through Shard.push, against torch.optim on nn.Embedding(sparse=True)
and against the numpy references of engine/optimizers.py."""

import numpy as np
import pytest
import torch

from engram_store.engine import kernels
from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.engine.init import initial_rows, initial_state
from engram_store.engine.optimizers import coalesce
from engram_store.engine.shard import Shard
from tests.engine.torch_ref import torch_optimizer

ROWS, DIM, STEPS = 300, 8, 6
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def _torch_state(opt: OptimizerConfig, topt, weight) -> np.ndarray:
    st = topt.state[weight]
    if opt.kind == "adagrad":
        return st["sum"].numpy()
    if opt.kind == "adam":
        return np.concatenate([st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()], axis=1)
    return np.zeros((ROWS, 0), np.float32)


@pytest.mark.parametrize(
    "opt",
    [
        OptimizerConfig(kind="sgd", lr=0.1),
        OptimizerConfig(kind="adagrad", lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
        OptimizerConfig(kind="adagrad", lr=0.5),
        OptimizerConfig(kind="adam", lr=0.01),
        OptimizerConfig(kind="adam", lr=0.003, beta1=0.8, beta2=0.99, eps=1e-6),
    ],
    ids=["sgd", "adagrad-decay", "adagrad", "adam", "adam-betas"],
)
@pytest.mark.parametrize("reopen", [False, True], ids=["open", "reopen"])
def test_push_matches_torch(tmp_path, opt, reopen):
    """Pushes with duplicate ids equal torch's sparse optimizers to 1e-6, rows and state; with
    `reopen` the shard is closed and opened again midway (state restored from LMDB)."""
    spec = TableConfig("t", num_rows=ROWS, dim=DIM, seed=5, optimizer=opt)
    all_ids = np.arange(ROWS, dtype=np.int64)
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(initial_rows(spec, all_ids)))
    topt = torch_optimizer(opt, emb.parameters())
    rng = np.random.default_rng(0)
    cfg = ShardConfig(data_dir=str(tmp_path / "s"), map_size=64 << 20)
    shard = Shard(cfg)
    try:
        shard.create_table(spec)
        for step in range(1, STEPS + 1):
            ids = rng.integers(0, ROWS // 2 if step % 2 else ROWS, 120)  # duplicates guaranteed
            # multiples of 1/64: duplicate rows sum exactly in any order, as torch's coalesce
            # may order them differently; what is compared is the optimizer's arithmetic
            grads = (np.round(rng.standard_normal((120, DIM)) * 64) / 64).astype(np.float32)
            if step == 3 and reopen:
                shard.close()
                shard = Shard(cfg)
            topt.zero_grad()
            out = emb(torch.from_numpy(ids))
            (out * torch.from_numpy(grads)).sum().backward()
            topt.step()
            res = shard.push("t", ids, grads)
            assert res.step == step and res.rows_updated == np.unique(ids).shape[0]
            np.testing.assert_allclose(
                shard.lookup("t", all_ids), emb.weight.detach().numpy(), rtol=0, atol=1e-6
            )
            np.testing.assert_allclose(
                shard.optimizer_state("t", all_ids),
                _torch_state(opt, topt, emb.weight),
                rtol=0,
                atol=1e-6,
            )
        assert shard.table_stats("t").step == STEPS
    finally:
        shard.close()


def test_coalesce_sums_duplicates():
    ids = np.array([5, 1, 5, 3, 1, 5], np.int64)
    g = np.arange(12, dtype=np.float32).reshape(6, 2)
    u, s = coalesce(ids, g)
    np.testing.assert_array_equal(u, [1, 3, 5])
    np.testing.assert_array_equal(s, [g[1] + g[4], g[3], g[0] + g[2] + g[5]])
    u, s = coalesce(np.array([2, 0], np.int64), g[:2])
    np.testing.assert_array_equal(u, [0, 2])
    np.testing.assert_array_equal(s, g[[1, 0]])


def test_bfloat16_storage_rounds_rows(tmp_path):
    spec = TableConfig(
        "t", num_rows=50, dim=4, dtype="bfloat16", optimizer=OptimizerConfig(kind="sgd", lr=0.1)
    )
    with Shard(ShardConfig(data_dir=str(tmp_path / "s"), map_size=64 << 20)) as shard:
        shard.create_table(spec)
        ids = np.arange(50, dtype=np.int64)
        before = shard.lookup("t", ids)
        g = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
        shard.push("t", ids, g)
        after = shard.lookup("t", ids)
        # stored values are bfloat16: the low 16 bits of every float32 are zero
        assert not (after.view(np.uint32) & 0xFFFF).any()
        np.testing.assert_allclose(after, before - 0.1 * g, rtol=2**-7, atol=1e-6)
        assert shard.record_bytes("t") == 4 * 2


def _is_a_neighbour(got: np.ndarray, x: np.ndarray, dtype: str) -> np.ndarray:
    """Whether each `got` is x rounded down or up to `dtype` (torch's nearest rounding and
    nextafter give the two candidates)."""
    t = torch.from_numpy(x).to(torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    toward = torch.from_numpy(np.where(t.float().numpy() < x, np.inf, -np.inf)).to(t.dtype)
    other = torch.nextafter(t, toward).float().numpy()
    return (got == t.float().numpy()) | (got == other)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam", "rowwise_adagrad", "rowwise_adam"])
def test_storage_dtypes_and_odd_dims(tmp_path, dtype, kind):
    """Each push steps the stored rows (decoded to float32) exactly as optimizers.apply does,
    state bit for bit; float32 rows equal its result, 16-bit rows are one of the two
    neighbours of it (stochastic rounding), and equal kernels.optimizer_step on a dense copy:
    the rounding depends on (seed, id, step, column) only. An odd dim leaves state unaligned in
    16-bit records."""
    from engram_store.engine import optimizers

    opt = OptimizerConfig(kind=kind, lr=0.05, initial_accumulator_value=0.2)
    spec = TableConfig("t", num_rows=40, dim=7, dtype=dtype, optimizer=opt)
    ids = np.arange(0, 40, 3, dtype=np.int64)[::-1].copy()  # unsorted on purpose
    dense = kernels.encode(initial_rows(spec, ids), dtype)
    dense_state = initial_state(spec, ids.shape[0])
    offs = np.arange(ids.shape[0], dtype=np.int64)
    rng = np.random.default_rng(2)
    with Shard(ShardConfig(data_dir=str(tmp_path / "s"), map_size=64 << 20)) as shard:
        shard.create_table(spec)
        for step in (1, 2, 3):
            before = shard.lookup("t", ids)
            state = shard.optimizer_state("t", ids)
            g = rng.standard_normal((ids.shape[0], 7)).astype(np.float32)
            shard.push("t", ids, g)
            rows, state = optimizers.apply(opt, before, state, g, step)
            got = shard.lookup("t", ids)
            np.testing.assert_array_equal(shard.optimizer_state("t", ids), state)
            if dtype == "float32":
                np.testing.assert_array_equal(got, rows)
            else:
                assert np.all(_is_a_neighbour(got, rows, dtype))
            kernels.optimizer_step(spec, dense, dense_state, offs, ids, g, step)
            np.testing.assert_array_equal(got, kernels.decode(dense, dtype, 7))
        assert shard.record_bytes("t") == spec.row_bytes + 4 * opt.state_floats(7)


def test_large_push_in_parallel_parts(tmp_path):
    """Pushes large enough to be split over two threads give the arithmetic of one contiguous
    apply(), on fresh rows (initialised) and on stored ones."""
    from engram_store.engine import optimizers

    spec = TableConfig("t", num_rows=50_000, dim=4, optimizer=OptimizerConfig(kind="adam"))
    rng = np.random.default_rng(4)
    ids = rng.permutation(50_000)[:20_000].astype(np.int64)
    order = np.argsort(ids)
    rows, state = initial_rows(spec, ids[order]), initial_state(spec, ids.shape[0])
    with Shard(ShardConfig(data_dir=str(tmp_path / "s"), map_size=256 << 20)) as shard:
        shard.create_table(spec)
        for step in (1, 2):
            g = rng.standard_normal((ids.shape[0], 4)).astype(np.float32)
            shard.push("t", ids, g)
            rows, state = optimizers.apply(spec.optimizer, rows, state, g[order], step)
            np.testing.assert_array_equal(shard.lookup("t", ids[order]), rows)
            np.testing.assert_array_equal(shard.optimizer_state("t", ids[order]), state)
