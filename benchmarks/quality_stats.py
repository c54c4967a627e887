"""Pure analysis for the quality benchmark: intervals, FLOPs, n-gram token classes, curves, tables.

benchmarks/quality.py trains the models; this module only turns what it measured into the numbers
and figures it reports, so each piece is tested on its own (tests/benchmarks/test_quality_stats.py):

- paired_interval: mean of per-seed (Engram / dense) ratios with a two-sided Student-t interval;
  the t quantile is computed here (regularized incomplete beta, no scipy).
- flops_per_token: forward FLOPs of one call as torch's FlopCounterMode counts them (matmuls
  2 x MAC, SDPA by its formula, table gathers 0), per token, and 3x that for a training step.
- ngram_classes / ngram_seen: for each validation position, whether the n-gram ending there (what an
  Engram lookup at that input position sees) occurred often enough in the training stream.
- class_losses / class_ratio: mean token loss per class mask, and the Engram / dense ratio per class.
- gate_probe: mean gate value on masked vs unmasked positions.
- svg_curves: a self-contained SVG line plot (no matplotlib), with optional min/max bands.
- ascii_table: a Markdown table for the README and the note.

numpy and torch only; nothing here reads files or trains anything (svg_curves writes its one file).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

# --------------------------------------------------------------------------------------------------
# Student-t interval


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes 6.4."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))  # even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf needs df > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1 (bisection on t_cdf to ~1e-12 relative)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the quantile grows fast as df -> 1 and p -> 1
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            raise ArithmeticError(f"t quantile p={p} df={df} is beyond 1e12")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_interval(ratios: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of per-seed ratios with a two-sided Student-t interval.

    ratios: one value per seed, each Engram / dense from the same seed (same backbone weights).
    Returns {"mean", "sd" (sample, ddof=1), "n", "lo", "hi", "half_width", "confidence"}; with n = 1
    sd, lo, hi and half_width are None and "note" says why.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(list(ratios), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("paired_interval needs at least one ratio (one per seed)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"paired_interval got a non-finite ratio: {x.tolist()}")
    n = int(x.size)
    mean = float(x.mean())
    out: dict[str, Any] = {"mean": mean, "n": n, "confidence": confidence}
    if n == 1:
        out.update(sd=None, lo=None, hi=None, half_width=None)
        out["note"] = "one seed: no interval (run >= 3 seeds)"
        return out
    sd = float(x.std(ddof=1))
    t = t_quantile(0.5 + confidence / 2.0, n - 1)
    half = t * sd / math.sqrt(n)
    out.update(sd=sd, lo=mean - half, hi=mean + half, half_width=half)
    return out


# --------------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(model: torch.nn.Module, forward: Callable[[], Any], tokens: int) -> dict:
    """Forward FLOPs per token of one call of `forward` (which runs `model` on `tokens` tokens).

    Counted by torch.utils.flop_counter.FlopCounterMode: a matmul is 2 x multiply-accumulates,
    scaled dot-product attention by torch's own formula, table lookups (embedding gathers, rows
    served by the store) 0, elementwise ops 0. The call runs under torch.no_grad().
    Returns {"forward_flops_per_token", "train_flops_per_token" (3 x forward: backward ~ 2 x),
    "forward_flops" (the whole call), "tokens", "parameters" (numel of model.parameters()),
    "by_module" ({direct child name: forward FLOPs per token}, only children that counted any)}.
    """
    if tokens <= 0:
        raise ValueError(
            f"tokens must be > 0 (the tokens one forward call processes), got {tokens}"
        )
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    total = int(counter.get_total_flops())
    root = type(model).__name__
    by_module: dict[str, float] = {}
    for name, ops in counter.get_flop_counts().items():
        # Keys are "Global", the root module's class name, and dotted paths below it.
        if not name.startswith(root + "."):
            continue
        child = name[len(root) + 1 :]
        if "." in child:
            continue
        flops = int(sum(ops.values()))
        if flops:
            by_module[child] = flops / tokens
    fwd = total / tokens
    return {
        "forward_flops_per_token": fwd,
        "train_flops_per_token": 3.0 * fwd,
        "forward_flops": total,
        "tokens": int(tokens),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "by_module": by_module,
    }


# --------------------------------------------------------------------------------------------------
# n-gram token classes


def _token_stream(name: str, x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D token stream, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and int(a.min()) < 0:
        raise ValueError(f"{name} holds a negative token id ({int(a.min())}); ids must be >= 0")
    return a


def _ngram_keys(streams: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """int64 keys of every n-gram window in each stream; equal keys iff equal n-grams (all streams).

    Window j of a stream covers tokens [j, j + n). Built one token at a time: the (k+1)-gram key is
    the k-gram prefix's key times base plus its last token. When that product could pass int64, the
    prefix keys are first re-densified over all streams (np.unique), so they stay below the number of
    windows and the keys never overflow, whatever n and the vocabulary are.
    """
    base = 1 + max((int(s.max()) for s in streams if s.size), default=0)
    lens = [max(s.size - n + 1, 0) for s in streams]
    windows = sum(lens)
    if windows * base >= 2**63:
        raise ValueError(f"{windows} n-grams over a {base}-token vocabulary overflow int64 keys")
    keys = [s[:m].copy() for s, m in zip(streams, lens, strict=True)]  # 1-gram: the token itself
    bound = base  # every key is < bound
    for k in range(1, n):
        if bound * base >= 2**63:
            _, inv = np.unique(np.concatenate(keys), return_inverse=True)
            keys = np.split(inv.astype(np.int64).reshape(-1), np.cumsum(lens)[:-1])
            bound = windows
        keys = [kk * base + s[k : k + m] for kk, s, m in zip(keys, streams, lens, strict=True)]
        bound *= base
    return keys


def ngram_classes(train: np.ndarray, val: np.ndarray, n: int, min_count: int) -> np.ndarray:
    """Per validation position j: does the n-gram ending at j occur >= min_count times in train?

    train: (T_train,) int token stream; val: (T_val,) int token stream.
    The n-gram ending at j is val[j-n+1 .. j], what an Engram lookup at input position j sees.
    Returns (T_val,) bool; False for j < n - 1 (no full n-gram yet). Occurrences are counted over
    every window of the train stream (overlapping windows count separately).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    tr = _token_stream("train", train)
    va = _token_stream("val", val)
    out = np.zeros(va.size, dtype=bool)
    if va.size < n or tr.size < n:
        return out
    tr_keys, va_keys = _ngram_keys([tr, va], n)
    uniq, counts = np.unique(tr_keys, return_counts=True)
    idx = np.searchsorted(uniq, va_keys)
    idx_c = np.minimum(idx, uniq.size - 1)
    found = (idx < uniq.size) & (uniq[idx_c] == va_keys)
    out[n - 1 :] = found & (counts[idx_c] >= min_count)
    return out


def ngram_seen(train: np.ndarray, val: np.ndarray, n: int) -> np.ndarray:
    """(T_val,) bool: the n-gram ending at each val position occurs at least once in train."""
    return ngram_classes(train, val, n, min_count=1)


# --------------------------------------------------------------------------------------------------
# Loss by class, gate probe


def _mask(name: str, mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise ValueError(f"class mask {name!r} must be bool, got dtype {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"class mask {name!r} has shape {m.shape}, the values have {shape}")
    return m


def class_losses(token_losses: np.ndarray, classes: Mapping[str, np.ndarray]) -> dict:
    """Mean token loss per class.

    token_losses: (T,) (or any shape) per-token cross-entropy in nats; classes: name -> bool mask of
    the same shape. Returns {name: {"tokens": int, "mean_loss": float | None}} for each class plus
    "all" (every token); mean_loss is None for an empty class.
    """
    losses = np.asarray(token_losses, dtype=np.float64)
    if "all" in classes:
        raise ValueError('"all" is reserved for every token; name the class something else')
    out: dict[str, dict[str, Any]] = {}
    named = {name: _mask(name, m, losses.shape) for name, m in classes.items()}
    for name, m in {"all": np.ones(losses.shape, dtype=bool), **named}.items():
        count = int(m.sum())
        out[name] = {
            "tokens": count,
            "mean_loss": float(losses[m].mean()) if count else None,
        }
    return out


def class_ratio(engram: dict, dense: dict) -> dict:
    """Per class: Engram mean loss / dense mean loss (None where either class is empty).

    engram, dense: class_losses() results over the same validation tokens and the same masks; a
    class missing from one or with a different token count is an error (they would not be paired).
    """
    if set(engram) != set(dense):
        raise ValueError(f"classes differ: engram has {sorted(engram)}, dense has {sorted(dense)}")
    out: dict[str, float | None] = {}
    for name in engram:
        e, d = engram[name], dense[name]
        if e["tokens"] != d["tokens"]:
            raise ValueError(
                f"class {name!r} has {e['tokens']} tokens for engram, {d['tokens']} for dense: "
                "compute both on the same validation stream with the same masks"
            )
        em, dm = e["mean_loss"], d["mean_loss"]
        out[name] = None if em is None or dm is None or dm == 0 else em / dm
    return out


def gate_probe(gates: np.ndarray, mask: np.ndarray) -> dict:
    """Mean gate value on masked vs unmasked positions.

    gates: (*S) or (*S, G) gate values (G heads / channels are averaged per position);
    mask: (*S) bool, e.g. ngram_classes() for the same positions.
    Returns {"masked_mean", "unmasked_mean" (None when empty), "difference" (masked - unmasked, or
    None), "masked_positions", "unmasked_positions"}.
    """
    g = np.asarray(gates, dtype=np.float64)
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise ValueError(f"mask must be bool, got dtype {m.dtype}")
    if g.shape != m.shape:
        if g.shape[:-1] != m.shape:
            raise ValueError(f"gates shape {g.shape} must be the mask's {m.shape} (+ one axis)")
        g = g.mean(axis=-1)
    on, off = g[m], g[~m]
    on_mean = float(on.mean()) if on.size else None
    off_mean = float(off.mean()) if off.size else None
    diff = on_mean - off_mean if on_mean is not None and off_mean is not None else None
    return {
        "masked_mean": on_mean,
        "unmasked_mean": off_mean,
        "difference": diff,
        "masked_positions": int(on.size),
        "unmasked_positions": int(off.size),
    }


# --------------------------------------------------------------------------------------------------
# SVG curves

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def format_number(v: float) -> str:
    """A short tick label: 1500000 -> "1.5M", 20000 -> "20k", 2.25 -> "2.25", 0 -> "0"."""
    a = abs(v)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.4g}"


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 x 10^k steps) covering [lo, hi], about `target` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"nice_ticks needs finite lo <= hi, got {lo}, {hi}")
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1.0, 2.0, 2.5, 5.0, 10.0) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * step:
        ticks.append(round(v / step) * step)
        v += step
    return ticks


def svg_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    title: str,
    xlabel: str = "tokens trained",
    ylabel: str = "validation loss",
    bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None,
) -> None:
    """Write a self-contained SVG line plot: one <polyline> per series, axes, ticks and a legend.

    series: name -> [(x, y), ...] (sorted by x here); bands: name -> [(x, lo, hi), ...], drawn as a
    shaded <polygon> in that series' colour (e.g. min/max over seeds); a band's name must be a
    series'. Tick labels use format_number ("1M" for token counts).
    """
    if not series:
        raise ValueError("svg_curves needs at least one series")
    bands = dict(bands or {})
    unknown = set(bands) - set(series)
    if unknown:
        raise ValueError(f"bands {sorted(unknown)} name no series (series: {sorted(series)})")
    pts = {}
    for name, s in series.items():
        arr = np.asarray(s, dtype=np.float64).reshape(-1, 2) if len(s) else np.zeros((0, 2))
        if arr.shape[0] == 0:
            raise ValueError(f"series {name!r} has no points")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"series {name!r} has a non-finite point")
        pts[name] = arr[np.argsort(arr[:, 0], kind="stable")]
    band_pts = {}
    for name, b in bands.items():
        arr = np.asarray(b, dtype=np.float64).reshape(-1, 3) if len(b) else np.zeros((0, 3))
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"band {name!r} has a non-finite point")
        band_pts[name] = arr[np.argsort(arr[:, 0], kind="stable")]

    xs = np.concatenate([p[:, 0] for p in pts.values()] + [b[:, 0] for b in band_pts.values()])
    ys = np.concatenate(
        [p[:, 1] for p in pts.values()] + [b[:, 1:].ravel() for b in band_pts.values()]
    )
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = (y1 - y0) * 0.05 if y1 > y0 else max(abs(y0) * 0.05, 0.5)
    y0, y1 = y0 - pad, y1 + pad

    width, height = 720, 440
    left, right, top, bottom = 70, 190, 40, 55  # plot margins; the legend sits in the right one
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + pw / 2:.1f}" y="22" text-anchor="middle" font-size="15">'
        f"{escape(title)}</text>",
    ]
    for t in nice_ticks(x0, x1):
        if x0 <= t <= x1:
            x = sx(t)
            out.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e5e5e5"/>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">'
                f"{escape(format_number(t))}</text>"
            )
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            y = sy(t)
            out.append(
                f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>'
            )
            out.append(
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                f"{escape(format_number(t))}</text>"
            )
    out.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>'
    )
    out.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 12}" text-anchor="middle">'
        f"{escape(xlabel)}</text>"
    )
    out.append(
        f'<text x="16" y="{top + ph / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + ph / 2:.1f})">{escape(ylabel)}</text>'
    )
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}
    for name, band in band_pts.items():
        if band.shape[0] == 0:
            continue
        ring = [(sx(x), sy(hi)) for x, _, hi in band]
        ring += [(sx(x), sy(lo)) for x, lo, _ in band[::-1]]
        coords = " ".join(f"{x:.2f},{y:.2f}" for x, y in ring)
        out.append(
            f'<polygon class="band" data-series="{escape(name, {chr(34): "&quot;"})}" '
            f'points="{coords}" fill="{colours[name]}" fill-opacity="0.18" stroke="none"/>'
        )
    for name, p in pts.items():
        coords = " ".join(f"{sx(x):.2f},{sy(y):.2f}" for x, y in p)
        out.append(
            f'<polyline class="series" data-series="{escape(name, {chr(34): "&quot;"})}" '
            f'points="{coords}" fill="none" stroke="{colours[name]}" stroke-width="2"/>'
        )
    for i, name in enumerate(series):
        ly = top + 12 + 20 * i
        lx = left + pw + 15
        out.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" '
            f'stroke="{colours[name]}" stroke-width="3"/>'
        )
        out.append(f'<text x="{lx + 30}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


# --------------------------------------------------------------------------------------------------
# Markdown table


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def ascii_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` in `columns` order; floats to 4 significant digits.

    A missing key or None is an empty cell; "|" in a cell is escaped. Ends without a newline.
    """
    if not columns:
        raise ValueError("ascii_table needs at least one column")
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
