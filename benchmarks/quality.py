"""Does the memory help? Dense baseline vs Engram at equal backbone compute, plus an allocation sweep.

    python benchmarks/quality.py [--corpus PATH] [--quick] [--steps N] [--curves FILE]

1. Baseline vs Engram: the same backbone (layers, width, heads), the same tokens in the same order,
   the same steps and seed; the Engram model adds one Engram layer (block 1) whose tables live
   in-process (trainer.fetch.LocalFetcher: nn.Embedding(sparse) + SparseAdam at table_lr_mult x lr,
   the trainer's local backend). Reported: validation loss of both over the whole validation split
   (capped by --val-batches) and the ratio engram / baseline (target <= 0.97). A third run,
   "engram_tuned", differs only in the table learning rate (--tuned-table-lr-mult x lr instead of
   the paper's 5x): in a few hundred steps a table row is updated a handful of times, so at this
   scale the paper's multiplier leaves the tables close to their random init.
2. Per-token loss on frequent multi-token names and phrases: (a) words of the training split that
   the tokenizer cuts into >= 2 tokens (e.g. " IPv|6"), the --top-words most frequent (BPE merges
   every very frequent word into one token, so these are mid-frequency names); (b) the
   --top-trigrams most frequent token trigrams. The loss on their non-first tokens (what an
   n-gram lookup can recall) vs every other token, both models.
3. Allocation sweep: a fixed total parameter budget (the baseline's parameters at --sweep-width)
   split between backbone width and Engram table rows at --ratios of the total in tables; same
   steps and tokens for every point (table lr: the tuned multiplier when given). The paper found a
   U shape with its optimum at 20-25%.

Writes the loss curves (train loss per step, validation loss every --eval-every steps, per model
and per sweep point) to --curves; prints progress to stderr and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import data  # noqa: E402
from trainer.config import ArchConfig, TrainConfig  # noqa: E402
from trainer.corpus import Corpus, corpus_from_prepared  # noqa: E402
from trainer.fetch import LocalFetcher  # noqa: E402
from trainer.hashing import NgramHasher  # noqa: E402
from trainer.model import GPT, param_split  # noqa: E402
from trainer.tables import table_specs  # noqa: E402

TARGET_RATIO = 0.97
PAPER_OPTIMUM = (0.20, 0.25)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Data:
    """The trainer's Corpus plus the token streams the phrase analysis needs."""

    corpus: Corpus
    train_tokens: np.ndarray  # (N,) the training split, documents joined by EOT
    val_tokens: np.ndarray
    name: str


def load_data(
    corpus: str | None, vocab_size: int, docs: list | None = None, cache_dir: str | None = None
) -> Data:
    """Tokenize (cached) and wrap as trainer.corpus.Corpus: the batches trainer.corpus.load_corpus
    yields (train: ds.batches; val: consecutive eval windows), from one prepare_data call.
    `docs` (trainer.data.Document list) replaces the corpus, e.g. for tests."""
    prep = data.prepare_data(corpus, vocab_size, cache_dir=cache_dir, docs=docs)
    ds = prep.dataset
    c = corpus_from_prepared(prep)
    return Data(
        c,
        np.asarray(ds.tokens("train"), np.int64),
        np.asarray(ds.tokens("val"), np.int64),
        corpus or "builtin (stdlib docstrings + pydoc topics)",
    )


# ------------------------------------------------------------------- frequent multi-token words


def _token_texts(tokenizer, vocab: int) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab)]


def word_runs(tokens: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every word: a maximal run of tokens where each token after the first
    starts with a letter/digit and its predecessor ends with one (no space or punctuation between)."""
    vocab = len(texts)
    first_alnum = np.array([bool(t) and t[0].isalnum() for t in texts], bool)
    last_alnum = np.array([bool(t) and t[-1].isalnum() for t in texts], bool)
    tok = np.clip(tokens, 0, vocab - 1)
    cont = np.zeros(len(tokens), bool)
    cont[1:] = first_alnum[tok[1:]] & last_alnum[tok[:-1]]
    starts = np.flatnonzero(~cont)
    lengths = np.diff(np.r_[starts, len(tokens)])
    return starts, lengths


def frequent_words(
    train: np.ndarray, texts: list[str], top: int
) -> list[tuple[tuple[int, ...], int]]:
    """The `top` most frequent words of >= 2 tokens whose text is a name (letters/digits/_)."""
    starts, lengths = word_runs(train, texts)
    multi = lengths >= 2
    counts: Counter = Counter()
    for s, n in zip(starts[multi].tolist(), lengths[multi].tolist(), strict=True):
        counts[tuple(train[s : s + n].tolist())] += 1
    out = []
    for key, c in counts.most_common():
        word = "".join(texts[t] for t in key).strip()
        if word.replace("_", "").isalnum() and c >= 2:
            out.append((key, c))
            if len(out) == top:
                break
    return out


def phrase_mask(tokens: np.ndarray, texts: list[str], words: set[tuple[int, ...]]) -> np.ndarray:
    """True at every non-first token of an occurrence of one of `words` in `tokens`."""
    starts, lengths = word_runs(tokens, texts)
    mask = np.zeros(len(tokens), bool)
    for s, n in zip(starts[lengths >= 2].tolist(), lengths[lengths >= 2].tolist(), strict=True):
        if tuple(tokens[s : s + n].tolist()) in words:
            mask[s + 1 : s + n] = True
    return mask


def frequent_trigrams(train: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top` most frequent token trigrams of the training split: (trigrams (k, 3), counts)."""
    t = train.astype(np.int64)
    v = int(t.max()) + 1
    keys = (t[:-2] * v + t[1:-1]) * v + t[2:]
    uniq, counts = np.unique(keys, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    k = uniq[order]
    return np.stack([k // (v * v), (k // v) % v, k % v], axis=1), counts[order]


def trigram_mask(tokens: np.ndarray, grams: np.ndarray) -> np.ndarray:
    """True at the 2nd and 3rd token of every occurrence of one of `grams` (k, 3) in `tokens`."""
    mask = np.zeros(len(tokens), bool)
    if not len(grams) or len(tokens) < 3:
        return mask
    v = int(max(tokens.max(), grams.max())) + 1
    t = tokens.astype(np.int64)
    keys = (t[:-2] * v + t[1:-1]) * v + t[2:]
    gk = (grams[:, 0] * v + grams[:, 1]) * v + grams[:, 2]
    hit = np.flatnonzero(np.isin(keys, gk))
    mask[hit + 1] = True
    mask[hit + 2] = True
    return mask


def split_losses(mask: np.ndarray, *runs: RunResult) -> dict:
    """Mean loss of each run on masked tokens vs the rest; ratios of each run to the baseline
    (`loss_ratio` for "engram", `loss_ratio_<name>` for the others)."""
    out: dict = {"val_tokens": int(mask.sum()), "val_other_tokens": int((~mask).sum())}
    for r in runs:
        out[r.name] = {
            "loss": float(r.token_losses[mask].mean()) if mask.any() else None,
            "other_loss": float(r.token_losses[~mask].mean()),
        }
    base = out.get("baseline")
    if mask.any() and base:
        for r in runs:
            if r.name == "baseline":
                continue
            sfx = "" if r.name == "engram" else "_" + r.name.removeprefix("engram_")
            out["loss_ratio" + sfx] = out[r.name]["loss"] / base["loss"]
            out["other_loss_ratio" + sfx] = out[r.name]["other_loss"] / base["other_loss"]
    return out


# ----------------------------------------------------------------------------- train / eval


@dataclasses.dataclass
class RunResult:
    name: str
    val_loss: float
    params: dict
    train_s: float
    steps: list[int]
    train_loss: list[float]
    val_steps: list[int]
    val_curve: list[float]
    token_losses: np.ndarray  # (n,) per-token validation loss, in stream order of the val targets
    n_embd: int
    table_base_size: int


class Trained:
    """A model with its in-process tables (LocalFetcher), for evaluation."""

    def __init__(self, cfg: TrainConfig, d: Data) -> None:
        torch.manual_seed(cfg.seed)
        c = d.corpus
        self.cfg = cfg
        self.mcfg = cfg.model_config(c.vocab_size, c.pad_id)
        self.model = GPT(self.mcfg)
        h = self.mcfg.hash
        self.hasher = NgramHasher(h, c.lookup, c.compressed_vocab) if h else None
        self.specs = table_specs(cfg, self.hasher) if self.hasher else {}
        self.fetcher = LocalFetcher(
            self.hasher,
            self.specs,
            h,
            c.batches("train", cfg.batch_size, cfg.seq_len, cfg.seed),
            torch.device("cpu"),
        )

    @torch.no_grad()
    def token_losses(self, windows: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Per-token cross-entropy over the given (x, y) batches, flattened in batch order."""
        self.model.eval()
        out = []
        for x, y in windows:
            mem = self.fetcher.memory(self.hasher.global_ids(x)) if self.hasher else None
            logits, _ = self.model(torch.from_numpy(x), mem)
            loss = F.cross_entropy(
                logits.flatten(0, 1), torch.from_numpy(y).reshape(-1), reduction="none"
            )
            out.append(loss.numpy())
        self.model.train()
        return np.concatenate(out)


def val_windows(d: Data, cfg: TrainConfig, max_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The validation split's consecutive non-overlapping windows (the trainer's eval batches)."""
    it = d.corpus.batches("val", cfg.batch_size, cfg.seq_len, cfg.seed)
    n_windows = (len(d.val_tokens) - 1) // cfg.seq_len
    n = max(1, min(max_batches, n_windows // cfg.batch_size))
    return [next(it) for _ in range(n)]


def train_run(
    name: str, cfg: TrainConfig, d: Data, windows: list, eval_every: int, curve_batches: int
) -> RunResult:
    """Train `cfg` with the trainer's local backend; evaluate on `windows`."""
    t = Trained(cfg, d)
    model, fetcher = t.model, t.fetcher
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )  # as trainer.loop.train_worker
    steps, losses, vsteps, vcurve = [], [], [], []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        f = fetcher.next()
        _, loss = model(f.x, f.memory, f.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fetcher.push(step, {})  # SparseAdam step on the tables' rows used this step
        steps.append(step)
        losses.append(float(loss.detach()))
        if eval_every and (step % eval_every == 0 or step == cfg.steps):
            vsteps.append(step)
            vcurve.append(float(t.token_losses(windows[:curve_batches]).mean()))
    train_s = time.perf_counter() - t0
    tl = t.token_losses(windows)
    split = param_split(model, t.mcfg.hash)
    split.pop("table_rows", None)
    log(
        f"  {name}: width {cfg.model.n_embd}, tables {split['engram_tables']:,} "
        f"({100 * split['table_fraction']:.0f}%), val loss {tl.mean():.4f}, {train_s:.0f} s"
    )
    return RunResult(
        name,
        float(tl.mean()),
        split,
        train_s,
        steps,
        losses,
        vsteps,
        vcurve,
        tl,
        cfg.model.n_embd,
        cfg.model.table_base_size if cfg.model.engram_layers else 0,
    )


# ---------------------------------------------------------------------------- allocation sweep


def count_params(cfg: TrainConfig, d: Data) -> dict:
    """param_split of the model `cfg` builds (on the meta device: no memory, no init cost)."""
    mcfg = cfg.model_config(d.corpus.vocab_size, d.corpus.pad_id)
    with torch.device("meta"):
        model = GPT(mcfg)
    return param_split(model, mcfg.hash)


def sweep_configs(
    base: TrainConfig, d: Data, budget: int, ratios: list[float]
) -> list[tuple[float, TrainConfig]]:
    """For each ratio r: tables hold ~r*budget parameters (rows per head = table_base_size) and
    the backbone width is the multiple of n_head that brings the total closest to the budget."""
    out = []
    m = base.model
    heads = m.hash_heads * (m.max_ngram - 1)
    d_head = m.n_embed_per_ngram // m.hash_heads
    for r in ratios:
        if r <= 0:
            layers, rows_per_head = (), m.table_base_size
        else:
            layers = m.engram_layers or (1,)
            rows_per_head = max(16, round(r * budget / (heads * d_head)))
        best = None
        for w in range(m.n_head * 2, 4096, m.n_head):
            cfg = dataclasses.replace(
                base,
                model=dataclasses.replace(
                    m, n_embd=w, engram_layers=layers, table_base_size=rows_per_head
                ),
            )
            p = count_params(cfg, d)
            dense = p["backbone"] + p["engram_dense"]
            if best is None or abs(p["total"] - budget) < best[0]:
                best = (abs(p["total"] - budget), cfg)
            if dense > budget:
                break
        out.append((r, best[1]))
    return out


# ------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="text file/folder (default: built-in corpus)")
    ap.add_argument("--quick", action="store_true", help="small model, few steps (~5 min, 2 CPUs)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep point")
    ap.add_argument(
        "--ratios",
        default="0,0.1,0.25,0.5,0.75",
        help="fractions of the parameter budget in tables, '' = no sweep",
    )
    ap.add_argument("--width", type=int, default=None, help="backbone width of the main pair")
    ap.add_argument(
        "--sweep-width",
        type=int,
        default=None,
        help="the budget: the baseline's parameters at this width",
    )
    ap.add_argument("--lr", type=float, default=None, help="backbone learning rate")
    ap.add_argument(
        "--table-lr-mult",
        type=float,
        default=5.0,
        help="table lr = this x backbone lr (the paper: 5)",
    )
    ap.add_argument(
        "--tuned-table-lr-mult",
        type=float,
        default=25.0,
        help="a third run (and the sweep) with this table lr multiplier; 0 = none. "
        "At a few hundred steps a table row sees few updates, so 5x barely "
        "moves the tables",
    )
    ap.add_argument("--top-words", type=int, default=2000, help="frequent multi-token words")
    ap.add_argument("--top-trigrams", type=int, default=1000, help="frequent token trigrams")
    ap.add_argument("--val-batches", type=int, default=64, help="validation batches (cap)")
    ap.add_argument("--curves", default="results/quality_curves.json", help="loss curves out")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default); 1 by default: on a shared machine "
        "torch's spinning OpenMP threads run 10x slower than one thread",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    q = args.quick
    base = TrainConfig(
        backend="local",
        corpus=args.corpus or "builtin",
        vocab_size=4096,
        model=ArchConfig(
            n_layer=4,
            n_head=4,
            n_embd=args.width or (96 if q else 256),
            engram_layers=(1,),
            max_ngram=3,
            hash_heads=4,
            n_embed_per_ngram=64 if q else 128,
            table_base_size=20_000 if q else 50_000,
        ),
        seq_len=64 if q else 128,
        batch_size=16,
        seed=1337,
        steps=args.steps or (500 if q else 2000),
        lr=args.lr or (2e-3 if q else 1e-3),
        table_lr_mult=args.table_lr_mult,
        progress=False,
    )
    sweep_steps = args.sweep_steps or (200 if q else 1000)
    sweep_width = args.sweep_width or (96 if q else 192)
    t_all = time.perf_counter()
    d = load_data(args.corpus, base.vocab_size)
    log(
        f"corpus {d.name}: {len(d.train_tokens):,} train / {len(d.val_tokens):,} val tokens, "
        f"vocab {d.corpus.vocab_size}"
    )
    windows = val_windows(d, base, args.val_batches)
    eval_every = max(1, base.steps // 20)
    curve_batches = 4

    # 1. baseline vs Engram, same backbone, tokens, steps, seed
    log("baseline vs Engram:")
    pairs = [("baseline", dataclasses.replace(base, model=base.model.baseline())), ("engram", base)]
    tuned = dataclasses.replace(base, table_lr_mult=args.tuned_table_lr_mult)
    if args.tuned_table_lr_mult:
        pairs.append(("engram_tuned", tuned))
    runs = {
        name: train_run(name, cfg, d, windows, eval_every, curve_batches) for name, cfg in pairs
    }
    b, e = runs["baseline"], runs["engram"]
    ratio = e.val_loss / b.val_loss
    et = runs.get("engram_tuned")

    # 2. frequent multi-token words and frequent token trigrams
    texts = _token_texts(d.corpus.tokenizer, d.corpus.vocab_size)
    words = frequent_words(d.train_tokens, texts, args.top_words)
    grams = frequent_trigrams(d.train_tokens, args.top_trigrams)
    # the windows are consecutive from the split's start: target j is val stream position j + 1
    n = len(b.token_losses)
    phrases = {
        "words": {
            "top": len(words),
            "min_count": words[-1][1] if words else None,
            "examples": ["|".join(texts[t] for t in w) for w, _ in words[:12]],
            **split_losses(
                phrase_mask(d.val_tokens, texts, {w for w, _ in words})[1 : 1 + n], *runs.values()
            ),
        },
        "trigrams": {
            "top": len(grams[0]),
            "min_count": int(grams[1][-1]) if len(grams[0]) else None,
            "examples": ["|".join(texts[t] for t in g) for g in grams[0][:12].tolist()],
            **split_losses(trigram_mask(d.val_tokens, grams[0])[1 : 1 + n], *runs.values()),
        },
    }

    # 3. allocation sweep at a fixed parameter budget
    sweep = []
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    if ratios:
        src = tuned if args.tuned_table_lr_mult else base
        sbase = dataclasses.replace(
            src, model=dataclasses.replace(src.model, n_embd=sweep_width), steps=sweep_steps
        )
        budget = count_params(dataclasses.replace(sbase, model=sbase.model.baseline()), d)["total"]
        log(f"allocation sweep, budget {budget:,} parameters, {sweep_steps} steps each:")
        for r, cfg in sweep_configs(sbase, d, budget, ratios):
            res = train_run(
                f"sweep{r:g}", cfg, d, windows, max(1, sweep_steps // 10), curve_batches
            )
            sweep.append(
                {
                    "target_fraction": r,
                    "table_fraction": res.params["table_fraction"],
                    "n_embd": cfg.model.n_embd,
                    "table_base_size": res.table_base_size,
                    "params": res.params,
                    "val_loss": res.val_loss,
                    "train_s": res.train_s,
                    "val_steps": res.val_steps,
                    "val_curve": res.val_curve,
                }
            )
    best = min(sweep, key=lambda s: s["val_loss"]) if sweep else None

    curves = {
        name: {
            "step": r.steps,
            "train_loss": r.train_loss,
            "val_step": r.val_steps,
            "val_loss": r.val_curve,
        }
        for name, r in runs.items()
    }
    curves["sweep"] = [
        {
            k: s[k]
            for k in (
                "target_fraction",
                "table_fraction",
                "n_embd",
                "val_loss",
                "val_steps",
                "val_curve",
            )
        }
        for s in sweep
    ]
    if args.curves:
        Path(args.curves).parent.mkdir(parents=True, exist_ok=True)
        Path(args.curves).write_text(json.dumps(curves))

    run_keys = (
        "vocab_size",
        "seq_len",
        "batch_size",
        "steps",
        "lr",
        "table_lr_mult",
        "weight_decay",
        "seed",
    )
    result = {
        "benchmark": "quality",
        "quick": q,
        "corpus": d.name,
        "train_tokens": int(len(d.train_tokens)),
        "val_tokens_evaluated": int(len(b.token_losses)),
        "tokens_trained": base.steps * base.batch_size * base.seq_len,
        "config": {**dataclasses.asdict(base.model), **{k: getattr(base, k) for k in run_keys}},
        "baseline": {"val_loss": b.val_loss, "params": b.params, "train_s": b.train_s},
        "engram": {"val_loss": e.val_loss, "params": e.params, "train_s": e.train_s},
        "val_loss_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "engram_tuned": {
            "table_lr_mult": tuned.table_lr_mult,
            "val_loss": et.val_loss,
            "train_s": et.train_s,
        }
        if et
        else None,
        "val_loss_ratio_tuned": et.val_loss / b.val_loss if et else None,
        "meets_target_tuned": et.val_loss / b.val_loss <= TARGET_RATIO if et else None,
        "sweep_table_lr_mult": sbase.table_lr_mult if ratios else None,
        "phrases": phrases,
        "sweep": [
            {k: v for k, v in s.items() if k not in ("val_steps", "val_curve")} for s in sweep
        ],
        "sweep_budget_params": budget if ratios else None,
        "sweep_steps": sweep_steps,
        "sweep_best_fraction": best["table_fraction"] if best else None,
        "sweep_best_target_fraction": best["target_fraction"] if best else None,
        "paper_optimum_fraction": list(PAPER_OPTIMUM),
        "curves": args.curves,
        "wall_s": time.perf_counter() - t_all,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    print(
        json.dumps(
            result, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
