"""What a run reports: a line (or a tqdm bar, or a callback) per logging window while it trains,
and the summary at the end. Torch-free."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

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
        self.tokens_trained = 0
        self.eval_s = 0.0
        self._t, self._tokens, self._stall = time.perf_counter(), 0, stats.stall_s

    def add(self, step: int, tokens: int, loss: float) -> dict | None:
        """Count a step of this worker; at a logging step, the window's metrics (in history)."""
        self._tokens += tokens
        self.tokens_trained += tokens
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
) -> dict:
    """The run's summary: steps, throughput, stall, cache, losses, parameter split, tables.

    `stats` is the training row source's PrefetchStats; `last` the last step trained;
    `tokens_trained` this worker's training tokens and `train_s` the training time, both without
    evaluation (`eval_s`: periodic evaluation during training), so tokens/s is training's own.
    """
    steps_done = last - start
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
    print("\n".join(lines), file=file or sys.stdout)
