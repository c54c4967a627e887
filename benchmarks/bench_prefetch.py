"""Step time with the remote store + prefetch vs the same tables in-process; stall vs depth.

    python benchmarks/bench_prefetch.py            # ~3-5 min on 2 CPUs
    python benchmarks/bench_prefetch.py --quick

The same model (the `engram train` default: 4 blocks, width 256, Engram at block 1, seq 128) trains
on the built-in corpus with its Engram table either in-process (LocalMemory + SparseAdam: the
baseline) or in 2 shard servers (`engram serve` subprocesses on 127.0.0.1) with prefetch depth 0, 1
and 2 (async updates). Configurations are interleaved round-robin, and the ratio is the median over
rounds of (store, depth 1) / (in-process) from the same round, so a slow phase of a shared machine
hits both sides alike; step times are medians of per-step times after the first logging window.
Also reported, measured inside each run and so robust to machine load: the share of step time the
trainer waited for rows (stall) or for push acknowledgements (push wait).
Target: store + prefetch (depth 1) / in-process <= 1.02. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _procs import shard_server  # noqa: E402

from trainer.config import PrefetchConfig, TrainConfig  # noqa: E402
from trainer.corpus import load_corpus  # noqa: E402
from trainer.loop import train_worker  # noqa: E402

TARGET = 1.02


def step_times(summary: dict, cfg: TrainConfig) -> list[float]:
    """Seconds per step of each step after the first (log_every=1: one window per step)."""
    tokens = cfg.batch_size * cfg.seq_len  # per step
    return [tokens / h["tokens_per_s"] for h in summary["history"][1:] if h["tokens_per_s"] > 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and one round")
    ap.add_argument("--steps", type=int, default=None, help="steps per run")
    ap.add_argument("--rounds", type=int, default=None, help="runs per configuration")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="intra-op threads of the trainer (0 = torch's default); 1 on a 2-core "
        "machine leaves a core to the shards, as a store on other hosts would",
    )
    args = ap.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    steps = args.steps or (12 if args.quick else 25)
    rounds = args.rounds or (2 if args.quick else 3)

    base = TrainConfig(
        batch_size=args.batch_size,
        steps=steps,
        log_every=1,
        eval_batches=0,
        progress=False,
        prefetch=PrefetchConfig(update="async"),
    )
    corpus = load_corpus(base)
    configs = [("local", None)] + [("store", d) for d in (0, 1, 2)]
    times: dict[str, list[float]] = {}
    stalls: dict[str, list[float]] = {}
    push_waits: dict[str, list[float]] = {}
    round_ratio: list[float] = []
    rows_per_token: dict[str, float] = {}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        addresses = tuple(stack.enter_context(shard_server()) for _ in range(args.shards))
        for r in range(rounds):
            for backend, depth in configs:
                key = backend if depth is None else f"store_depth{depth}"
                cfg = dataclasses.replace(
                    base,
                    backend=backend,
                    store=addresses,
                    table_prefix=f"r{r}_",
                    out=f"{tmp}/{key}-{r}",
                    prefetch=dataclasses.replace(base.prefetch, depth=depth or 0),
                )
                s = train_worker(cfg, corpus=corpus, report=lambda m: None)
                times.setdefault(key, []).extend(step_times(s, cfg))
                stalls.setdefault(key, []).append(s["stall_pct"])
                push_waits.setdefault(key, []).append(s["push_wait_pct"])
                rows_per_token[key] = s["rows_per_token"]
                print(
                    f"round {r} {key}: {1000 * statistics.median(step_times(s, cfg)):.0f} "
                    f"ms/step, stall {s['stall_pct']:.2f}%",
                    file=sys.stderr,
                    flush=True,
                )
            round_ratio.append(
                statistics.median(times["store_depth1"][-(steps - 1) :])
                / statistics.median(times["local"][-(steps - 1) :])
            )

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(round_ratio)
    result = {
        "benchmark": "prefetch",
        "model": {
            "n_layer": base.model.n_layer,
            "n_embd": base.model.n_embd,
            "engram_layers": list(base.model.engram_layers),
            "seq_len": base.seq_len,
            "batch_size": base.batch_size,
            "table_rows_per_layer": "~8 x 50k",
        },
        "shards": args.shards,
        "steps_per_run": steps,
        "rounds": rounds,
        "torch_threads": args.torch_threads or "default",
        "step_ms": {k: round(1000 * v, 1) for k, v in med.items()},
        "ratio_store_prefetch_vs_local": round(ratio, 4),
        "ratio_per_round": [round(r, 4) for r in round_ratio],
        "ratio_store_depth0_vs_local": round(med["store_depth0"] / med["local"], 4),
        "target_ratio": TARGET,
        "meets_target": ratio <= TARGET,
        "depths": [
            {
                "prefetch_depth": d,
                "stall_pct": round(statistics.mean(stalls[f"store_depth{d}"]), 3),
                "push_wait_pct": round(statistics.mean(push_waits[f"store_depth{d}"]), 3),
                "step_ms": round(1000 * med[f"store_depth{d}"], 1),
                "rows_per_token": round(rows_per_token[f"store_depth{d}"], 3),
            }
            for d in (0, 1, 2)
        ],
        "note": "in-process baseline = LocalMemory (nn.Embedding sparse) + torch SparseAdam on "
        "this CPU; shards and trainer share the machine's cores",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
