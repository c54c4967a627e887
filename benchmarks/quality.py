"""Does the memory help? Engram against named dense baselines, paired by seed, on held-apart text.

    python benchmarks/quality.py [--corpus stdlib,libdocs,PATH] [--quick | --budget] [--seeds 3]
                                 [--study] [--sweep] [--store-check] [--jobs 2] [--out DIR]

Method (issue 13):
- Each corpus is split by source document before any chunking (trainer.data.split_sources): a
  training split, a tuning split (recipes are chosen on it, never on the reported numbers) and the
  reported validation split. The tokenizer is trained on the training split only. Validation is
  read in full (or, past --val-tokens, a fixed sample of windows spread over every document).
- Arms, all trained on the same tokens in the same order for the same number of tokens:
    engram          the backbone plus Engram layer(s), tables in-process (nn.Embedding(sparse) +
                    SparseAdam: the trainer's local backend, the reference the store is held to)
    dense           the same backbone without Engram; its initial weights are identical to the
                    Engram arm's backbone (checked: a hash of the weights is compared per seed)
    dense_isoflop   the dense model widened to the Engram model's FLOPs per token (the baseline
                    the target is judged on)
    dense_isoparam  (--isoparam) widened to the Engram model's total parameters, tables included
  FLOPs per token are counted by torch's FlopCounterMode on one forward (table gathers are 0).
- Every reported ratio is the mean over seeds of the per-seed ratio Engram / baseline with a
  Student-t 95% interval; the dense arms' own seed spread is printed beside it.
- Where the gain is: loss by token class (the n-gram that ends at the input token, which is what
  the Engram lookup sees, was frequent / rare / unseen in the training split), and the mean gate
  value of the Engram layer on each class.
- --study: the recipe study on the tuning split (table lr, its schedule, init scale, rows per head,
  which layers), one factor at a time from the default recipe, paired against dense_isoflop.
- --sweep: allocation sweeps, >= 2 seeds a point: (a) a fixed total parameter budget split
  between backbone width and table rows; (b) a fixed backbone (fixed FLOPs) with table sizes
  growing. With a dense backbone and tied embeddings both cannot be held at once: every backbone
  parameter costs FLOPs, so (a) reports each point's FLOPs and (b) each point's parameters.
- --store-check: the Engram arm trained once through the real store (a shard server on
  127.0.0.1, gRPC, server-side Adam) beside the local run, --store-steps steps each (300): both
  curves in the JSON.

- The recipe (Recipe's defaults, the same as `engram train`'s): the table lr by the lr rule
  (trainer.config.table_lr_mult_for: 100x the backbone's up to 1.5 M tokens a run, geometric to
  25x at 4 M, held there), rows initialised N(0, 0.01^2), Engram at blocks 1 and 2, and rows per head by the size rule
  (trainer.config.rows_per_head): one per 32 tokens read when a run reads the training split at
  most once, one per 1,000 split tokens divided by the passes from 1.5 passes on, and in between
  a geometric interpolation in the passes (unmeasured). The rule is applied per
  corpus; --table-base-size fixes a size.

Modes: --quick (~0.5 M tokens a run, for a smoke run), default (2 M tokens), --budget (10 M
tokens a run, width 128, 29-34 min a run with two at a time, --jobs 2; --no-dense leaves out
the same-width dense arm, a third of the time; --runs-dir DIR keeps every finished run, so a
stopped budget resumes where it was).
Writes <out>/quality_<corpus>.svg (validation loss vs tokens, mean of seeds with min/max bands)
and <out>/quality_curves.json; prints progress to stderr and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import pickle
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_stats as qs  # noqa: E402

from trainer import data  # noqa: E402
from trainer.config import (  # noqa: E402
    MIN_TABLE_ROWS,
    ArchConfig,
    TrainConfig,
    rows_per_head,
    table_lr_mult_for,
)
from trainer.corpus import Corpus, corpus_from_prepared  # noqa: E402
from trainer.fetch import LocalFetcher  # noqa: E402
from trainer.hashing import NgramHasher  # noqa: E402
from trainer.model import GPT, param_split  # noqa: E402
from trainer.tables import table_specs  # noqa: E402

TARGET_RATIO = 0.97
PAPER_OPTIMUM = (0.20, 0.25)
VAL_FRACTION = TUNE_FRACTION = 0.05
FREQUENT = 16  # an n-gram seen >= this many times in training is "frequent"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Data:
    """A corpus prepared for the benchmark: the trainer's Corpus plus the raw token streams."""

    corpus: Corpus
    name: str
    tokens: dict[str, np.ndarray]  # {"train", "tune", "val"}: (N,) documents joined by EOT
    docs: dict[str, int]  # documents per split
    dataset: Any  # trainer.data.TokenDataset


def load_data(
    corpus: str | None, vocab_size: int, docs: list | None = None, cache_dir: str | None = None
) -> Data:
    """Split by source document, tokenizer on the training split, token streams (cached)."""
    prep = data.prepare_data(
        None if corpus in (None, "builtin", "stdlib") else corpus,
        vocab_size,
        cache_dir=cache_dir,
        docs=docs,
        val_fraction=VAL_FRACTION,
        tune_fraction=TUNE_FRACTION,
    )
    ds = prep.dataset
    return Data(
        corpus_from_prepared(prep),
        corpus or "stdlib",
        {k: np.asarray(v, np.int64) for k, v in ds.split_tokens.items()},
        {k: len(v) for k, v in ds.doc_starts.items()},
        ds,
    )


@functools.lru_cache(maxsize=4)
def cached_data(corpus: str, vocab_size: int) -> Data:
    return load_data(corpus, vocab_size)


# ---------------------------------------------------------------------------------- recipes


SCHEDULES = ("constant", "follow")  # the tables' lr: constant, or the backbone's warmup + cosine


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the study varies. The backbone's own optimizer and schedule are the same in all arms.
    The defaults are the documented recipe (README "Quality"), chosen on the tuning splits."""

    # table lr = this x the backbone's peak lr (the paper: 5); 0: table_lr_mult_for's rule
    table_lr_mult: float = 0.0
    table_schedule: str = "constant"  # "constant" or "follow" (the backbone's warmup + cosine)
    table_init_std: float = 0.01  # std of the tables' initial rows (the store's default: 1.0)
    table_base_size: int = 0  # rows per head (the primes start here); 0: rows_per_head's rule
    engram_layers: tuple[int, ...] = (1, 2)

    def label(self) -> str:
        rows = self.table_base_size or "auto"
        lr = f"{self.table_lr_mult:.3g}" if self.table_lr_mult else "auto"
        return (
            f"lr{lr}x-{self.table_schedule}-init{self.table_init_std:g}-"
            f"rows{rows}-L{','.join(map(str, self.engram_layers))}"
        )

    def sized(self, train_tokens: int, run_tokens: int) -> Recipe:
        """This recipe with the rules' rows per head and table lr filled in (given ones kept)."""
        return dataclasses.replace(
            self,
            table_base_size=self.table_base_size or rows_per_head(train_tokens, run_tokens),
            table_lr_mult=self.table_lr_mult or table_lr_mult_for(run_tokens),
        )


def shape(mode: str) -> tuple[int, int, int]:
    """(width, sequence length, batch size) of a mode's Engram arm."""
    return (128, 128, 16) if mode == "budget" else (96, 64, 16)


def base_config(mode: str, recipe: Recipe, tokens: int) -> TrainConfig:
    """The Engram arm's TrainConfig for a mode and a sized recipe (Recipe.sized), `tokens` tokens
    of training."""
    if not (recipe.table_base_size and recipe.table_lr_mult):
        raise ValueError("size the recipe for its corpus and length first (Recipe.sized)")
    width, seq, batch = shape(mode)
    steps = max(1, round(tokens / (batch * seq)))
    return TrainConfig(
        backend="local",
        corpus="builtin",
        vocab_size=4096,
        model=ArchConfig(
            n_layer=4,
            n_head=4,
            n_embd=width,
            engram_layers=recipe.engram_layers,
            max_ngram=3,
            hash_heads=4,
            n_embed_per_ngram=64,
            table_base_size=recipe.table_base_size,
        ),
        seq_len=seq,
        batch_size=batch,
        seed=1337,
        steps=steps,
        lr=2e-3 if mode != "budget" else 1.5e-3,
        table_lr_mult=recipe.table_lr_mult,
        progress=False,
    )


def with_width(cfg: TrainConfig, width: int) -> TrainConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=width))


def dense_of(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, model=cfg.model.baseline())


def measure(cfg: TrainConfig, vocab: int, pad: int) -> dict:
    """Parameters (param_split) and FLOPs per token (one forward of one sequence) of cfg's model."""
    mcfg = cfg.model_config(vocab, pad)
    torch.manual_seed(0)
    model = GPT(mcfg)
    T = cfg.seq_len
    idx = torch.zeros(1, T, dtype=torch.long)
    mem = None
    if mcfg.hash is not None:
        h = mcfg.hash
        heads = (h.max_ngram - 1) * h.heads
        mem = {layer: torch.zeros(1, T, heads, h.d_head) for layer in mcfg.engram_layers}
    fl = qs.flops_per_token(model, lambda: model(idx, mem), T)
    p = param_split(model, mcfg.hash)
    p.pop("table_rows", None)
    return {
        "params": p,
        "forward_flops_per_token": fl["forward_flops_per_token"],
        "train_flops_per_token": fl["train_flops_per_token"],
    }


def widen(cfg: TrainConfig, vocab: int, pad: int, key: str, target: float) -> TrainConfig:
    """The narrowest dense model (a multiple of n_head wide, from cfg's width up) whose `key`
    ("flops": forward FLOPs per token, or "params": total parameters) is at least `target`: the
    baseline never gets less than the model it is compared with."""
    n_head = cfg.model.n_head
    w = cfg.model.n_embd
    while w < 8192:
        c = with_width(cfg, w)
        m = measure(c, vocab, pad)
        v = m["forward_flops_per_token"] if key == "flops" else m["params"]["total"]
        if v >= target:
            return c
        w += n_head
    raise ValueError(f"no width below 8192 reaches {key} {target:g}")


# ----------------------------------------------------------------------------------- a run


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the peak lr at `step` (1-based): constant, or 2% linear warmup then cosine
    to 10% ("cosine")."""
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 50)
    if step <= warm:
        return step / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def backbone_sha(model: GPT) -> str:
    """sha256 of the backbone's initial weights (names sorted), to check that arms are paired."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if ".engram." not in name:
            h.update(name.encode())
            h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Job:
    corpus: str
    arm: str
    cfg: TrainConfig
    recipe: Recipe
    seed: int
    split: str  # the split evaluated: "val" (reported) or "tune" (recipe study)
    curve_points: int = 16
    curve_batches: int = 4
    max_val_batches: int | None = None
    tag: str = ""


def run_job(job: Job) -> dict:
    """Train one arm on the training split; evaluate it on job.split. Runs in a worker process."""
    torch.set_num_threads(1)
    d = cached_data(job.corpus, job.cfg.vocab_size)
    c = d.corpus
    cfg = dataclasses.replace(job.cfg, seed=job.seed)
    mcfg = cfg.model_config(c.vocab_size, c.pad_id)
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg)
    init_sha = backbone_sha(model)
    h = mcfg.hash
    hasher = NgramHasher(h, c.lookup, c.compressed_vocab) if h else None
    specs = table_specs(cfg, hasher) if hasher else {}
    specs = {
        k: dataclasses.replace(s, init_std=job.recipe.table_init_std) for k, s in specs.items()
    }
    train_batches = c.batches("train", cfg.batch_size, cfg.seq_len, cfg.seed)
    fetcher = LocalFetcher(hasher, specs, h, train_batches, torch.device("cpu"))
    ds = d.dataset
    n_all = ds.eval_windows(job.split, cfg.batch_size, cfg.seq_len)
    n_eval = n_all if job.max_val_batches is None else min(n_all, job.max_val_batches)
    windows = [
        (b[:, :-1], b[:, 1:])
        for b in ds.eval_batches(job.split, cfg.batch_size, cfg.seq_len, n_eval)
    ]
    positions = ds.eval_positions(job.split, cfg.batch_size, cfg.seq_len, n_eval)

    def evaluate(ws: list, gates: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        model.eval()
        losses, gate_out = [], []
        engrams = [b.engram for b in model.blocks if b.engram is not None]
        for m in engrams:
            m.record_gates = gates
        with torch.no_grad():
            for x, y in ws:
                mem = fetcher.memory(hasher.global_ids(x)) if hasher else None
                logits, _ = model(torch.from_numpy(x), mem)
                loss = F.cross_entropy(
                    logits.flatten(0, 1), torch.from_numpy(y).reshape(-1), reduction="none"
                )
                losses.append(loss.numpy().astype(np.float32))
                if gates and engrams:  # the first Engram layer's gate, (B, T)
                    gate_out.append(engrams[0].gates[..., 0].reshape(-1).numpy().astype(np.float32))
        for m in engrams:
            m.record_gates = False
        model.train()
        return np.concatenate(losses), (np.concatenate(gate_out) if gate_out else None)

    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )  # as trainer.loop.train_worker
    schedule = "cosine"
    table_lr = cfg.lr * job.recipe.table_lr_mult
    tokens_per_step = cfg.batch_size * cfg.seq_len
    every = max(1, cfg.steps // job.curve_points)
    curve: list[tuple[int, float]] = []
    train_loss: list[float] = []
    t0 = time.perf_counter()
    eval_s = 0.0
    for step in range(1, cfg.steps + 1):
        f = lr_factor(schedule, step, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * f
        if fetcher.opt is not None:
            tf = f if job.recipe.table_schedule == "follow" else 1.0
            for g in fetcher.opt.param_groups:
                g["lr"] = table_lr * tf
        b = fetcher.next()
        _, loss = model(b.x, b.memory, b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fetcher.push(step, {})  # SparseAdam on the rows this step used
        train_loss.append(float(loss.detach()))
        if step % every == 0 or step == cfg.steps:
            te = time.perf_counter()
            curve.append(
                (step * tokens_per_step, float(evaluate(windows[: job.curve_batches])[0].mean()))
            )
            eval_s += time.perf_counter() - te
    train_s = time.perf_counter() - t0 - eval_s
    token_losses, gates = evaluate(windows, gates=True)
    return {
        "corpus": job.corpus,
        "arm": job.arm,
        "seed": job.seed,
        "split": job.split,
        "tag": job.tag,
        "recipe": dataclasses.asdict(job.recipe),
        "n_embd": cfg.model.n_embd,
        "seq_len": cfg.seq_len,
        "val_loss": float(token_losses.mean()),
        "token_losses": token_losses,
        "positions": positions,
        "gates": gates,
        "curve": curve,
        "train_loss_last": float(np.mean(train_loss[-max(1, len(train_loss) // 20) :])),
        "train_s": train_s,
        "tokens": cfg.steps * tokens_per_step,
        "tokens_per_s": cfg.steps * tokens_per_step / train_s,
        "init_sha": init_sha,
    }


RUN_FORMAT = 1  # bump when a run's result changes shape: older kept runs are then not reused


def table_free(job: Job) -> Job:
    """`job` with the settings that only Engram tables read (table lr, schedule, init scale) at
    the default recipe's values when its arm has no tables: a dense run is the same run whatever
    they are, so a study of table settings reuses the dense runs it already has."""
    if job.arm == "engram":
        return job
    # the values dense runs have been named under since before the lr rule (kept runs stay valid)
    d = Recipe(table_lr_mult=100.0)
    return dataclasses.replace(
        job,
        cfg=dataclasses.replace(job.cfg, table_lr_mult=d.table_lr_mult),
        recipe=dataclasses.replace(
            job.recipe,
            table_lr_mult=d.table_lr_mult,
            table_schedule=d.table_schedule,
            table_init_std=d.table_init_std,
        ),
    )


def run_path(runs_dir: Path, job: Job) -> Path:
    """Where a finished job's result is kept: named by a hash of everything the job is (its
    config, recipe, seed, split and evaluation), so any change makes a new file."""
    key = hashlib.sha256(f"{RUN_FORMAT}:{table_free(job)!r}".encode()).hexdigest()[:20]
    return runs_dir / f"{job.corpus.replace('/', '_')}-{job.tag or job.arm}-s{job.seed}-{key}.pkl"


def _keep(runs_dir: Path | None, job: Job, result: dict) -> None:
    if runs_dir is None:
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = run_path(runs_dir, job)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, path)  # whole or absent: a run stopped mid-write leaves no half file


def run_jobs(jobs: list[Job], workers: int, runs_dir: Path | None = None) -> list[dict]:
    """Every job, `workers` at a time in spawned processes (one torch thread each). With
    runs_dir, each result is kept there as soon as its run finishes, and a job whose result is
    already there (the same job: run_path) is not run again: a stopped run resumes."""
    results: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, j in enumerate(jobs):
        kept = run_path(runs_dir, j) if runs_dir is not None else None
        if kept is not None and kept.exists():
            results[i] = pickle.loads(kept.read_bytes())  # our own files (--runs-dir)
            log(f"  kept: {kept.name}")
        else:
            todo.append(i)
    done = len(jobs) - len(todo)

    def finish(i: int, r: dict) -> None:
        nonlocal done
        results[i] = r
        _keep(runs_dir, jobs[i], r)
        done += 1
        _done(r, done, len(jobs))

    if workers <= 1:
        for i in todo:
            finish(i, run_job(jobs[i]))
    else:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futs = {pool.submit(run_job, jobs[i]): i for i in todo}
            for fut in cf.as_completed(futs):
                finish(futs[fut], fut.result())
    return [r for r in results if r is not None]


def _done(r: dict, k: int, n: int) -> None:
    log(
        f"  [{k}/{n}] {r['corpus']} {r['tag'] or r['arm']} seed {r['seed']}: {r['split']} loss "
        f"{r['val_loss']:.4f}, width {r['n_embd']}, {r['tokens'] / 1e6:.2f} M tokens in "
        f"{r['train_s']:.0f} s ({r['tokens_per_s']:,.0f} tok/s)"
    )


# ------------------------------------------------------------------------------- analysis


def paired(results: list[dict], arm: str, base: str) -> dict:
    """Per-seed ratio arm / base (same seed) with its interval."""
    by = {(r["arm"], r["seed"]): r["val_loss"] for r in results}
    seeds = sorted(s for a, s in by if a == arm and (base, s) in by)
    ratios = [by[(arm, s)] / by[(base, s)] for s in seeds]
    out = qs.paired_interval(ratios) if ratios else {"n": 0}
    out["ratios"] = ratios
    out["seeds"] = seeds
    return out


def spread(results: list[dict], arm: str) -> dict:
    """An arm's validation loss over its seeds: mean, sample sd, and each seed's (so a later
    run of other seeds, or of another recipe on the same seeds, can be paired with these)."""
    mine = sorted((r["seed"], r["val_loss"]) for r in results if r["arm"] == arm)
    v = [loss for _, loss in mine]
    return {
        "mean": float(np.mean(v)) if v else None,
        "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "sd_pct": float(100 * np.std(v, ddof=1) / np.mean(v)) if len(v) > 1 else None,
        "n": len(v),
        "seeds": [int(s) for s, _ in mine],
        "per_seed": [float(x) for x in v],
    }


def token_classes(
    d: Data, split: str, positions: np.ndarray, seq_len: int
) -> dict[str, np.ndarray]:
    """Classes of each evaluated target by the n-gram ending at its input token, counted in the
    training split over compressed ids (what the hasher hashes, docs/algorithm.md step 1). The
    target at stream position p is predicted from the input at p - 1, whose Engram lookup sees
    the n-grams ending there; within n - 1 tokens of a window's start the lookup sees pad instead
    of the stream, so those targets are a class of their own ("window_start") and in no other."""
    lk = d.corpus.lookup
    train, ev = lk[d.tokens["train"]], lk[d.tokens[split]]
    inp = positions - 1
    offset = inp % seq_len  # the input's place in its window (windows start at multiples of T)
    out = {}
    for n in (2, 3):
        inside = offset >= n - 1
        freq = qs.ngram_classes(train, ev, n, FREQUENT)[inp] & inside
        seen = qs.ngram_seen(train, ev, n)[inp] & inside
        out[f"frequent_{n}gram"] = freq
        out[f"rare_{n}gram"] = seen & ~freq
        out[f"unseen_{n}gram"] = ~seen & inside
    out["window_start"] = offset < 2
    return out


def class_report(d: Data, results: list[dict], arm: str, base: str) -> dict:
    """Per class: mean loss of arm and base over seeds, and the mean per-seed ratio."""
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted(s for a, s in by if a == arm and (base, s) in by)
    if not seeds:
        return {}
    first = by[(arm, seeds[0])]
    classes = token_classes(d, first["split"], first["positions"], first["seq_len"])
    per_class: dict[str, dict] = {}
    for s in seeds:
        e = qs.class_losses(by[(arm, s)]["token_losses"], classes)
        b = qs.class_losses(by[(base, s)]["token_losses"], classes)
        ratio = qs.class_ratio(e, b)
        for k in e:
            pc = per_class.setdefault(
                k, {"tokens": e[k]["tokens"], "engram_loss": [], "base_loss": [], "ratio": []}
            )
            pc["engram_loss"].append(e[k]["mean_loss"])
            pc["base_loss"].append(b[k]["mean_loss"])
            pc["ratio"].append(ratio[k])
    out = {}
    for k, pc in per_class.items():
        rs = [x for x in pc["ratio"] if x is not None]
        out[k] = {
            "tokens": pc["tokens"],
            "share": pc["tokens"] / len(first["token_losses"]),
            "engram_loss": float(np.mean([x for x in pc["engram_loss"] if x is not None]))
            if rs
            else None,
            f"{base}_loss": float(np.mean([x for x in pc["base_loss"] if x is not None]))
            if rs
            else None,
            "ratio": qs.paired_interval(rs) if rs else None,
        }
    gates = {}
    for s in seeds:
        g = by[(arm, s)]["gates"]
        if g is None:
            continue
        for k, m in classes.items():
            gates.setdefault(k, []).append(qs.gate_probe(g, m)["masked_mean"])
    return {
        "classes": out,
        "gate_mean": {
            k: float(np.mean([x for x in v if x is not None]))
            if any(x is not None for x in v)
            else None
            for k, v in gates.items()
        },
    }


def mean_curve(results: list[dict], arm: str) -> tuple[list, list]:
    """(mean curve [(tokens, loss)], band [(tokens, min, max)]) over the arm's seeds."""
    curves = [r["curve"] for r in results if r["arm"] == arm]
    if not curves:
        return [], []
    n = min(len(c) for c in curves)
    xs = [curves[0][i][0] for i in range(n)]
    ys = np.array([[c[i][1] for i in range(n)] for c in curves])
    return (
        list(zip(xs, ys.mean(0).tolist(), strict=True)),
        list(zip(xs, ys.min(0).tolist(), ys.max(0).tolist(), strict=True)),
    )


# ------------------------------------------------------------------------------ the studies


def study_grid(default: Recipe) -> list[tuple[str, Recipe]]:
    """Stage 1: table lr x table init scale (the two that interact: Adam's steps are lr-sized
    whatever the rows' scale, so the init sets how long the rows stay noise)."""
    return [
        (
            f"table lr {lr:g}x, init std {std:g}",
            dataclasses.replace(default, table_lr_mult=lr, table_init_std=std),
        )
        for lr in (5.0, 25.0, 100.0)
        for std in (1.0, 0.1, 0.01)
    ]


def study_around(best: Recipe, rows: int) -> list[tuple[str, Recipe]]:
    """Stage 2: one factor at a time from stage 1's best, whose tables have `rows` rows a head
    on the corpus studied (its own size, or the size rule's)."""
    r = dataclasses.replace
    layers = [
        (f"Engram at block{'s' if len(ls) > 1 else ''} {' and '.join(map(str, ls))}", ls)
        for ls in ((0,), (1,), (1, 2))
        if ls != best.engram_layers
    ]
    return [
        ("table lr follows the cosine", r(best, table_schedule="follow")),
        ("rows per head / 4", r(best, table_base_size=max(MIN_TABLE_ROWS, rows // 4))),
        ("rows per head x 4", r(best, table_base_size=rows * 4)),
        *((name, r(best, engram_layers=ls)) for name, ls in layers),
    ]


def sweep_fixed_params(
    cfg: TrainConfig, vocab: int, pad: int, budget: int, ratios: list[float]
) -> list[tuple[float, TrainConfig]]:
    """For each fraction r of `budget` in tables: table rows per head for r * budget and the
    width that brings the total nearest the budget."""
    m = cfg.model
    heads = m.hash_heads * (m.max_ngram - 1) * len(m.engram_layers or (1,))
    d_head = m.n_embed_per_ngram // m.hash_heads
    out = []
    for r in ratios:
        if r <= 0:
            c = dense_of(cfg)
            out.append((r, widen(c, vocab, pad, "params", budget)))
            continue
        rows = max(16, round(r * budget / (heads * d_head)))
        c = dataclasses.replace(cfg, model=dataclasses.replace(m, table_base_size=rows))
        best = None
        w = 2 * m.n_head
        while w < 4096:
            cw = with_width(c, w)
            total = measure(cw, vocab, pad)["params"]["total"]
            if best is None or abs(total - budget) < best[0]:
                best = (abs(total - budget), cw)
            if total > budget:
                break
            w += m.n_head
        assert best is not None
        out.append((r, best[1]))
    return out


def run_study(args, datas: dict, name: str, mode: str, recipe: Recipe, tokens: int) -> dict:
    """Stage 1 (study_grid) then stage 2 (study_around its best) on `name`'s tuning split, each
    Engram run paired with the dense arms of the same seed; the best by tuning loss is chosen."""
    d = datas[name]
    st = int(args.study_tokens or tokens // 4)
    seeds = list(range(args.study_seeds))
    n_train = len(d.tokens["train"])
    # the variants keep an auto size unsized (the chosen recipe is sized again per corpus by the
    # reported comparison); each job is sized for this corpus
    sized = recipe.sized(n_train, st)
    cfg0 = base_config(mode, sized, st)
    arms = arm_configs(cfg0, d.corpus.vocab_size, d.corpus.pad_id, False)
    # --no-dense: only the baseline the target is judged on (a budget-sized study)
    bases = ("dense_isoflop",) if args.no_dense else ("dense", "dense_isoflop")
    dense_jobs = [Job(name, a, arms[a], sized, s, "tune", tag=a) for a in bases for s in seeds]
    rows: list[dict] = []
    chosen: dict[str, Recipe] = {}

    def stage(variants: list[tuple[str, Recipe]], extra: list[Job]) -> None:
        jobs = [
            Job(name, "engram", base_config(mode, rec, st), rec, s, "tune", tag=label)
            for label, rec in ((lab, r.sized(n_train, st)) for lab, r in variants)
            for s in seeds
        ]
        log(
            f"recipe study on {name}'s tuning split: {len(jobs) + len(extra)} runs of {st / 1e6:.2f} M tokens"
        )
        res = run_jobs(extra + jobs, args.jobs, args.runs_dir)
        dense.update({(r["tag"], r["seed"]): r["val_loss"] for r in res if r["tag"] in arms})
        for label, rec in variants:
            rr = [r for r in res if r["tag"] == label]
            chosen[label] = rec
            rows.append(
                {
                    "variant": label,
                    "recipe": rec.label(),
                    "tune_loss": float(np.mean([r["val_loss"] for r in rr])),
                    "ratio_vs_dense": float(
                        np.mean([r["val_loss"] / dense[("dense", r["seed"])] for r in rr])
                    )
                    if "dense" in bases
                    else None,
                    "ratio_vs_dense_isoflop": float(
                        np.mean([r["val_loss"] / dense[("dense_isoflop", r["seed"])] for r in rr])
                    ),
                    "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rr])),
                }
            )

    dense: dict[tuple[str, int], float] = {}
    if args.study_grid:  # a given grid only: no extension, no stage 2
        grid = []
        for lr, std, given_rows, given_schedule in args.study_grid:
            n_rows = given_rows if given_rows is not None else recipe.table_base_size
            schedule = given_schedule or recipe.table_schedule
            label = f"table lr {lr:g}x, init std {std:g}"
            if given_rows is not None:
                label += f", {n_rows} rows a head"
            if given_schedule is not None:
                label += ", follows the cosine" if schedule == "follow" else ", constant"
            grid.append(
                (
                    label,
                    dataclasses.replace(
                        recipe,
                        table_lr_mult=lr,
                        table_init_std=std,
                        table_base_size=n_rows,
                        table_schedule=schedule,
                    ),
                )
            )
        stage(grid, dense_jobs)
    else:
        stage(study_grid(recipe), dense_jobs)
    for _ in range(
        0 if args.study_grid else 2
    ):  # extend the grid while its best lies on the edge (largest lr, least init)
        best1 = min(rows, key=lambda r: r["tune_loss"])
        b = chosen[best1["variant"]]
        lrs = {r.table_lr_mult for r in chosen.values()}
        stds = {r.table_init_std for r in chosen.values()}
        if b.table_lr_mult < max(lrs) and b.table_init_std > min(stds):
            break
        ext = [
            (
                f"table lr {lr:g}x, init std {std:g}",
                dataclasses.replace(b, table_lr_mult=lr, table_init_std=std),
            )
            for lr in sorted({b.table_lr_mult, b.table_lr_mult * 4})
            for std in sorted({b.table_init_std, b.table_init_std / 10})
        ]
        ext = [(k, v) for k, v in ext if v not in chosen.values()]
        stage(ext, [])
    best1 = min(rows, key=lambda r: r["tune_loss"])
    if not args.study_grid:
        b1 = chosen[best1["variant"]]
        stage(study_around(b1, b1.sized(n_train, st).table_base_size), [])
    best = min(rows, key=lambda r: r["tune_loss"])
    table = qs.ascii_table(
        rows, ["variant", "tune_loss", "ratio_vs_dense", "ratio_vs_dense_isoflop"]
    )
    log(table)
    log(f"chosen on the tuning split: {best['variant']} ({chosen[best['variant']].label()})")
    return {
        "corpus": name,
        "split": "tune",
        "tokens_per_run": st,
        "seeds": args.study_seeds,
        "dense_tune_loss": float(np.mean([v for (a, _), v in dense.items() if a == "dense"]))
        if "dense" in bases
        else None,
        "dense_isoflop_tune_loss": float(
            np.mean([v for (a, _), v in dense.items() if a == "dense_isoflop"])
        ),
        "rows": rows,
        "stage1_best": best1["variant"],
        "best": best["variant"],
        "chosen": dataclasses.asdict(chosen[best["variant"]]),
        "table": table,
    }


# ------------------------------------------------------------------------------------ main


def grid_points(text: str) -> list[tuple[float, float, int | None, str | None]]:
    """--study-grid: "LR:STD[:ROWS][:SCHEDULE],..." as (table lr mult, init std, rows a head or
    None, table schedule ("constant" or "follow") or None)."""
    points = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        schedule = parts.pop() if parts[-1] in SCHEDULES else None
        try:
            if len(parts) not in (2, 3):
                raise ValueError("want LR:STD, LR:STD:ROWS, and optionally :constant or :follow")
            lr, std = float(parts[0]), float(parts[1])
            n_rows = int(parts[2]) if len(parts) == 3 else None
            if not (math.isfinite(lr) and lr > 0 and math.isfinite(std) and std > 0):
                raise ValueError("LR and STD must be positive numbers")
            if n_rows is not None and n_rows < 2:
                raise ValueError("ROWS must be an integer >= 2")
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad point {item!r}: {e}") from None
        points.append((lr, std, n_rows, schedule))
    return points


def reported_seeds(args: argparse.Namespace) -> list[int]:
    """The reported comparison's seeds: --seeds of them from --first-seed on."""
    return list(range(args.first_seed, args.first_seed + args.seeds))


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `lo`."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = lo - 1
        if n < lo:
            raise argparse.ArgumentTypeError(f"want an integer >= {lo}, got {text!r}")
        return n

    return parse


def arm_configs(cfg: TrainConfig, vocab: int, pad: int, isoparam: bool) -> dict[str, TrainConfig]:
    e = measure(cfg, vocab, pad)
    arms = {"engram": cfg, "dense": dense_of(cfg)}
    arms["dense_isoflop"] = widen(dense_of(cfg), vocab, pad, "flops", e["forward_flops_per_token"])
    if isoparam:
        arms["dense_isoparam"] = widen(dense_of(cfg), vocab, pad, "params", e["params"]["total"])
    return arms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--corpus",
        default="stdlib,libdocs",
        help="comma-separated corpora: stdlib, libdocs, debdocs, devdocs (built in) or a text "
        "file/folder",
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="~0.5 M tokens a run (a smoke run)")
    g.add_argument("--budget", action="store_true", help=">= 10 M tokens a run, width 128")
    ap.add_argument("--tokens", type=float, default=None, help="tokens per run (overrides mode)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (>= 3 for an interval)")
    ap.add_argument(
        "--first-seed",
        type=int_at_least(0),
        default=0,
        help="the reported comparison runs seeds FIRST .. FIRST + SEEDS - 1 (0: from 0); to add "
        "seeds to an earlier run's, paired by seed (the JSON lists each seed's loss)",
    )
    ap.add_argument("--isoparam", action="store_true", help="also run dense_isoparam")
    ap.add_argument(
        "--engram-only",
        action="store_true",
        help="the reported comparison runs the Engram arm alone (each seed's loss in the JSON), "
        "to pair with an earlier run's baselines of the same seeds: a dense arm is the same run "
        "whatever the table recipe",
    )
    ap.add_argument(
        "--no-dense",
        action="store_true",
        help="skip the same-width dense arm (the target is judged on dense_isoflop)",
    )
    ap.add_argument("--study", action="store_true", help="the recipe study on the tuning split")
    ap.add_argument("--study-tokens", type=float, default=None, help="tokens per study run")
    ap.add_argument("--study-seeds", type=int, default=1)
    ap.add_argument(
        "--study-grid",
        type=grid_points,
        default=[],
        metavar="LR:STD[:ROWS][:SCHEDULE],...",
        help="study only these (table lr mult, init std[, rows a head][, table schedule]) "
        "points, e.g. 5:0.01,25:0.01:2500,100:0.01:follow",
    )
    ap.add_argument("--no-main", action="store_true", help="skip the reported comparison")
    ap.add_argument("--sweep", action="store_true", help="the allocation sweeps (2 seeds a point)")
    ap.add_argument("--sweep-tokens", type=float, default=None)
    ap.add_argument("--ratios", default="0,0.25,0.5,0.75", help="sweep (a): fractions in tables")
    ap.add_argument("--table-lr-mult", type=float, default=None, help="default recipe's table lr")
    ap.add_argument("--table-init-std", type=float, default=None)
    ap.add_argument("--table-schedule", choices=SCHEDULES, default=None)
    ap.add_argument("--table-base-size", type=int, default=None, help="rows per head")
    ap.add_argument("--engram-layers", default=None, help="blocks carrying Engram, e.g. 1 or 1,2")
    ap.add_argument(
        "--store-check", action="store_true", help="one Engram run through a real shard server"
    )
    ap.add_argument(
        "--store-steps",
        type=int_at_least(1),
        default=300,
        help="steps of each --store-check run (the budget's batch is 2,048 tokens)",
    )
    ap.add_argument(
        "--store-seed",
        type=int_at_least(0),
        default=None,
        help="seed of both --store-check runs (default: the trainer config's, 1337)",
    )
    ap.add_argument("--val-tokens", type=float, default=2e6, help="cap on validation tokens read")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--out", default="results", help="folder for the SVG plots and curves")
    ap.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="keep each run's result here as it finishes; rerunning with the same folder skips "
        "the runs already there (resume a stopped --budget)",
    )
    args = ap.parse_args()
    if args.runs_dir is not None and args.runs_dir.exists() and not args.runs_dir.is_dir():
        ap.error(f"--runs-dir {args.runs_dir}: not a folder (give a folder, new or existing)")

    t_all = time.perf_counter()
    load0 = os.getloadavg()
    mode = "budget" if args.budget else "quick" if args.quick else "default"
    tokens = int(args.tokens or {"budget": 10e6, "quick": 0.5e6, "default": 2e6}[mode])
    recipe = Recipe()  # the documented default (README "Quality"), changed only from a study
    recipe = dataclasses.replace(
        recipe,
        **{
            k: v
            for k, v in (
                ("table_lr_mult", args.table_lr_mult),
                ("table_init_std", args.table_init_std),
                ("table_schedule", args.table_schedule),
                ("table_base_size", args.table_base_size),
                (
                    "engram_layers",
                    tuple(int(x) for x in args.engram_layers.split(","))
                    if args.engram_layers
                    else None,
                ),
            )
            if v is not None
        },
    )
    corpora = [c.strip() for c in args.corpus.split(",") if c.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "quality", "mode": mode, "corpora": {}}

    datas = {}
    for name in corpora:
        d = cached_data(name, 4096)
        datas[name] = d
        log(
            f"corpus {name}: documents train/tune/val {d.docs.get('train')}/{d.docs.get('tune')}/"
            f"{d.docs.get('val')}, tokens {len(d.tokens['train']):,}/{len(d.tokens['tune']):,}/"
            f"{len(d.tokens['val']):,}, vocab {d.corpus.vocab_size}"
        )

    # 1. the recipe study, on the first corpus's tuning split
    if args.study:
        report["study"] = run_study(args, datas, corpora[0], mode, recipe, tokens)
        recipe = Recipe(
            **{
                **report["study"]["chosen"],
                "engram_layers": tuple(report["study"]["chosen"]["engram_layers"]),
            }
        )
    report["recipe"] = {**dataclasses.asdict(recipe), "label": recipe.label()}

    # 2. the reported comparison, every corpus, paired by seed
    all_curves: dict[str, Any] = {}
    if not args.no_main:
        seeds = reported_seeds(args)
        jobs = []
        arm_cfgs = {}
        for name in corpora:
            d = datas[name]
            rec = recipe.sized(len(d.tokens["train"]), tokens)
            cfg = base_config(mode, rec, tokens)
            arms = arm_configs(cfg, d.corpus.vocab_size, d.corpus.pad_id, args.isoparam)
            if args.no_dense:
                del arms["dense"]
            if args.engram_only:
                arms = {"engram": arms["engram"]}
            arm_cfgs[name] = arms
            ev_cap = max(1, int(args.val_tokens // (cfg.batch_size * cfg.seq_len)))
            for s in seeds:
                for arm, c in arms.items():
                    jobs.append(Job(name, arm, c, rec, s, "val", max_val_batches=ev_cap))
        log(f"reported comparison: {len(jobs)} runs of {tokens / 1e6:.2f} M tokens")
        res = run_jobs(jobs, args.jobs, args.runs_dir)
        for name in corpora:
            d = datas[name]
            rs = [r for r in res if r["corpus"] == name]
            arms = arm_cfgs[name]
            models = {
                arm: {"n_embd": c.model.n_embd, **measure(c, d.corpus.vocab_size, d.corpus.pad_id)}
                for arm, c in arms.items()
            }
            paired_init = (
                all(
                    next(r["init_sha"] for r in rs if r["arm"] == "engram" and r["seed"] == s)
                    == next(r["init_sha"] for r in rs if r["arm"] == "dense" and r["seed"] == s)
                    for s in seeds
                )
                if "dense" in arms
                else None
            )
            vs_iso = paired(rs, "engram", "dense_isoflop")
            vs_same = paired(rs, "engram", "dense")
            rec = recipe.sized(len(d.tokens["train"]), tokens)
            entry = {
                "recipe": {**dataclasses.asdict(rec), "label": rec.label()},
                "documents": d.docs,
                "tokens": {k: int(len(v)) for k, v in d.tokens.items()},
                "val_tokens_evaluated": int(len(rs[0]["token_losses"])),
                "tokens_per_run": tokens,
                "seeds": args.seeds,
                "seed_list": seeds,
                "models": models,
                "val_loss": {arm: spread(rs, arm) for arm in arms},
                "ratio_vs_dense_isoflop": vs_iso,
                "ratio_vs_dense": vs_same,
                "ratio_vs_dense_isoparam": paired(rs, "engram", "dense_isoparam")
                if "dense_isoparam" in arms
                else None,
                "meets_target": bool(
                    vs_iso.get("mean") is not None
                    and vs_iso["mean"] <= TARGET_RATIO
                    and vs_iso.get("hi") is not None
                    and vs_iso["hi"] < 1.0
                ),
                "backbone_init_identical": paired_init,
                "where": class_report(d, rs, "engram", "dense_isoflop"),
                "tokens_per_s": {
                    arm: float(np.mean([r["tokens_per_s"] for r in rs if r["arm"] == arm]))
                    for arm in arms
                },
                "train_s_per_run": {
                    arm: float(np.mean([r["train_s"] for r in rs if r["arm"] == arm]))
                    for arm in arms
                },
            }
            series, bands = {}, {}
            for arm in arms:
                series[arm], bands[arm] = mean_curve(rs, arm)
            all_curves[name] = {
                arm: [{"seed": r["seed"], "curve": r["curve"]} for r in rs if r["arm"] == arm]
                for arm in arms
            }
            svg = out_dir / f"quality_{Path(name).name}.svg"
            qs.svg_curves(
                series,
                svg,
                f"{name}: validation loss (mean of {args.seeds} seeds, min-max band)",
                bands=bands,
            )
            entry["plot"] = str(svg)
            report["corpora"][name] = entry
            ci = vs_iso
            same = (
                f"{vs_same['mean']:.4f}"
                if vs_same.get("mean") is not None
                else "not run (--no-dense)"
            )
            if args.engram_only:
                loss = entry["val_loss"]["engram"]
                by_seed = dict(zip(loss["seeds"], loss["per_seed"], strict=True))
                log(
                    f"{name}: engram val loss by seed {by_seed} (--engram-only: pair them with an "
                    "earlier run's baselines of the same seeds)"
                )
                continue
            log(
                f"{name}: engram / dense_isoflop = {ci.get('mean', float('nan')):.4f} "
                f"[{ci.get('lo')}, {ci.get('hi')}] over {ci.get('n')} seeds; engram / dense = "
                f"{same}"
            )

    # 3. the allocation sweeps
    if args.sweep:
        name = corpora[0]
        d = datas[name]
        V, pad = d.corpus.vocab_size, d.corpus.pad_id
        stoks = int(args.sweep_tokens or tokens // 4)
        recipe = recipe.sized(len(d.tokens["train"]), stoks)
        cfg = base_config(mode, recipe, stoks)
        budget = measure(cfg, V, pad)["params"]["total"]
        ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
        pts = [("params", r, c) for r, c in sweep_fixed_params(cfg, V, pad, budget, ratios)]
        for f in (0.25, 1.0, 4.0):
            n_rows = max(16, int(recipe.table_base_size * f))
            c = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, table_base_size=n_rows)
            )
            pts.append(("flops", f, c))
        pts.append(("flops", 0.0, dense_of(cfg)))
        jobs = [
            Job(name, f"{kind}:{x:g}", c, recipe, s, "tune", tag=f"sweep {kind} {x:g}")
            for kind, x, c in pts
            for s in range(2)
        ]
        log(f"allocation sweeps on {name}'s tuning split: {len(jobs)} runs of {stoks / 1e6:.2f} M")
        res = run_jobs(jobs, args.jobs, args.runs_dir)
        rows = []
        for kind, x, c in pts:
            rr = [r for r in res if r["arm"] == f"{kind}:{x:g}"]
            m = measure(c, V, pad)
            rows.append(
                {
                    "held_fixed": "total parameters" if kind == "params" else "FLOPs (backbone)",
                    "point": x,
                    "n_embd": c.model.n_embd,
                    "table_base_size": c.model.table_base_size if c.model.engram_layers else 0,
                    "table_fraction": m["params"]["table_fraction"],
                    "params_total": m["params"]["total"],
                    "forward_flops_per_token": m["forward_flops_per_token"],
                    "tune_loss": float(np.mean([r["val_loss"] for r in rr])),
                    "tune_loss_seeds": [r["val_loss"] for r in rr],
                }
            )
        report["sweep"] = {
            "corpus": name,
            "split": "tune",
            "tokens_per_run": stoks,
            "budget_params": budget,
            "rows": rows,
            "paper_optimum_fraction": list(PAPER_OPTIMUM),
            "table": qs.ascii_table(
                rows,
                [
                    "held_fixed",
                    "point",
                    "n_embd",
                    "table_fraction",
                    "params_total",
                    "forward_flops_per_token",
                    "tune_loss",
                ],
            ),
        }
        log(report["sweep"]["table"])

    # 4. one run through the real store beside the local one
    if args.store_check:
        report["store_check"] = store_check(
            datas[corpora[0]], corpora[0], recipe, mode, args.store_steps, args.store_seed
        )

    (out_dir / "quality_curves.json").write_text(json.dumps(all_curves))
    ent = list(report["corpora"].values())
    report.update(
        {
            "target_ratio": TARGET_RATIO,
            "meets_target": bool(ent) and all(e["meets_target"] for e in ent),
            "wall_s": time.perf_counter() - t_all,
            "loadavg_before": load0,
            "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "jobs": args.jobs,
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
    )
    print(json.dumps(report, default=_json_default))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return None  # per-token arrays stay out of the JSON
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# ------------------------------------------------------------------------------ store check


def store_check(
    d: Data, corpus: str, recipe: Recipe, mode: str, steps: int = 300, seed: int | None = None
) -> dict:
    """The Engram arm for `steps` steps twice: through the trainer's store backend (one shard
    server on 127.0.0.1, gRPC lookups and pushes, server-side Adam) and through the local
    backend, same seed (`seed`, else the config's) and batches; their train-loss curves and
    validation losses."""
    import contextlib
    import tempfile

    from engram_store.engine.config import ShardConfig
    from engram_store.rpc.config import ServerConfig
    from engram_store.rpc.server import create_server, stop_server
    from trainer.loop import train_worker

    torch.set_num_threads(1)
    _, seq, batch = shape(mode)
    recipe = recipe.sized(len(d.tokens["train"]), steps * seq * batch)
    cfg = base_config(mode, recipe, 1)
    cfg = dataclasses.replace(
        cfg,
        steps=steps,
        table_init_std=recipe.table_init_std,
        seed=cfg.seed if seed is None else seed,
    )
    cfg = dataclasses.replace(
        cfg,
        corpus="builtin" if corpus in ("stdlib", "builtin") else corpus,
        eval_batches=8,
        eval_every=max(5, (cfg.steps // 10) // 5 * 5),
        log_every=5,
        prefetch=dataclasses.replace(cfg.prefetch, depth=1, update="sync"),
    )
    out: dict[str, Any] = {"steps": cfg.steps, "seed": cfg.seed, "table_lr_mult": cfg.table_lr_mult}
    with tempfile.TemporaryDirectory() as tmp:
        server, port, shard = create_server(
            ServerConfig(ShardConfig(data_dir=f"{tmp}/shard"), workers=4)
        )
        try:
            runs = {
                "store": dataclasses.replace(
                    cfg, backend="store", store=(f"127.0.0.1:{port}",), out=f"{tmp}/s"
                ),
                "local": dataclasses.replace(cfg, backend="local", out=f"{tmp}/l"),
            }
            for name, c in runs.items():
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON alone
                    s = train_worker(c)
                out[name] = {
                    "val_loss_before": s.get("val_loss_before"),
                    "val_loss_after": s.get("val_loss_after"),
                    "train_loss_last": s.get("loss_last"),
                    "train_curve": [(h["step"], h["loss"]) for h in s["history"]],
                    "val_curve": [
                        (h["step"], h["val_loss"]) for h in s["history"] if "val_loss" in h
                    ],
                    "wall_s": time.perf_counter() - t0,
                }
                log(f"  store check, {name} backend: {out[name]}")
        finally:
            stop_server(server, shard, grace_s=1.0)
    a, b = out["store"]["val_loss_after"], out["local"]["val_loss_after"]
    out["val_loss_diff"] = None if a is None or b is None else a - b
    ts, tl = dict(out["store"]["train_curve"]), dict(out["local"]["train_curve"])
    common = sorted(set(ts) & set(tl))
    out["train_loss_max_abs_diff"] = max((abs(ts[k] - tl[k]) for k in common), default=None)
    vs, vl = dict(out["store"]["val_curve"]), dict(out["local"]["val_curve"])
    out["val_curve_max_abs_diff"] = max(
        (abs(vs[k] - vl[k]) for k in set(vs) & set(vl)), default=None
    )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
