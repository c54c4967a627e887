"""Sparse optimizers on coalesced float32 rows: the numpy reference of engine.kernels.

Every function takes rows (n, dim), their optimizer state (n, OptimizerConfig.state_floats(dim))
and gradients (n, dim) for n *distinct* row ids, and returns the new rows and state. The operation
order copies torch.optim.SGD / Adagrad (sparse path) / SparseAdam so float32 results agree to
rounding: Python float hyper-parameters meet float32 arrays as float32 scalars, as they do in
torch's CPU kernels. The row-wise optimizers follow FBGEMM's table-batched-embedding optimizers
(fbgemm_gpu/codegen/genscript/optimizers.py) in float32. The compiled kernels
(engine.kernels.optimizer_step) do the same operations in the same order, so they agree with
these functions bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

from engram_store.engine.config import OptimizerConfig


def coalesce(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and the float32 sum of their gradient rows (duplicates summed)."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sids = ids[order]
    if sids.shape[0] < 2 or bool(np.all(sids[1:] != sids[:-1])):
        return sids, grads[order]
    starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
    # reduceat sums each run of equal ids in gradient order, like torch's coalesce
    return sids[starts], np.add.reduceat(grads[order], starts, axis=0)


def sgd(
    opt: OptimizerConfig, rows: np.ndarray, grads: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """p -= lr * g."""
    upd = grads * np.float32(-opt.lr)
    return np.add(rows, upd, out=out)


def adagrad(
    opt: OptimizerConfig,
    rows: np.ndarray,
    state_sum: np.ndarray,
    grads: np.ndarray,
    step: int,
    out_rows: np.ndarray | None = None,
    out_sum: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """torch.optim.Adagrad's sparse path: sum += g^2; p -= clr * g / (sqrt(sum) + eps)."""
    clr = opt.lr / (1 + (step - 1) * opt.lr_decay)
    state_sum = np.add(state_sum, grads * grads, out=out_sum)
    std = np.sqrt(state_sum)
    std += np.float32(opt.resolved_eps)
    np.divide(grads, std, out=std)
    std *= np.float32(-clr)
    return np.add(rows, std, out=out_rows), state_sum


def adam(
    opt: OptimizerConfig,
    rows: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    grads: np.ndarray,
    step: int,
    out_rows: np.ndarray | None = None,
    out_avg: np.ndarray | None = None,
    out_avg_sq: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch.optim.SparseAdam: lazy Adam, moments of the given rows only."""
    b1, b2 = opt.beta1, opt.beta2
    # old <- old + (1 - b) * (new - old), in torch's order
    upd = grads - exp_avg
    upd *= np.float32(1 - b1)
    exp_avg = np.add(exp_avg, upd, out=out_avg)
    np.multiply(grads, grads, out=upd)
    upd -= exp_avg_sq
    upd *= np.float32(1 - b2)
    exp_avg_sq = np.add(exp_avg_sq, upd, out=out_avg_sq)
    denom = np.sqrt(exp_avg_sq, out=upd)
    denom += np.float32(opt.resolved_eps)
    step_size = opt.lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    np.divide(exp_avg, denom, out=denom)
    denom *= np.float32(-step_size)
    return np.add(rows, denom, out=out_rows), exp_avg, exp_avg_sq


def _row_mean_sq(grads: np.ndarray) -> np.ndarray:
    """float32 (n,) mean of g^2 over each row, summed column by column in float32 (the order of
    FBGEMM's CPU loop and of the compiled kernel)."""
    acc = np.zeros(grads.shape[0], np.float32)
    for j in range(grads.shape[1]):
        acc += grads[:, j] * grads[:, j]
    return acc / np.float32(grads.shape[1])


def rowwise_adagrad(
    opt: OptimizerConfig,
    rows: np.ndarray,
    acc: np.ndarray,
    grads: np.ndarray,
    step: int,
    out_rows: np.ndarray | None = None,
    out_acc: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FBGEMM's EXACT_ROWWISE_ADAGRAD, one float32 accumulator per row (acc: (n, 1)):
    acc += mean(g^2 over the row); p -= g * (clr / (sqrt(acc) + eps)).

    clr = lr / (1 + (step - 1) * lr_decay) as in torch's Adagrad (FBGEMM has no decay: lr_decay
    0 gives its update exactly)."""
    clr = opt.lr / (1 + (step - 1) * opt.lr_decay)
    new_acc = np.add(acc, _row_mean_sq(grads)[:, None], out=out_acc)
    mult = np.sqrt(new_acc)
    mult += np.float32(opt.resolved_eps)
    np.divide(np.float32(clr), mult, out=mult)
    return np.subtract(rows, grads * mult, out=out_rows), new_acc


def rowwise_adam(
    opt: OptimizerConfig,
    rows: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    grads: np.ndarray,
    step: int,
    out_rows: np.ndarray | None = None,
    out_avg: np.ndarray | None = None,
    out_avg_sq: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FBGEMM's PARTIAL_ROWWISE_ADAM: an element-wise first moment (n, dim) and a row-wise
    second moment (n, 1) of mean(g^2), bias-corrected; lazy like SparseAdam (rows not pushed
    keep their moments and `step` is the table's):
    v = v b2 + mean(g^2) (1 - b2); m = m b1 + g (1 - b1);
    p -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)).

    FBGEMM's CUDA kernel fuses m's update into one fma and evaluates the bias corrections in
    double; here every operation is one float32 rounding (the difference is a few ulp)."""
    b1, b2 = np.float32(opt.beta1), np.float32(opt.beta2)
    new_v = np.multiply(exp_avg_sq, b2, out=out_avg_sq)
    new_v += _row_mean_sq(grads)[:, None] * np.float32(1 - opt.beta2)
    den = new_v / np.float32(1 - opt.beta2**step)
    np.sqrt(den, out=den)
    den += np.float32(opt.resolved_eps)
    new_m = np.multiply(exp_avg, b1, out=out_avg)
    new_m += grads * np.float32(1 - opt.beta1)
    upd = new_m / np.float32(1 - opt.beta1**step)
    upd /= den
    upd *= np.float32(opt.lr)
    return np.subtract(rows, upd, out=out_rows), new_m, new_v


def apply(
    opt: OptimizerConfig,
    rows: np.ndarray,
    state: np.ndarray,
    grads: np.ndarray,
    step: int,
    out_rows: np.ndarray | None = None,
    out_state: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """New (rows, state) after one optimizer step on coalesced rows; `step` is 1-based.

    `out_rows` / `out_state` (float32, maybe strided views) receive the results if given; they
    must not overlap the inputs.
    """
    if step < 1:
        raise ValueError(f"optimizer step {step} must be >= 1")
    dim = rows.shape[1]
    if out_state is None:
        out_state = np.empty(state.shape, np.float32)
    if opt.kind == "sgd":
        return sgd(opt, rows, grads, out_rows), out_state
    if opt.kind == "adagrad":
        return adagrad(opt, rows, state, grads, step, out_rows, out_state)
    if opt.kind == "rowwise_adagrad":
        return rowwise_adagrad(opt, rows, state, grads, step, out_rows, out_state)
    if opt.kind in ("adam", "rowwise_adam"):
        # state = first moment (dim), then the second (dim, or one per row)
        new_rows, _, _ = (adam if opt.kind == "adam" else rowwise_adam)(
            opt,
            rows,
            state[:, :dim],
            state[:, dim:],
            grads,
            step,
            out_rows,
            out_state[:, :dim],
            out_state[:, dim:],
        )
        return new_rows, out_state
    raise ValueError(f"optimizer {opt.kind!r} is unknown")
