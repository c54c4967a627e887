"""Run every benchmark in quick mode, collect their JSON, draw the figures, write RESULTS.md.

    python benchmarks/run_all.py                 # all benchmarks, quick; results/ (~10-15 min, 2 CPUs)
    python benchmarks/run_all.py --readme        # ... and copy RESULTS.md into README.md
    python benchmarks/run_all.py --only wire,redis
    python benchmarks/run_all.py --report-only --readme   # redraw/rewrite from results/*.json

Each benchmark runs as a subprocess with a timeout; the last stdout line that parses as a JSON
object becomes results/<name>.json. A benchmark that is missing, fails, times out or prints no JSON
is written as {"status": ...} and listed as such in the table. Logs go to results/tmp/ (git-ignored).
Figures: quality_loss.png (validation loss vs tokens per corpus, Engram vs the dense arms, mean of
seeds with min-max bands, and the allocation sweeps),
lookup_vs_batch.png (store / raw gRPC / Redis), prefetch_stall.png (stall vs prefetch depth).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Bench:
    """One benchmark script: its quick arguments (used when it has no --quick flag) and timeout."""

    name: str
    script: str
    fallback_args: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    timeout_s: int = 300


BENCHES = (
    Bench("lookup", "bench_lookup.py", ("--iters", "3", "--table-rows", "131072"), timeout_s=240),
    Bench("push", "bench_push.py", ("--iters", "3", "--table-rows", "131072"), timeout_s=600),
    Bench("memory", "bench_memory.py", timeout_s=900),
    Bench("serve_v41", "bench_serve_v41.py", timeout_s=300),
    Bench(
        "scale",
        "bench_scale.py",
        ("--clients", "2", "--seconds", "3", "--shards", "1,2,4", "--stored", "50000"),
        timeout_s=420,
    ),
    Bench("prefetch", "bench_prefetch.py", timeout_s=360),
    Bench("redis", "bench_redis.py", timeout_s=360),
    Bench("wire", "bench_wire.py", timeout_s=300),
    Bench("quality", "quality.py", timeout_s=1500),
)


# ------------------------------------------------------------------------------------- run


def _supports_quick(path: Path) -> bool:
    return '"--quick"' in path.read_text(encoding="utf-8", errors="replace")


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def run_bench(b: Bench, out: Path, quick: bool) -> dict:
    """Run one benchmark; write out/<name>.json; return its run record."""
    path = BENCH / b.script
    rel = f"benchmarks/{b.script}"
    rec: dict = {"name": b.name, "script": rel}
    if not path.exists():
        rec.update(status="missing", command=None, wall_s=0.0)
        (out / f"{b.name}.json").write_text(json.dumps({"status": "missing", "script": rel}) + "\n")
        return rec
    args = list(b.extra_args)
    if b.name == "quality":  # its SVGs and quality_curves.json go beside its JSON
        args += ["--out", str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)]
    if quick:
        args = (["--quick"] if _supports_quick(path) else list(b.fallback_args)) + args
    cmd = [sys.executable, rel, *args]
    rec["command"] = "python " + " ".join(shlex.quote(a) for a in cmd[1:])
    log_dir = out / "tmp"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    timeout = b.timeout_s if quick else 8 * b.timeout_s  # full mode trains far longer
    rec["load_before"] = round(os.getloadavg()[0], 2)
    rec["date"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    print(f"[run_all] {b.name}: {rec['command']}", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = p.stdout, p.stderr, p.returncode
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        stdout = (
            e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        )
        stderr = (
            e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        )
        rc, status = None, "timeout"
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["load_after"] = round(os.getloadavg()[0], 2)
    rec["rc"] = rc
    (log_dir / f"{b.name}.log").write_text(
        f"$ {rec['command']}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    )
    result = _last_json(stdout)
    if status == "ok" and result is None:
        status = "no-json"
    if status != "ok":
        tail = (stderr or stdout).strip().splitlines()[-3:]
        rec["error"] = " | ".join(tail)[-400:] or f"exit status {rc}"
        if status == "timeout":
            rec["error"] = f"no result within {timeout} s"
    rec["status"] = status
    payload = (
        result
        if status == "ok"
        else {
            "status": status,
            "script": rel,
            "rc": rc,
            "error": rec.get("error"),
            "partial": result,
        }
    )
    (out / f"{b.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"[run_all] {b.name}: {status} in {rec['wall_s']} s", file=sys.stderr, flush=True)
    return rec


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_ARM_COLORS = {
    "engram": "tab:blue",
    "dense": "tab:gray",
    "dense_isoflop": "black",
    "dense_isoparam": "tab:green",
}


def _curve_sets(c: object) -> dict[str, dict[str, list[list[list[float]]]]]:
    """{corpus: {arm: [curve per seed]}} from quality_curves.json's
    {corpus: {arm: [{seed, curve: [[tokens, loss], ...]}]}}; anything else (an older file) is
    dropped, so the result may be empty."""
    out: dict[str, dict[str, list[list[list[float]]]]] = {}
    if not isinstance(c, dict):
        return out
    for corpus, arms in c.items():
        if not isinstance(arms, dict):
            continue
        per_arm = {}
        for arm, runs in arms.items():
            if not isinstance(runs, list):
                continue
            curves = [
                r["curve"]
                for r in runs
                if isinstance(r, dict) and isinstance(r.get("curve"), list) and r["curve"]
            ]
            if curves:
                per_arm[arm] = curves
        if per_arm:
            out[corpus] = per_arm
    return out


def plot_quality(out: Path) -> str | None:
    """quality_loss.png: validation loss vs training tokens, one panel per corpus, each arm's
    mean over seeds with a min-max band (from quality_curves.json), and the allocation sweep
    when quality.json has one; None when there is nothing to draw."""
    path = out / "quality_curves.json"
    if not path.exists():
        return None
    try:
        sets = _curve_sets(json.loads(path.read_text()))
    except json.JSONDecodeError:
        return None
    sw = (_load(out, "quality") or {}).get("sweep")
    sweep = [
        s
        for s in (sw.get("rows") or [] if isinstance(sw, dict) else [])
        if isinstance(s, dict) and s.get("tune_loss") is not None
    ]
    if not sets:
        return None
    plt = _plt()
    n = len(sets) + (1 if sweep else 0)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, (corpus, arms) in zip(axes[0], sets.items(), strict=False):
        seeds = 0
        for arm, curves in arms.items():
            k = min(len(cv) for cv in curves)
            xs = [cv_pt[0] for cv_pt in curves[0][:k]]
            ys = [[cv[i][1] for cv in curves] for i in range(k)]
            color = _ARM_COLORS.get(arm)
            mean = [sum(y) / len(y) for y in ys]
            ax.plot(xs, mean, color=color, lw=1.5, marker="o", ms=2.5, label=arm)
            if len(curves) > 1:
                ax.fill_between(
                    xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.15, lw=0
                )
            seeds = max(seeds, len(curves))
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{Path(corpus).name}: mean of {seeds} seed(s), min-max band", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if sweep:
        ax = axes[0][-1]
        for kind, color in (("total parameters", "tab:green"), ("FLOPs (backbone)", "tab:purple")):
            pts = sorted(
                (s for s in sweep if s.get("held_fixed") == kind),
                key=lambda s: s.get("table_fraction", 0.0),
            )
            if not pts:
                continue
            xs = [100 * s.get("table_fraction", 0.0) for s in pts]
            ys = [s["tune_loss"] for s in pts]
            ax.plot(xs, ys, marker="o", color=color, label=f"{kind} held fixed")
            for s, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(
                    f"w={s.get('n_embd')}",
                    (x, y),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 4),
                )
        ax.axvspan(20, 25, color="tab:orange", alpha=0.15, label="paper optimum (20-25%)")
        ax.set_xlabel("% of parameters in Engram tables")
        ax.set_ylabel("tuning-split loss")
        ax.set_title("Allocation sweeps (tuning split)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality_loss.png", dpi=110)
    plt.close(fig)
    return "quality_loss.png"


def plot_lookup(out: Path) -> str | None:
    r = _load(out, "redis") or {}
    sweep = r.get("batch_sweep")
    if not sweep:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bs = [s["batch"] for s in sweep]
    for key, label, color in (
        ("store_rows_per_s", "engram store (StoreClient)", "tab:blue"),
        ("raw_grpc_rows_per_s", "raw gRPC (same bytes, no work)", "tab:gray"),
        ("redis_rows_per_s", "Redis (pipelined MGET)", "tab:red"),
    ):
        ax.plot(bs, [s[key] for s in sweep], marker="o", label=label, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows per lookup")
    ax.set_ylabel("rows / s")
    ax.set_title(f"Lookup throughput vs batch size (dim {r.get('dim')}, float32)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "lookup_vs_batch.png", dpi=110)
    plt.close(fig)
    return "lookup_vs_batch.png"


def _depth_series(obj) -> list[dict]:
    """The first list of dicts in `obj` whose items carry a depth and a stall figure."""
    if isinstance(obj, list):
        if (
            obj
            and all(isinstance(x, dict) for x in obj)
            and any("depth" in k for k in obj[0])
            and any("stall" in k for k in obj[0])
        ):
            return obj
        for x in obj:
            found = _depth_series(x)
            if found:
                return found
    elif isinstance(obj, dict):
        for v in obj.values():
            found = _depth_series(v)
            if found:
                return found
    return []


def plot_prefetch(out: Path) -> str | None:
    r = _load(out, "prefetch")
    series = _depth_series(r) if r else []
    if not series:
        return None
    dkey = next(k for k in series[0] if "depth" in k)
    skeys = [k for k in series[0] if "stall" in k and isinstance(series[0][k], (int, float))]
    if not skeys:
        return None
    groups: dict[str, list[dict]] = {}
    for s in series:
        label = ", ".join(f"{k}={s[k]}" for k in ("update", "mode", "backend") if k in s) or "run"
        groups.setdefault(label, []).append(s)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    skey = next((k for k in skeys if "pct" in k), skeys[0])
    for label, items in groups.items():
        items = sorted(items, key=lambda s: s[dkey])
        ax.plot([s[dkey] for s in items], [s[skey] for s in items], marker="o", label=label)
    ax.set_xlabel("prefetch depth (batches ahead)")
    ax.set_ylabel("stall, % of step time" if "pct" in skey else skey)
    ax.set_xticks(sorted({s[dkey] for s in series}))
    ax.set_title("Prefetch stall vs depth (store backend, async updates)")
    if len(groups) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "prefetch_stall.png", dpi=110)
    plt.close(fig)
    return "prefetch_stall.png"


# ----------------------------------------------------------------------------- report


def _load(out: Path, name: str) -> dict | None:
    p = out / f"{name}.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        a = abs(x)
        if a >= 1000:
            return f"{x:,.0f}"
        if a >= 100:
            return f"{x:.0f}"
        if a >= 1:
            return f"{x:.2f}"
        return f"{x:.3f}"
    return str(x)


Row = tuple[str, str, str, str]  # figure, value, target, status


def _check(value, op: str, target: float) -> str:
    if value is None:
        return "MISS (no value)"
    ok = value >= target if op == ">=" else value <= target
    return "PASS" if ok else "MISS"


def rows_lookup(r: dict) -> list[Row]:
    v = r.get("ratio_lookup_vs_raw_grpc")
    t = r.get("target_ratio", 0.6)
    return [
        (
            f"store lookup vs raw gRPC (time ratio, {_fmt(r.get('rows'))} rows x {r.get('dim')})",
            _fmt(v),
            f">= {t}",
            _check(v, ">=", t),
        ),
        ("store lookup rows/s", _fmt(r.get("store_rows_per_s")), "—", "info"),
    ]


def rows_push(r: dict) -> list[Row]:
    t = r.get("targets", {})
    out = []
    for key, label, target in (
        ("inprocess_adam_rows_per_s", "in-process", t.get("inprocess", 1e6)),
        ("grpc_adam_rows_per_s", "over gRPC, one at a time", t.get("grpc", 0.7e6)),
    ):
        v = r.get(key)
        out.append(
            (
                f"Adam push rows/s {label} ({_fmt(r.get('rows_per_push'))} distinct rows x "
                f"{r.get('dim')} into {_fmt(r.get('table_rows'))}, committed)",
                _fmt(v),
                f">= {_fmt(float(target))}",
                _check(v, ">=", target),
            )
        )
    if "grpc_two_in_flight_rows_per_s" in r:
        v = r["grpc_two_in_flight_rows_per_s"]
        out.append(("Adam push rows/s over gRPC, 2 in flight", _fmt(v), "—", "info"))
    if "inprocess_vs_torch" in r:
        v = r["inprocess_vs_torch"]
        out.append(("in-process push / torch SparseAdam rows/s", _fmt(v), "—", "info"))
    return out


def rows_memory(r: dict) -> list[Row]:
    out = []
    targets = r.get("targets", {})
    for fmt, b in r.get("bytes_per_param", {}).items():
        t = targets.get(fmt)
        v = b.get("rss_bytes_per_param")
        out.append(
            (
                f"RSS B/param, {fmt} ({_fmt(r.get('rows'))} rows x {r.get('dim')} touched; disk "
                f"{_fmt(b.get('disk_bytes_per_param'))})",
                _fmt(v),
                f"<= {t}" if t else "—",
                _check(v, "<=", t) if t else "info",
            )
        )
    return out


def rows_serve_v41(r: dict) -> list[Row]:
    return [
        (
            f"V4.1 geometry lookups, {fmt} vs raw gRPC ({_fmt(r.get('rows_per_token'))} rows a token)",
            _fmt(r.get(key)),
            "—",
            "info",
        )
        for fmt, key in (
            ("fp8", "ratio_fp8_vs_raw_grpc"),
            ("bf16", "ratio_bf16_vs_raw_grpc"),
            ("fp32", "ratio_fp32_vs_raw_grpc"),
        )
        if r.get(key) is not None
    ]


def rows_scale(r: dict) -> list[Row]:
    out = []
    by = r.get("lookup_rows_per_s") or {}
    if by:
        out.append(
            (
                "lookup rows/s at " + "/".join(f"{k}" for k in by) + " shards",
                " / ".join(_fmt(v) for v in by.values()),
                "—",
                "info",
            )
        )
    rs = r.get("reshard") or {}
    if rs:
        out.append(
            (
                f"live reshard {rs.get('from')}->{rs.get('to')}: lowest 0.25 s bin dip",
                f"{_fmt(rs.get('dip_pct'))}% ({_fmt(rs.get('moved_rows'))} rows in "
                f"{_fmt(rs.get('duration_s'))} s)",
                "—",
                "info",
            )
        )
    return out + _generic_target_rows(r)


def rows_prefetch(r: dict) -> list[Row]:
    if "ratio_store_prefetch_vs_local" not in r:
        return rows_generic(r)
    t = r.get("target_ratio", 1.02)
    ms = r.get("step_ms") or {}
    out = [
        (
            f"step time, store + prefetch depth 1 / in-process tables ({_fmt(ms.get('store_depth1'))}"
            f" vs {_fmt(ms.get('local'))} ms)",
            _fmt(r["ratio_store_prefetch_vs_local"]),
            f"<= {t}",
            _check(r["ratio_store_prefetch_vs_local"], "<=", t),
        )
    ]
    if r.get("depths"):
        out.append(
            (
                "stall % of step time at prefetch depth "
                + "/".join(str(d["prefetch_depth"]) for d in r["depths"]),
                " / ".join(_fmt(float(d["stall_pct"])) for d in r["depths"]),
                "—",
                "info",
            )
        )
    return out


def rows_redis(r: dict) -> list[Row]:
    if r.get("skipped"):
        return [("Redis baseline", "skipped", ">= 10x", f"SKIPPED: {r.get('reason')}")]
    t = r.get("target_ratio", 10)
    return [
        (
            f"lookup: store / Redis rows/s ({_fmt(r.get('store_lookup_rows_per_s'))} vs "
            f"{_fmt(r.get('redis_lookup_rows_per_s'))})",
            f"{_fmt(r.get('lookup_ratio'))}x",
            f">= {t}x",
            _check(r.get("lookup_ratio"), ">=", t),
        ),
        (
            f"Adam push: store / Redis RMW rows/s ({_fmt(r.get('store_push_rows_per_s'))} vs "
            f"{_fmt(r.get('redis_push_rows_per_s'))})",
            f"{_fmt(r.get('push_ratio'))}x",
            f">= {t}x",
            _check(r.get("push_ratio"), ">=", t),
        ),
        (
            "same rows in both after the same pushes (max abs diff)",
            _fmt(r.get("rows_match_after_pushes_max_abs_diff")),
            "0",
            "PASS" if r.get("rows_match_after_pushes_max_abs_diff") == 0 else "MISS",
        ),
    ]


def rows_wire(r: dict) -> list[Row]:
    t = r.get("target_ratio", 0.5)
    best = r.get("best_policy")
    default = (r["default_batch"]["batch_size"], r["default_batch"]["seq_len"])
    out = []
    for run in r.get("runs", []):
        if run["policy"] not in ("dedup", best):
            continue
        is_default = (run["batch_size"], run["seq_len"]) == default
        status = "info"
        if run["policy"] == best:
            status = _check(run["lookup_ratio_vs_naive"], "<=", t)
            if not is_default:
                status = f"info (would {status})"
        shape = f"{run['batch_size']}x{run['seq_len']}" + (
            " (trainer default)" if is_default else ""
        )
        out.append(
            (
                f"lookup rows/token vs naive, {run['policy']}, batch {shape}: "
                f"{run['lookup_rows_per_token']:.2f} of {run['naive_rows_per_token']}",
                _fmt(run["lookup_ratio_vs_naive"]),
                f"<= {t}",
                status,
            )
        )
    return out


OLD_QUALITY = (
    "quality.json predates the per-corpus format (no 'corpora'): rerun benchmarks/quality.py "
    "--quick --out results (or run_all.py --only quality)"
)


def _quality_corpora(r: dict) -> dict[str, dict] | None:
    """quality.json's {corpus: entry} (a merged --budget run's as "<corpus> --budget"), or None
    for a JSON in the old single-run format."""
    c = r.get("corpora") if isinstance(r, dict) else None
    if not isinstance(c, dict):
        return None
    out = {k: v for k, v in c.items() if isinstance(v, dict)}
    budget = r.get("budget")  # a --budget run's report, merged in (README "Quality")
    if isinstance(budget, dict) and isinstance(budget.get("corpora"), dict):
        out.update(
            {f"{k} --budget": v for k, v in budget["corpora"].items() if isinstance(v, dict)}
        )
    return out


def _interval(ci: dict | None, digits: int = 3) -> str:
    """'mean [lo, hi]' of a quality_stats.paired_interval dict ('mean' alone with one seed)."""
    if not ci or ci.get("mean") is None:
        return "—"
    s = f"{ci['mean']:.{digits}f}"
    if ci.get("lo") is not None and ci.get("hi") is not None:
        s += f" [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"
    return s


def rows_quality(r: dict) -> list[Row]:
    corpora = _quality_corpora(r)
    if corpora is None:
        return [("Engram / dense validation loss", "—", "—", f"SKIPPED: {OLD_QUALITY}")]
    t = r.get("target_ratio", 0.97)
    out: list[Row] = []
    for name, e in corpora.items():
        label = Path(name).name
        vl = e.get("val_loss") or {}
        iso = e.get("ratio_vs_dense_isoflop") or {}
        n = iso.get("n", 0)
        conf = round(100 * iso.get("confidence", 0.95))
        status = "PASS" if e.get("meets_target") else "MISS"
        if n < 2:
            status += " (one seed: no interval)"
        out.append(
            (
                f"{label}: validation loss Engram / dense_isoflop, mean of {n} seeds "
                f"[{conf}% lo, hi] ({_fmt((vl.get('engram') or {}).get('mean'))} vs "
                f"{_fmt((vl.get('dense_isoflop') or {}).get('mean'))})",
                _interval(iso),
                f"<= {t}, upper end < 1.0",
                status,
            )
        )
        same = e.get("ratio_vs_dense") or {}
        if same.get("n"):  # a --no-dense run has no same-width arm
            out.append(
                (
                    f"{label}: same, vs dense with the same backbone (no widening; backbone init "
                    f"identical: {e.get('backbone_init_identical')})",
                    _interval(same),
                    "—",
                    "info",
                )
            )
        isop = e.get("ratio_vs_dense_isoparam")
        if isop:
            out.append(
                (
                    f"{label}: same, vs dense_isoparam (widened to the total parameters)",
                    _interval(isop),
                    "—",
                    "info",
                )
            )
        spreads = [
            (arm, s)
            for arm, s in vl.items()
            if arm != "engram" and isinstance(s, dict) and s.get("sd_pct") is not None
        ]
        if spreads:
            out.append(
                (
                    f"{label}: dense arms' seed spread, sd % of mean val loss ("
                    + " / ".join(arm for arm, _ in spreads)
                    + ")",
                    " / ".join(f"{s['sd_pct']:.2f}%" for _, s in spreads),
                    "—",
                    "info",
                )
            )
        where = e.get("where") or {}
        classes = where.get("classes") or {}
        for cls, what in (
            ("frequent_2gram", "a frequent 2-gram"),
            ("unseen_2gram", "a 2-gram unseen in training"),
        ):
            c = classes.get(cls)
            if not c:
                continue
            out.append(
                (
                    f"{label}: same ratio on targets after {what} ({_fmt(c.get('tokens'))} "
                    f"tokens, {100 * (c.get('share') or 0):.0f}%)",
                    _interval(c.get("ratio")),
                    "—",
                    "info",
                )
            )
        gates = where.get("gate_mean") or {}
        if gates.get("frequent_2gram") is not None or gates.get("unseen_2gram") is not None:
            out.append(
                (
                    f"{label}: mean Engram gate, after a frequent vs an unseen 2-gram",
                    f"{_fmt(gates.get('frequent_2gram'))} vs {_fmt(gates.get('unseen_2gram'))}",
                    "—",
                    "info",
                )
            )
    st = r.get("study")
    if isinstance(st, dict) and st.get("best"):
        row: dict = next((x for x in st.get("rows", []) if x.get("variant") == st["best"]), {})
        out.append(
            (
                f"recipe chosen on {st.get('corpus')}'s tuning split ({len(st.get('rows', []))} "
                f"variants): {st['best']} (tuning ratio vs dense_isoflop "
                f"{_fmt(row.get('ratio_vs_dense_isoflop'))})",
                str((r.get("recipe") or {}).get("label", "—")),
                "—",
                "info",
            )
        )
    sw = r.get("sweep")
    if isinstance(sw, dict) and sw.get("rows"):
        best = []
        for kind in dict.fromkeys(x.get("held_fixed") for x in sw["rows"]):
            pts = [x for x in sw["rows"] if x.get("held_fixed") == kind]
            b = min(pts, key=lambda x: x.get("tune_loss", float("inf")))
            best.append(
                f"{kind} fixed: {100 * b.get('table_fraction', 0):.0f}% in tables, "
                f"w={b.get('n_embd')}, loss {_fmt(b.get('tune_loss'))}"
            )
        out.append(
            (
                f"allocation sweeps: best point (tuning loss, {_fmt(sw.get('tokens_per_run'))} "
                "tokens a run)",
                "; ".join(best),
                "paper: 20-25%",
                "info",
            )
        )
    sc = r.get("store_check")
    if isinstance(sc, dict) and sc.get("val_loss_diff") is not None:
        out.append(
            (
                f"store check: val loss through the store - local ({sc.get('steps')} steps)",
                f"{sc['val_loss_diff']:+.4f}",
                "—",
                "info",
            )
        )
    return out


def _generic_target_rows(r: dict) -> list[Row]:
    if "meets_target" not in r:
        return []
    tkeys = [k for k in r if k.startswith("target")]
    target = ", ".join(f"{k}={r[k]}" for k in tkeys) or "—"
    return [
        (
            "meets_target (as the script reports it)",
            str(r["meets_target"]),
            target,
            "PASS" if r["meets_target"] else "MISS",
        )
    ]


def rows_generic(r: dict) -> list[Row]:
    rows = _generic_target_rows(r)
    if not rows:
        nums = {
            k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        rows = [(k, _fmt(v), "—", "info") for k, v in list(nums.items())[:6]]
    return rows


ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "lookup": rows_lookup,
    "push": rows_push,
    "memory": rows_memory,
    "serve_v41": rows_serve_v41,
    "scale": rows_scale,
    "prefetch": rows_prefetch,
    "redis": rows_redis,
    "wire": rows_wire,
    "quality": rows_quality,
}


def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        ram = round(int(m.group(1)) / 1024**2, 1) if m else None
    except OSError:
        pass
    info = {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def write_report(out: Path, meta: dict) -> str:
    """RESULTS.md from results/*.json and the run record; returns its text."""
    figures = [f for f in (plot_quality(out), plot_lookup(out), plot_prefetch(out)) if f]
    m = meta["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, {m['os']}, "
        f"Python {m['python']}" + (f", torch {m['torch']}" if m.get("torch") else ""),
        f"- Command: `{meta['command']}` (every script in quick mode, one after another; each "
        "script's JSON is in `results/<name>.json`, its command below)"
        + (
            "; benchmarks outside --only keep their earlier results (see Started below)"
            if "--only" in meta["command"]
            else ""
        ),
        "- Timings come from a shared machine: the 1-minute load average before and after each "
        "script is listed; a load above the CPU count means other work competed for the CPUs. "
        f"Scripts run with OMP_NUM_THREADS={meta.get('omp_threads', '1')} (torch on one thread: "
        "its spinning OpenMP threads run ~10x slower than one thread when the CPUs are "
        "oversubscribed).",
        "",
        "| Benchmark | Figure | Value | Target | Status |",
        "|---|---|---|---|---|",
    ]
    for rec in meta["runs"]:
        name = rec["name"]
        if rec["status"] != "ok":
            what = {
                "missing": f"script {rec['script']} not found",
                "timeout": rec.get("error", "timeout"),
                "failed": f"exit {rec.get('rc')}: {rec.get('error', '')}",
                "no-json": "no JSON line printed",
            }.get(rec["status"], rec["status"])
            what = what.replace("|", "/")
            lines.append(f"| {name} | — | — | — | {rec['status'].upper()}: {what} |")
            continue
        r = _load(out, name) or {}
        for fig, val, tgt, status in ROWS.get(name, rows_generic)(r) or rows_generic(r):
            lines.append(f"| {name} | {fig} | {val} | {tgt} | {status} |")
    lines += [
        "",
        "## Runs",
        "",
        "| Benchmark | Command | Started | Status | Wall (s) | Load before/after |",
        "|---|---|---|---|---|---|",
    ]
    for rec in meta["runs"]:
        cmd = f"`{rec['command']}`" if rec.get("command") else "—"
        lines.append(
            f"| {rec['name']} | {cmd} | {rec.get('date', '—')} | "
            f"{rec['status']} | {rec.get('wall_s', 0)} | "
            f"{rec.get('load_before', '—')} / {rec.get('load_after', '—')} |"
        )
    lines += _notes(out)
    lines += _why(out)
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{f}]({f})" for f in figures]
    text = "\n".join(lines) + "\n"
    (out / "RESULTS.md").write_text(text)
    return text


def _quality_notes(q: dict) -> list[str]:
    """The setup lines of quality.json: data per split, tokens and seeds, the models."""
    corpora = _quality_corpora(q)
    if corpora is None:
        return [f"- quality: {OLD_QUALITY}."]
    rec = q.get("recipe") or {}
    notes = [
        f"- quality: {q.get('mode', '?')} mode, recipe {rec.get('label', '?')}, "
        f"--jobs {q.get('jobs', '?')}, {_fmt(q.get('wall_s'))} s in all; each ratio is "
        "the mean over seeds of the per-seed ratio Engram / baseline (same seed) with a "
        f"Student-t interval; target: mean <= {q.get('target_ratio', 0.97)} and upper end < 1.0."
    ]
    for name, e in corpora.items():
        docs = e.get("documents") or {}
        toks = e.get("tokens") or {}
        splits = [s for s in ("train", "tune", "val") if s in docs or s in toks]
        models = []
        for arm, m in (e.get("models") or {}).items():
            p = m.get("params") or {}
            tables = p.get("engram_tables")
            models.append(
                f"{arm} width {m.get('n_embd')}, {_fmt(p.get('total'))} parameters"
                + (f" ({_fmt(tables)} in tables)" if tables else "")
                + f", {_fmt(m.get('forward_flops_per_token'))} forward FLOPs/token"
            )
        notes.append(
            f"- quality, {name}: documents {'/'.join(splits)} "
            + "/".join(_fmt(docs.get(s)) for s in splits)
            + ", tokens "
            + "/".join(_fmt(toks.get(s)) for s in splits)
            + f"; {_fmt(e.get('tokens_per_run'))} training tokens a run, {e.get('seeds')} seeds, "
            f"validation on {_fmt(e.get('val_tokens_evaluated'))} tokens; "
            + "; ".join(models)
            + "."
        )
    return notes


def _quality_why(q: dict) -> list[str]:
    """Why a corpus missed the quality target, from its numbers."""
    lines = []
    for name, e in (_quality_corpora(q) or {}).items():
        if e.get("meets_target") is not False:
            continue
        iso = e.get("ratio_vs_dense_isoflop") or {}
        t = q.get("target_ratio", 0.97)
        if iso.get("mean") is None:
            continue
        why = []
        if iso["mean"] > t:
            why.append(f"the mean is above {t}")
        if iso.get("hi") is None:
            why.append("one seed gives no interval")
        elif iso["hi"] >= 1.0:
            why.append(
                f"the interval reaches {iso['hi']:.3f}, so no gain is shown at {iso['n']} seeds"
            )
        classes = (e.get("where") or {}).get("classes") or {}
        fr = (classes.get("frequent_2gram") or {}).get("ratio")
        un = (classes.get("unseen_2gram") or {}).get("ratio")
        spread = ((e.get("val_loss") or {}).get("dense_isoflop") or {}).get("sd_pct")
        lines.append(
            f"- quality, {Path(name).name}: Engram / dense_isoflop {_interval(iso)} at "
            f"{_fmt(e.get('tokens_per_run'))} tokens a run: "
            + ("; ".join(why) or "see the rows above")
            + (
                f". After a frequent 2-gram the ratio is {_interval(fr)}, after an unseen one "
                f"{_interval(un)}"
                if fr or un
                else ""
            )
            + (f"; dense_isoflop's own seed spread is {spread:.2f}%" if spread is not None else "")
            + "."
        )
    return lines


def _notes(out: Path) -> list[str]:
    """A few lines per benchmark that say why a figure is what it is."""
    notes = []
    q = _load(out, "quality")
    if q and q.get("benchmark") == "quality":
        notes += _quality_notes(q)
    w = _load(out, "wire")
    if w and w.get("benchmark") == "wire":
        keep = [x for x in w.get("runs", []) if x.get("cache_drop_pushed") is False]
        notes.append(
            f"- wire: naive = {w['naive_rows_per_token']} rows per token ((N-1) x K heads per "
            "Engram layer). With the default cache policy a push drops the row from the cache, "
            "and the training loop pushes every used row each step, so the cache only serves "
            "rows shared with the batch `depth` steps earlier"
            + (
                f'; "{keep[0]["policy"]}" keeps pushed rows cached until '
                f"{keep[0]['cache_staleness']} steps old (rows that much staler, async)"
                if keep
                else ""
            )
            + ". Bigger batches dedup more."
        )
    r = _load(out, "redis")
    if r and r.get("benchmark") == "redis" and not r.get("skipped"):
        notes.append(
            f"- redis: {r['redis_version'].split(' sha')[0]}, redis-py {r['redis_py']} "
            f"({r['redis_parser']} reply parser), MGET/MSET chunks of {r['mget_chunk']} keys in "
            "one pipeline; the RMW update uses engram_store.engine.optimizers (the store's own Adam)."
        )
    return (["", "## Notes", ""] + notes) if notes else []


def _why(out: Path) -> list[str]:
    """One line per missed target saying why, from the numbers in the JSON."""
    lines = []
    lk = _load(out, "lookup")
    if lk and lk.get("meets_target") is False:
        srv = lk.get("server_lookup_p50_ms")
        lines.append(
            f"- lookup: {lk.get('rows'):,} rows at {lk.get('ratio_lookup_vs_raw_grpc', 0):.2f}x "
            "the raw gRPC reply of the same bytes"
            + (f" (server p50 {srv:.1f} ms)" if srv else "")
            + ": the raw server sends a ready-made answer, the shard finds and gathers random "
            "rows first; one slow phase of the shared CPUs moves the ratio (see the load column)."
        )
    p = _load(out, "push")
    if p and p.get("meets_targets") is False:
        lines.append(
            f"- push: {p.get('inprocess_adam_rows_per_s', 0):,.0f} rows/s in-process and "
            f"{p.get('grpc_adam_rows_per_s', 0):,.0f} over gRPC one push at a time (two in "
            f"flight: {p.get('grpc_two_in_flight_rows_per_s', 0):,.0f}); quick mode pushes "
            "small batches, whose fixed costs weigh more."
        )
    f = _load(out, "prefetch")
    if f and f.get("meets_target") is False and f.get("depths"):
        d1 = next((d for d in f["depths"] if d["prefetch_depth"] == 1), None)
        if d1 is not None:
            lines.append(
                f"- prefetch: at depth 1 the step waits for rows only {d1['stall_pct']}% of the "
                "time, so the extra step time is not stall: the shard servers run on the same "
                f"{os.cpu_count()} CPUs as the trainer and take CPU from it (applying pushes)."
            )
    r = _load(out, "redis")
    if r and r.get("meets_target") is False and not r.get("skipped"):
        t = r.get("target_ratio", 10)
        lines.append(
            f"- redis: the Redis baseline is the strong one (pipelined MGET in chunks, one round "
            f"trip per batch): {r['redis_lookup_rows_per_s']:,.0f} rows/s lookup, limited by "
            f"redis-py's {r['redis_parser']} reply parser and the single-threaded server. The "
            f"store's {r['store_lookup_rows_per_s']:,.0f} rows/s is "
            f"{r['store_lookup_rows_per_s'] / max(s['raw_grpc_rows_per_s'] for s in r['batch_sweep']):.0%}"
            " of what raw gRPC moves at best with no work at all, so a 10x lead would need Redis "
            f"below {r['store_lookup_rows_per_s'] / t:,.0f} rows/s. "
            + (
                f"An unpipelined client (one GET per row) reaches "
                f"{r['redis_get_loop_rows_per_s']:,.0f} rows/s."
                if r.get("redis_get_loop_rows_per_s")
                else ""
            )
        )
    w = _load(out, "wire")
    if w and w.get("meets_target") is False:
        big = [
            x
            for x in w.get("runs", [])
            if x["policy"] == w.get("best_policy")
            and (x["batch_size"], x["seq_len"])
            != (w["default_batch"]["batch_size"], w["default_batch"]["seq_len"])
        ]
        lines.append(
            f"- wire: at the trainer's default batch ({w['default_batch']['batch_size']}x"
            f"{w['default_batch']['seq_len']} = "
            f"{w['default_batch']['batch_size'] * w['default_batch']['seq_len']:,} tokens) only "
            f"{100 * (1 - w['dedup_ratio']):.0f}% of (position, head) rows repeat within a "
            f'batch; the best cache policy measured ("{w.get("best_policy")}") brings it to '
            f"{w.get('ratio', 0):.2f} (see the note above)"
            + (
                f"; at {big[0]['batch_size']}x{big[0]['seq_len']} the ratio is "
                f"{big[0]['lookup_ratio_vs_naive']:.2f}."
                if big
                else "."
            )
        )
    q = _load(out, "quality")
    if q and q.get("benchmark") == "quality":
        lines += _quality_why(q)
    return (["", "## Why the misses", ""] + lines) if lines else []


def update_readme(text: str, readme: Path = ROOT / "README.md", prefix: str = "results/") -> None:
    """Replace the block between the results markers (appended if absent) with `text`."""
    body = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", rf"![\1]({prefix}\2)", text)
    body = body.replace(
        "# Benchmark results",
        "## Benchmark results\n\n"
        "_Generated from [results/RESULTS.md](results/RESULTS.md) by "
        "`python benchmarks/run_all.py --readme`; every number traces to a file in "
        "results/ and the command that wrote it._",
        1,
    )
    block = f"{START}\n{body.rstrip()}\n{END}"
    cur = readme.read_text(encoding="utf-8")
    if START in cur and END in cur:
        head, rest = cur.split(START, 1)
        tail = rest.split(END, 1)[1]
        new = head + block + tail
    else:
        new = cur.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(new, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results"), help="results folder")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--full", action="store_true", help="each script's default (long) mode")
    ap.add_argument("--readme", action="store_true", help="copy RESULTS.md into README.md")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="do not run; redraw figures and rewrite RESULTS.md from out/*.json",
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "run_all.json"
    if args.report_only:
        if not meta_path.exists():
            print(f"no {meta_path}: run without --report-only first", file=sys.stderr)
            return 2
        meta = json.loads(meta_path.read_text())
    else:
        names = [n for n in args.only.split(",") if n]
        unknown = set(names) - {b.name for b in BENCHES}
        if unknown:
            print(
                f"unknown benchmark(s) {sorted(unknown)}; choose from {[b.name for b in BENCHES]}",
                file=sys.stderr,
            )
            return 2
        cmd = "python benchmarks/run_all.py" + "".join(
            f" {a}" for a in sys.argv[1:] if a != "--readme"
        )
        runs = []
        old = json.loads(meta_path.read_text()) if meta_path.exists() and names else None
        for b in BENCHES:
            if names and b.name not in names:
                prev = next((r for r in (old or {}).get("runs", []) if r["name"] == b.name), None)
                if prev:
                    runs.append(prev)
                continue
            runs.append(run_bench(b, out, quick=not args.full))
        meta = {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "command": cmd,
            "machine": machine_info(),
            "runs": runs,
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    text = write_report(out, meta)
    if args.readme:
        update_readme(text)
    print(text)
    summary = {
        "benchmark": "run_all",
        "out": str(out),
        "status": {r["name"]: r["status"] for r in meta["runs"]},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
