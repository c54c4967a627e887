"""Sparse optimizers on coalesced float32 rows, with torch.optim's arithmetic.

Every function takes rows (n, dim), their optimizer state (n, state_width * dim) and gradients
(n, dim) for n *distinct* row ids, and returns the new rows and state. The operation order copies
torch.optim.SGD / Adagrad (sparse path) / SparseAdam so float32 results agree to rounding: Python
float hyper-parameters meet float32 arrays as float32 scalars, as they do in torch's CPU kernels.
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
    if opt.kind == "adam":
        new_rows, _, _ = adam(
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
