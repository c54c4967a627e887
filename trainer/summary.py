"""What a run reports: a line (or a tqdm bar, or a callback) per logging window while it trains,
and the summary at the end. Torch-free."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from trainer.config import TrainConfig


def log_line(step: int, steps: int, m: dict) -> str:
    """One logging window as a line."""
    return (
        f"step {step}/{steps} loss {m['loss']:.4f} tok/s {m['tokens_per_s']:.0f} "
        f"stall {m['stall_pct']:.1f}% rows/tok {m['rows_per_token']:.2f}"
    )


class Meter:
    """Logging windows of one worker: loss EMA, tokens/s over all workers, the share of time the
    step waited for rows. Every window's metrics go to `history`; rank 0 shows them (a tqdm bar
    when cfg.progress and no `report`, else `report(metrics)`, else a printed line).

    `stats` is the row source's PrefetchStats (its stall_s grows as the steps wait).
    `tokens_trained` counts this worker's training tokens (never evaluation's); time handed to
    `exclude` (periodic evaluation) is left out of the windows' tokens/s and kept in `eval_s`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world: int,
        start: int,
        stats: Any,
        report: Callable[[dict], None] | None = None,
    ) -> None:
        self.steps, self.log_every, self.world = cfg.steps, cfg.log_every, world
        self.rank, self.stats, self.report = rank, stats, report
        self.history: list[dict] = []
        self.bar = None
        if rank == 0 and cfg.progress and report is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True
            )
        self.loss_ema: float | None = None
        self.first_loss = self.last_loss = math.nan  # of the first and last step of this run
        self.step_s: list[float] = []  # each step's wall time (train_step: fetch to push)
        self.tokens_trained = 0
        self.eval_s = 0.0
        self._t, self._tokens, self._stall = time.perf_counter(), 0, stats.stall_s

    def add(self, step: int, tokens: int, loss: float, seconds: float | None = None) -> dict | None:
        """Count a step of this worker (`seconds`: its wall time); at a logging step, the
        window's metrics (in history)."""
        self._tokens += tokens
        self.tokens_trained += tokens
        if self.tokens_trained == tokens:  # the run's first step
            self.first_loss = loss
        self.last_loss = loss
        if seconds is not None:
            self.step_s.append(seconds)
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        if step % self.log_every and step != self.steps:
            if self.bar is not None and step > self.bar.n:
                self.bar.update(1)
            return None
        now = time.perf_counter()
        dt = now - self._t
        m = {
            "step": step,
            "loss": loss,
            "loss_ema": self.loss_ema,
            "tokens_per_s": self._tokens * self.world / dt,
            "stall_pct": 100 * (self.stats.stall_s - self._stall) / dt,
            "rows_per_token": self.stats.rows_per_token,
        }
        self.history.append(m)
        self._t, self._tokens, self._stall = now, 0, self.stats.stall_s
        return m

    def exclude(self, seconds: float) -> None:
        """Time that was not training (an evaluation): out of tokens/s, into eval_s."""
        self.eval_s += seconds
        self._t += seconds

    def show(self, step: int, m: dict) -> None:
        """Show a logging window (rank 0 only; the bar, the report callback or a line)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{self.loss_ema:.3f}",
                tok_s=f"{m['tokens_per_s']:.0f}",
                stall=f"{m['stall_pct']:.1f}%",
                rows_tok=f"{m['rows_per_token']:.2f}",
            )
        elif self.report is not None:
            self.report(m)
        elif self.rank == 0:
            print(log_line(step, self.steps, m), flush=True)

    def close(self) -> None:
        """Close the progress bar, if any."""
        if self.bar is not None:
            self.bar.close()


def build_summary(
    cfg: TrainConfig,
    *,
    world: int,
    device: str,
    start: int,
    last: int,
    stopped_early: bool,
    train_s: float,
    eval_s: float,
    tokens_trained: int,
    stats: Any,
    history: list[dict],
    val_before: float,
    val_after: float,
    params: dict,
    tables: dict[int, str],
    meter: Meter | None = None,
    store: dict | None = None,
) -> dict:
    """The run's summary: steps, throughput, stall, cache, losses, parameter split, tables.

    `stats` is the training row source's PrefetchStats; `last` the last step trained;
    `tokens_trained` this worker's training tokens and `train_s` the training time, both without
    evaluation (`eval_s`: periodic evaluation during training), so tokens/s is training's own.
    `meter` adds the median step time and the first and last step's loss; `store` is
    store_summary()'s (rows touched and stored per table, bytes per parameter on the store).
    """
    steps_done = last - start
    step_s = meter.step_s if meter is not None else []
    return {
        "steps": last,
        "steps_run": steps_done,
        "trainers": world,
        "stopped_early": stopped_early,
        "device": device,
        "update": cfg.prefetch.update,
        "prefetch_depth": cfg.prefetch.depth,
        "train_s": train_s,
        "eval_s": eval_s,
        "tokens_trained": tokens_trained * world,
        "tokens_per_s": tokens_trained * world / train_s if train_s > 0 else 0.0,
        "step_ms": 1000 * train_s / max(steps_done, 1),
        "stall_pct": 100 * stats.stall_s / train_s if train_s > 0 else 0.0,
        "push_wait_pct": 100 * stats.wait_push_s / train_s if train_s > 0 else 0.0,
        "rows_per_token": stats.rows_per_token,
        "cache_hit_rate": stats.cache_hit_rate,
        "rows_refetched": stats.rows_refetched,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "step_s_median": statistics.median(step_s) if step_s else math.nan,
        "loss_first": meter.first_loss if meter is not None else math.nan,
        "loss_last": meter.last_loss if meter is not None else math.nan,
        "store": store or {},
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "params": params,
        "tables": tables,
        "history": history,
    }


def print_summary(summary: dict, file: TextIO | None = None) -> None:
    """The final report of a run (to `file`, default the sys.stdout of the moment)."""
    p = summary["params"]
    lines = [
        f"steps {summary['steps']}{' (time limit reached)' if summary.get('stopped_early') else ''}"
        f" ({summary['trainers']} trainer(s), {summary['device']}, "
        f"update {summary['update']}, prefetch depth {summary['prefetch_depth']})",
        f"throughput  {summary['tokens_per_s']:.0f} tokens/s, {summary['step_ms']:.1f} ms/step",
        f"prefetch    stall {summary['stall_pct']:.2f}% of step time, "
        f"{summary['rows_per_token']:.2f} rows fetched per token",
        f"loss        train {summary['final_loss']:.4f}; validation "
        f"{summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}",
        f"parameters  backbone {p['backbone']:,}  engram dense {p['engram_dense']:,}  "
        f"engram tables {p['engram_tables']:,} ({100 * p['table_fraction']:.1f}% of "
        f"{p['total']:,})",
        f"checkpoint  {summary.get('checkpoint', '-')}",
    ]
    if summary.get("store"):
        lines[2:2] = store_lines(summary)
    print("\n".join(lines), file=file or sys.stdout)


def store_lines(summary: dict) -> list[str]:
    """The summary's store part: rows touched / stored per table, bytes per parameter on the
    store, median step time, tokens/s and the first and last step's loss."""
    st = summary["store"]
    tables = "; ".join(
        f"{name} {t['touched_rows']:,} touched, {t['stored_rows']:,} stored of {t['num_rows']:,}"
        for name, t in st["tables"].items()
    )
    ram = (
        f"; RAM {st['memory_bytes'] / 2**20:.1f} MiB = {st['memory_bytes_per_param']:.2f} B/param"
        if st.get("memory_bytes") is not None
        else ""
    )
    return [
        f"rows        {tables}",
        f"store       {st['stored_params']:,} params stored, {st['stored_bytes'] / 2**20:.1f} MiB "
        f"of records = {st['bytes_per_param']:.2f} B/param (rows + optimizer state){ram}",
        f"step time   median {summary['step_s_median']:.3f} s/step, "
        f"{summary['tokens_per_s']:.0f} tokens/s; loss {summary['loss_first']:.4f} (first step) "
        f"-> {summary['loss_last']:.4f} (last)",
    ]


class DistinctRows:
    """The distinct row ids a run pushed, per layer: what it touched on the store. Ids are
    buffered and folded into a sorted array every `fold` ids, so memory stays near the number
    of distinct rows."""

    def __init__(self, fold: int = 1 << 22) -> None:
        self.fold = fold
        self._seen: dict[int, np.ndarray] = {}
        self._buf: dict[int, list[np.ndarray]] = {}
        self._buffered = 0

    def add(self, layer: int, ids: np.ndarray) -> None:
        """Count the row ids of one push of `layer`."""
        self._buf.setdefault(layer, []).append(np.asarray(ids, np.int64).ravel())
        self._buffered += len(ids)
        if self._buffered >= self.fold:
            self._fold()

    def _fold(self) -> None:
        for layer, parts in self._buf.items():
            seen = self._seen.get(layer, np.empty(0, np.int64))
            self._seen[layer] = np.unique(np.concatenate([seen, *parts]))
        self._buf, self._buffered = {}, 0

    def counts(self) -> dict[int, int]:
        """{layer: distinct rows pushed so far}."""
        self._fold()
        return {layer: len(ids) for layer, ids in self._seen.items()}


def store_summary(
    shard_stats: list[dict],
    tables: dict[int, str],
    touched: dict[int, int],
    memory_bytes: int | None = None,
) -> dict:
    """What the store holds after a run, from its shards' stats (StoreClient.stats()): per table
    of the run its height, the rows this run touched and the rows stored, their record bytes;
    bytes per parameter of the stored records, and of the shards' RAM (`memory_bytes`, the
    engine's arrays and indexes, read from /metrics; None when unread) over every stored
    parameter of the store."""
    merged: dict[str, dict] = {}
    for shard in shard_stats:
        for t in shard["tables"]:
            m = merged.setdefault(
                t["name"],
                {"num_rows": t["num_rows"], "dim": t["dim"], "stored_rows": 0, "stored_bytes": 0},
            )
            m["stored_rows"] += t["stored_rows"]
            m["stored_bytes"] += t["stored_bytes"]
    ours = {}
    for layer, name in tables.items():
        m = merged.get(name, {"num_rows": 0, "dim": 0, "stored_rows": 0, "stored_bytes": 0})
        ours[name] = {**m, "layer": layer, "touched_rows": touched.get(layer, 0)}
    params = sum(t["stored_rows"] * t["dim"] for t in ours.values())
    nbytes = sum(t["stored_bytes"] for t in ours.values())
    all_params = sum(t["stored_rows"] * t["dim"] for t in merged.values())
    return {
        "tables": ours,
        "stored_rows": sum(t["stored_rows"] for t in ours.values()),
        "stored_params": params,
        "stored_bytes": nbytes,
        "bytes_per_param": nbytes / params if params else math.nan,
        "memory_bytes": memory_bytes,
        "memory_bytes_per_param": (
            memory_bytes / all_params if memory_bytes is not None and all_params else math.nan
        ),
    }
