"""Sparse optimizers on coalesced float32 rows, with torch.optim's arithmetic.

Every function takes rows (n, dim), their optimizer state (n, state_width * dim) and gradients
(n, dim) for n *distinct* row ids, and returns the new rows and state. The operation order copies
torch.optim.SGD / Adagrad (sparse path) / SparseAdam so float32 results agree to rounding: Python
float hyper-parameters meet float32 arrays as float32 scalars, as they do in torch's CPU kernels.
"""

from __future__ import annotations

import math

import numpy as np

from .config import OptimizerConfig


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


def sgd(opt: OptimizerConfig, rows: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """p -= lr * g."""
    return rows + np.float32(-opt.lr) * grads


def adagrad(opt: OptimizerConfig, rows: np.ndarray, state_sum: np.ndarray, grads: np.ndarray,
            step: int) -> tuple[np.ndarray, np.ndarray]:
    """torch.optim.Adagrad's sparse path: sum += g^2; p -= clr * g / (sqrt(sum) + eps)."""
    clr = opt.lr / (1 + (step - 1) * opt.lr_decay)
    state_sum = state_sum + grads * grads
    std = np.sqrt(state_sum)
    std += np.float32(opt.resolved_eps)
    return rows + np.float32(-clr) * (grads / std), state_sum


def adam(opt: OptimizerConfig, rows: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
         grads: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch.optim.SparseAdam: lazy Adam, moments of the given rows only."""
    b1, b2 = opt.beta1, opt.beta2
    # old <- old + (1 - b) * (new - old), in torch's order
    m_upd = grads - exp_avg
    m_upd *= np.float32(1 - b1)
    v_upd = grads * grads
    v_upd -= exp_avg_sq
    v_upd *= np.float32(1 - b2)
    exp_avg = exp_avg + m_upd
    exp_avg_sq = exp_avg_sq + v_upd
    denom = np.sqrt(exp_avg_sq)
    denom += np.float32(opt.resolved_eps)
    step_size = opt.lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    upd = exp_avg / denom
    upd *= np.float32(-step_size)
    return rows + upd, exp_avg, exp_avg_sq


def apply(opt: OptimizerConfig, rows: np.ndarray, state: np.ndarray, grads: np.ndarray,
          step: int) -> tuple[np.ndarray, np.ndarray]:
    """New (rows, state) after one optimizer step on coalesced rows; `step` is 1-based."""
    if step < 1:
        raise ValueError(f"optimizer step {step} must be >= 1")
    if opt.kind == "sgd":
        return sgd(opt, rows, grads), state
    if opt.kind == "adagrad":
        return adagrad(opt, rows, state, grads, step)
    if opt.kind == "adam":
        dim = rows.shape[1]
        new_rows, m, v = adam(opt, rows, state[:, :dim], state[:, dim:], grads, step)
        return new_rows, np.concatenate([m, v], axis=1)
    raise ValueError(f"optimizer {opt.kind!r} is unknown")
