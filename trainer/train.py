"""The training loop: Engram rows from the store, dense weights data-parallel with Ray Train.

Per step (each trainer worker, rank r of W):
  take the prefetched batch (its memory rows are leaf tensors, requires_grad) -> forward/backward
  -> dense optimizer step (AdamW; DDP averaged the dense grads) -> push each Engram layer's
  unique-row gradients to the store with the global step (server-side Adam, table_lr_mult x lr, no
  weight decay, as in the paper).

With W > 1 the workers all-gather their (ids, grads) per layer, sum and divide by W (the average DDP
takes for dense grads), and each pushes the ids it owns (id % W == r), so every row is pushed once
per step, with the gradient of the whole global batch. In sync mode a barrier follows the pushes, so
no worker uses a row before every push of the step is acknowledged: training is then identical to a
single process on the concatenated batch. See trainer/prefetch.py for the async staleness bound.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_store.engine.config import ClientConfig, OptimizerConfig, TableConfig
from engram_store.engine.errors import ConfigError, EngramError
from trainer.engram import LocalMemory
from trainer.hashing import HashConfig, NgramHasher
from trainer.model import GPT, ModelConfig, param_split
from trainer.prefetch import PrefetchConfig, Prefetcher, PrefetchStats

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("store", "local")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The CLI builds it; workers receive it as a dict (to_dict/from_dict)."""

    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    engram_layers: tuple[int, ...] = (1,)  # 0-based block indices; () = baseline without Engram
    max_ngram: int = 3
    hash_heads: int = 4  # K heads per n-gram order
    n_embed_per_ngram: int = 128  # d_head = n_embed_per_ngram / hash_heads
    table_base_size: int = 50_000  # rows per head ~ this (a prime just above)
    hash_seed: int = 0
    # data
    corpus: str = "builtin"  # "builtin", a text file/directory, or "synthetic" (random tokens)
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16  # per trainer worker; the global batch is batch_size * trainers
    seed: int = 1337
    # optimisation
    steps: int = 200
    max_minutes: float = 0.0  # stop early (at a logging step) after this long; 0 = no limit
    lr: float = 1e-3
    weight_decay: float = 0.1
    adam_eps: float = 1e-8  # dense AdamW eps
    table_lr_mult: float = 5.0  # the paper: tables learn at 5x the backbone lr, no weight decay
    # store and prefetch
    backend: str = "store"  # "store" (remote tables) or "local" (LocalMemory + SparseAdam)
    store: tuple[str, ...] = ()  # shard addresses host:port; any shard publishes the others
    table_prefix: str = ""  # prepended to engram_l{layer}, so several runs can share a store
    store_token: str = ""  # bearer token of a store that requires authentication
    store_data_root: str = ""  # where the store cluster keeps its shards (for the checkpoint)
    update: str = "async"
    prefetch_depth: int = 1
    max_inflight: int = 2
    cache_rows: int = 0
    cache_staleness: int = 0
    cache_drop_pushed: bool = True  # False: pushed rows stay cached until stale (fewer fetches)
    # workers
    trainers: int = 1
    ray_train: bool = False  # use Ray Train even for one trainer (always for > 1)
    device: str = "auto"
    trainer_resource: str = ""  # e.g. "engram_trainer": a custom Ray resource each worker needs
    # evaluation, output
    eval_batches: int = 8
    eval_every: int = 0  # 0 = only before and after training
    log_every: int = 5
    out: str = ""  # run directory; "" = runs/<timestamp>
    resume: str = ""  # checkpoint to start from
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "engram_layers", tuple(int(x) for x in self.engram_layers))
        object.__setattr__(self, "store", tuple(self.store))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    @property
    def table_lr(self) -> float:
        return self.lr * self.table_lr_mult

    def prefetch_config(self) -> PrefetchConfig:
        return PrefetchConfig(depth=self.prefetch_depth, update=self.update,
                              max_inflight=self.max_inflight, cache_rows=self.cache_rows,
                              cache_staleness=self.cache_staleness,
                              cache_drop_pushed=self.cache_drop_pushed)

    def hash_config(self, pad_id: int) -> HashConfig | None:
        if not self.engram_layers:
            return None
        return HashConfig(layers=self.engram_layers, max_ngram=self.max_ngram,
                          heads=self.hash_heads,
                          base_sizes=(self.table_base_size,) * (self.max_ngram - 1),
                          pad_id=pad_id, seed=self.hash_seed,
                          n_embed_per_ngram=self.n_embed_per_ngram)

    def model_config(self, vocab_size: int, pad_id: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                           n_embd=self.n_embd, block_size=self.seq_len,
                           engram_layers=self.engram_layers, hash=self.hash_config(pad_id))

    def validate(self) -> None:
        """Fail before anything starts, with a message that says what to change."""
        bad = [x for x in self.engram_layers if not 0 <= x < self.n_layer]
        if bad:
            raise ConfigError(
                f"Engram layer(s) {bad} lie beyond the model depth: --layers {self.n_layer} has "
                f"blocks 0..{self.n_layer - 1}; lower --engram-layers or raise --layers")
        if self.engram_layers and self.max_ngram < 2:
            raise ConfigError(f"n-gram order {self.max_ngram} < 2: Engram hashes 2..N-grams; "
                              "use max_ngram >= 2")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r} is unknown; use one of {DEVICES}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is unknown; use one of {BACKENDS}")
        if self.backend == "store" and self.engram_layers and not self.store:
            raise ConfigError("no store address: start shards (engram serve, or the cluster) and "
                              "pass their host:port")
        for name in ("n_layer", "n_head", "n_embd", "seq_len", "batch_size", "trainers",
                     "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.steps < 0:
            raise ConfigError(f"steps={self.steps} must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr {self.lr} must be a positive number")
        self.prefetch_config().validate()
        if self.engram_layers:
            self.hash_config(0)  # HashConfig.validate: heads, widths, base sizes
        if self.backend == "local" and self.trainers > 1:
            raise ConfigError("the local (in-process) table backend supports one trainer; "
                              "use the store for several")


# ------------------------------------------------------------------------------------- data


@dataclass
class Corpus:
    """Tokens for training and validation plus what the hasher needs of the tokenizer."""

    vocab_size: int
    pad_id: int
    fingerprint: str  # identifies the tokenizer: a checkpoint only resumes with the same one
    lookup: np.ndarray  # (V,) base id -> compressed id (docs/algorithm.md step 1)
    compressed_vocab: int
    batches: Callable[..., Iterator[tuple[np.ndarray, np.ndarray]]]
    # batches(split, batch_size, seq_len, seed, start_step) -> endless (x, y) int64 (B, T)
    tokenizer: Any = None


def _synthetic_corpus(vocab_size: int) -> Corpus:
    """Random tokens from a Zipf-like distribution (repeated n-grams, as in text). For tests."""
    p = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    p /= p.sum()

    def batches(split: str, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        step = start_step
        while True:
            rng = np.random.default_rng([seed, SPLIT_IDS[split], step])
            toks = rng.choice(vocab_size, size=(batch_size, seq_len + 1), p=p).astype(np.int64)
            yield toks[:, :-1], toks[:, 1:]  # (B, T) inputs, (B, T) targets
            step += 1

    return Corpus(vocab_size, 0, f"synthetic-{vocab_size}", np.arange(vocab_size, dtype=np.int64),
                  vocab_size, batches)


SPLIT_IDS = {"train": 0, "val": 1}


def load_corpus(cfg: TrainConfig) -> Corpus:
    """The configured corpus: built-in (Python docstrings, BPE), a path, or synthetic tokens."""
    return _load_corpus(cfg.corpus, cfg.vocab_size)


@functools.lru_cache(maxsize=4)
def _load_corpus(corpus: str, vocab_size: int) -> Corpus:
    """Cached per process: reading the built-in corpus parses the stdlib (seconds)."""
    if corpus == "synthetic":
        return _synthetic_corpus(vocab_size)
    from trainer import data

    return corpus_from_prepared(
        data.prepare_data(None if corpus in ("builtin", "") else corpus, vocab_size))


def corpus_from_prepared(prep) -> Corpus:
    """A Corpus over trainer.data.prepare_data's result: train batches from the seeded sampler,
    validation as the split's consecutive windows, cycled."""
    from trainer.hashing import compress_tokenizer
    from trainer.tokenizer import PAD_ID

    ds = prep.dataset
    vocab = prep.tokenizer.get_vocab_size(with_added_tokens=True)
    lookup, compressed = compress_tokenizer(prep.tokenizer)

    def batches(split: str, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        if split == "train":
            for b in ds.batches("train", batch_size, seq_len, seed, start_step=start_step):
                yield b[:, :-1], b[:, 1:]  # (B, T) inputs, (B, T) targets
            return
        while True:  # validation: the split's consecutive windows, from the start, cycled
            for b in ds.eval_batches(split, batch_size, seq_len):
                yield b[:, :-1], b[:, 1:]

    fingerprint = hashlib.sha256(prep.tokenizer.to_str().encode()).hexdigest()[:16]
    return Corpus(vocab, PAD_ID, fingerprint, lookup, compressed, batches, prep.tokenizer)


def worker_batches(corpus: Corpus, split: str, cfg: TrainConfig, rank: int, world: int,
                   start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This worker's share of the global batch: rows [rank*B, (rank+1)*B) of each global batch.

    Every worker draws the same global batch, so W workers see exactly the batch that a single
    process with batch_size * W sees (what makes multi-worker sync training exact).
    """
    B = cfg.batch_size
    for x, y in corpus.batches(split, B * world, cfg.seq_len, cfg.seed, start_step):
        yield x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]


# ---------------------------------------------------------------------------------- store


def connect_store(addresses: tuple[str, ...] | list[str], token: str = "",
                  timeout_s: float = 10.0):
    """A StoreClient to the shards; ConfigError at once if none answers."""
    from engram_store.rpc.client import StoreClient

    try:
        probe = StoreClient(list(addresses), ClientConfig(timeout_s=timeout_s, retries=2,
                                                          token=token))
        probe.stats()
        probe.close()
        return StoreClient(list(addresses), ClientConfig(token=token))
    except EngramError as e:
        raise ConfigError(
            f"the memory store at {', '.join(addresses)} is unreachable ({e}); start it with "
            "`engram serve` / the cluster, or pass the right --store/--address") from None


def table_specs(cfg: TrainConfig, hasher: NgramHasher) -> dict[int, TableConfig]:
    """One table per Engram layer: the layer's primes as heads, Adam at table_lr, no decay."""
    opt = OptimizerConfig(kind="adam", lr=cfg.table_lr)
    return {layer: dataclasses.replace(hasher.table_spec(layer, optimizer=opt),
                                       name=cfg.table_prefix + f"engram_l{layer}")
            for layer in cfg.engram_layers}


class LocalFetcher:
    """Prefetcher's interface over in-process tables (LocalMemory + torch.optim.SparseAdam).

    The reference the remote store is measured against: same initial rows (the store's
    `initial_rows`), same optimizer semantics, no network.
    """

    def __init__(self, hasher: NgramHasher | None, specs: dict[int, TableConfig],
                 hash_config: HashConfig | None, batches: Iterator, device: torch.device) -> None:
        from engram_store.engine.init import initial_rows

        self.hasher, self.batches, self.device = hasher, batches, device
        self.memory = LocalMemory(hash_config).to(device) if hash_config else None
        with torch.no_grad():
            for layer, spec in specs.items():
                rows = initial_rows(spec, np.arange(spec.num_rows, dtype=np.int64))
                self.memory.tables[str(layer)].weight.copy_(torch.from_numpy(rows))
        self.opt = torch.optim.SparseAdam(list(self.memory.parameters()),
                                          lr=next(iter(specs.values())).optimizer.lr) \
            if specs else None
        self.stats = PrefetchStats()

    def next(self):
        from trainer.prefetch import Fetched

        x, y = next(self.batches)
        memory = self.memory(self.hasher.global_ids(x)) if self.memory is not None else {}
        x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
        self.stats.steps += 1
        self.stats.tokens += x.numel()
        return Fetched(0, x, y, memory, {}, {})

    def push(self, step: int, updates: dict, pushed_ids: dict | None = None) -> None:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def after_push(self, pushed: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ distributed


def _allreduce_sparse(updates: dict[int, tuple[np.ndarray, np.ndarray]], world: int
                      ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every worker's (ids, grads) per layer -> (union ids, summed grads / world) on every worker."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, updates)
    out = {}
    for layer in updates:
        ids = np.concatenate([g[layer][0] for g in gathered])
        grads = torch.from_numpy(np.concatenate([g[layer][1] for g in gathered]))
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = torch.zeros(len(uniq), grads.shape[1], dtype=torch.float32)
        summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)), grads)
        out[layer] = (uniq, (summed / world).numpy())
    return out


# ---------------------------------------------------------------------------------- worker


def resolve_device(name: str) -> torch.device:
    """auto: cuda if available, else cpu. cuda without a GPU is a configuration error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no GPU: install the CUDA build of torch "
                          "or use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def tokenizer_info(corpus: Corpus) -> dict:
    return {"fingerprint": corpus.fingerprint, "vocab_size": corpus.vocab_size}


def check_resume(cfg: TrainConfig, corpus: Corpus) -> dict | None:
    """The checkpoint to resume from, after checking it fits this tokenizer and model."""
    if not cfg.resume:
        return None
    path = Path(cfg.resume)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise ConfigError(f"--resume {cfg.resume}: no checkpoint there")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    tok = ckpt.get("tokenizer", {})
    if tok.get("vocab_size") != corpus.vocab_size or tok.get("fingerprint") != corpus.fingerprint:
        raise ConfigError(
            f"vocabulary mismatch: checkpoint {path} was trained with tokenizer "
            f"{tok.get('fingerprint')} (vocab {tok.get('vocab_size')}), this run uses "
            f"{corpus.fingerprint} (vocab {corpus.vocab_size}); use the same --corpus and "
            "vocabulary size, or start without --resume")
    return ckpt


@torch.no_grad()
def evaluate(model: torch.nn.Module, make_fetcher: Callable[[], Any], batches: int) -> float:
    """Mean validation loss over `batches` batches; rows are looked up, never pushed."""
    was = model.training
    model.eval()
    fetcher = make_fetcher()
    total = 0.0
    try:
        for _ in range(batches):
            f = fetcher.next()
            _, loss = model(f.x, f.memory, f.y)
            total += float(loss)
    finally:
        fetcher.close()
        model.train(was)
    return total / max(batches, 1)


def _log_line(step: int, steps: int, m: dict) -> str:
    return (f"step {step}/{steps} loss {m['loss']:.4f} tok/s {m['tokens_per_s']:.0f} "
            f"stall {m['stall_pct']:.1f}% rows/tok {m['rows_per_token']:.2f}")


def train_worker(cfg: TrainConfig, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, corpus: Corpus | None = None,
                 report: Callable[[dict], None] | None = None) -> dict:
    """Train on this process (one worker of `world`); returns the final summary (rank 0 saves).

    With world > 1, torch.distributed must already be initialised (Ray Train does it).
    """
    cfg.validate()
    device = device or resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    corpus = corpus or load_corpus(cfg)
    ckpt = check_resume(cfg, corpus)
    mcfg = cfg.model_config(corpus.vocab_size, corpus.pad_id)
    hcfg = mcfg.hash
    model = GPT(mcfg).to(device)
    hasher = NgramHasher(hcfg, corpus.lookup, corpus.compressed_vocab) if hcfg else None
    specs = table_specs(cfg, hasher) if hasher else {}
    tables = {layer: s.name for layer, s in specs.items()}

    store = None
    if specs and cfg.backend == "store":
        store = connect_store(cfg.store, cfg.store_token)
        if rank == 0:
            for spec in specs.values():
                store.create_table(spec)  # idempotent for the same spec
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # tables exist before anyone looks rows up

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95), eps=cfg.adam_eps)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
    dmodel = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dmodel = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Push request ids must be unique per run: a store remembers them (exactly-once retries), so
    # reusing ids of an earlier run on the same store would drop this run's pushes as duplicates.
    run_id = uuid.uuid4().hex[:12]

    def make_fetcher(split: str, batches_iter: Iterator, pcfg: PrefetchConfig):
        if cfg.backend == "local" or not specs:
            return LocalFetcher(hasher, specs, hcfg, batches_iter, device)
        return Prefetcher(store, hasher.global_ids, tables, batches_iter, pcfg, device,
                          dim=hcfg.d_head, request_prefix=f"{run_id}/r{rank}/{split}/")

    # The local backend keeps one fetcher (it owns the tables) for training and evaluation.
    train_iter = worker_batches(corpus, "train", cfg, rank, world, start_step=start)
    fetcher = make_fetcher("train", train_iter, cfg.prefetch_config())

    def val_fetcher():
        it = worker_batches(corpus, "val", cfg, rank, world)
        if isinstance(fetcher, LocalFetcher):
            return _Borrowed(fetcher, it)
        return make_fetcher("val", it, PrefetchConfig(depth=1, update="async"))

    val_before = evaluate(model, val_fetcher, cfg.eval_batches) if cfg.eval_batches else math.nan
    history: list[dict] = []
    bar = None
    if rank == 0 and cfg.progress and report is None:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    window_t, window_tokens, window_stall = time.perf_counter(), 0, fetcher.stats.stall_s
    loss_ema = None
    stopped_early = 0
    sync = cfg.update == "sync"
    try:
        for step in range(start + 1, cfg.steps + 1):
            f = fetcher.next()
            _, loss = dmodel(f.x, f.memory, f.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if specs:
                updates = f.grads() if cfg.backend == "store" else {}
                if world > 1:
                    import torch.distributed as dist

                    union = _allreduce_sparse(updates, world)
                    mine = {k: (ids[ids % world == rank], g[ids % world == rank])
                            for k, (ids, g) in union.items()}
                    union_ids = {k: v[0] for k, v in union.items()}
                    fetcher.push(step, mine, pushed_ids={})  # patches wait for the barrier
                    if sync:
                        dist.barrier()  # every worker's part of the step is acknowledged
                    fetcher.after_push(union_ids)
                else:
                    fetcher.push(step, updates)
            window_tokens += f.x.numel()
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                dt = now - window_t
                m = {"step": step, "loss": lv, "loss_ema": loss_ema,
                     "tokens_per_s": window_tokens * world / dt,
                     "stall_pct": 100 * (fetcher.stats.stall_s - window_stall) / dt,
                     "rows_per_token": fetcher.stats.rows_per_token}
                history.append(m)
                window_t, window_tokens, window_stall = now, 0, fetcher.stats.stall_s
                if cfg.max_minutes and _out_of_time(t_start, cfg.max_minutes, world, device):
                    stopped_early = step
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    m["val_loss"] = evaluate(model, val_fetcher, cfg.eval_batches)
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
                                    stall=f"{m['stall_pct']:.1f}%",
                                    rows_tok=f"{m['rows_per_token']:.2f}")
                elif report is not None:
                    report(m)
                elif rank == 0:
                    print(_log_line(step, cfg.steps, m), flush=True)
            if bar is not None and step > bar.n and step % cfg.log_every:
                bar.update(1)
            if stopped_early:
                break
        if hasattr(fetcher, "drain"):
            fetcher.drain()  # every push acknowledged before evaluation and the checkpoint
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    finally:
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - t_start
    val_after = evaluate(model, val_fetcher, cfg.eval_batches) if cfg.eval_batches else math.nan
    stats = fetcher.stats
    fetcher.close()
    last = stopped_early or cfg.steps
    steps_done = last - start
    summary = {
        "steps": last, "steps_run": steps_done, "trainers": world,
        "stopped_early": bool(stopped_early),
        "device": str(device), "update": cfg.update, "prefetch_depth": cfg.prefetch_depth,
        "train_s": train_s,
        "tokens_per_s": stats.tokens * world / train_s if train_s > 0 else 0.0,
        "step_ms": 1000 * train_s / max(steps_done, 1),
        "stall_pct": 100 * stats.stall_s / train_s if train_s > 0 else 0.0,
        "push_wait_pct": 100 * stats.wait_push_s / train_s if train_s > 0 else 0.0,
        "rows_per_token": stats.rows_per_token, "cache_hit_rate": stats.cache_hit_rate,
        "rows_refetched": stats.rows_refetched,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "val_loss_before": val_before, "val_loss_after": val_after,
        "params": param_split(model, hcfg), "tables": tables, "history": history,
    }
    if rank == 0:
        summary["checkpoint"] = save_checkpoint(cfg, model, opt, corpus, summary, store,
                                                {k: v.to_dict() for k, v in specs.items()})
    if store is not None:
        store.close()
    return summary


class _Borrowed:
    """A LocalFetcher's tables over another batch iterator (validation)."""

    def __init__(self, owner: LocalFetcher, batches: Iterator) -> None:
        self.owner, self.batches = owner, batches

    def next(self):
        saved, self.owner.batches = self.owner.batches, self.batches
        try:
            return self.owner.next()
        finally:
            self.owner.batches = saved

    def close(self) -> None:
        pass


def _out_of_time(t_start: float, minutes: float, world: int, device: torch.device) -> bool:
    """Whether the time budget is spent; with several workers, whether any worker says so (all
    workers call this at the same steps, so they stop together)."""
    late = time.perf_counter() - t_start > 60 * minutes
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([int(late)], device=device)  # nccl reduces CUDA tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        late = bool(flag.item())
    return late


def default_out() -> str:
    return str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def save_checkpoint(cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    corpus: Corpus, summary: dict, store: Any,
                    specs: dict[int, dict] | None = None) -> str:
    """Dense weights, optimizer, config, tokenizer identity, step and where the tables live.

    The store keeps the tables: the checkpoint records the table names, their step and the shard
    addresses (plus a snapshot path if the store offers a `snapshot` hook).
    """
    out = Path(cfg.out or default_out())
    out.mkdir(parents=True, exist_ok=True)
    store_info: dict[str, Any] = {"addresses": list(cfg.store), "tables": summary["tables"],
                                  "specs": specs, "data_root": cfg.store_data_root}
    if store is not None:
        try:
            from engram_store.ops.snapshot import snapshot

            # A consistent copy of every shard (each push wholly in or out), written by the shard
            # servers: on a multi-machine store the path must be on a shared filesystem.
            store_info["snapshot"] = snapshot(store, str((out / "store-snapshot").resolve()))
        except Exception as e:  # optional: a failed snapshot must not cost the run its dense
            # checkpoint; the tables stay in the store (data_root) either way
            store_info["snapshot_error"] = f"{type(e).__name__}: {e}"
        try:
            store_info["table_steps"] = {name: store.table_info(name).step
                                         for name in summary["tables"].values()}
        except EngramError:
            pass
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": cfg.to_dict(),
            "tokenizer": tokenizer_info(corpus), "step": summary["steps"], "store": store_info}
    path = out / "checkpoint.pt"
    torch.save(ckpt, path)
    slim = {k: v for k, v in summary.items() if k not in ("history",)}
    (out / "summary.json").write_text(json.dumps(slim, indent=2, default=str))
    return str(path)


# -------------------------------------------------------------------------------- Ray Train


class _SummarySink:
    """A tiny actor that receives rank 0's summary: works across nodes without shared storage
    (Ray Train's Result.metrics only carries metrics reported with a checkpoint)."""

    def __init__(self) -> None:
        self.summary: str | None = None

    def put(self, summary: str) -> None:
        self.summary = summary

    def get(self) -> str | None:
        return self.summary


def _ray_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry: rank and device from the train context."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.device != "cpu" else torch.device("cpu")
    summary = train_worker(cfg, rank, world, device)  # rank 0 prints a line per log window
    if rank == 0:
        sink = ray.get_actor(loop_config["sink"], namespace=loop_config["namespace"])
        ray.get(sink.put.remote(json.dumps(summary, default=str)))
    ray.train.report({"step": summary["steps"]})


def run_ray_train(cfg: TrainConfig) -> dict:
    """Data-parallel training over cfg.trainers Ray Train workers (DDP: gloo on CPU, nccl on GPU).

    Needs a connected Ray (ray.init done by the caller). Workers need one GPU each when the
    cluster has GPUs (or --device cuda), else one CPU, plus cfg.trainer_resource if set.
    Returns rank 0's summary.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and _cluster_has_gpus())
    resources: dict[str, float] = {"GPU": 1} if use_gpu else {"CPU": 1}
    if cfg.trainer_resource:
        resources[cfg.trainer_resource] = 1
    out = Path(cfg.out or default_out()).resolve()
    cfg = dataclasses.replace(cfg, out=str(out), progress=False,
                              device="cuda" if use_gpu else "cpu")
    name = f"engram-summary-{uuid.uuid4().hex[:8]}"
    namespace = ray.get_runtime_context().namespace
    sink = ray.remote(_SummarySink).options(name=name, namespace=namespace, num_cpus=0).remote()
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg.to_dict(), "sink": name, "namespace": namespace},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.trainers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"engram-{out.name}", storage_path=str(out / "ray")))
        result = trainer.fit()
        if result.error:
            raise result.error
        summary = ray.get(sink.get.remote())
    finally:
        ray.kill(sink)
    if summary is None:
        raise RuntimeError("Ray Train finished without a summary from rank 0; see the worker logs")
    return json.loads(summary)


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def train(cfg: TrainConfig) -> dict:
    """Run training: in this process for one trainer, else (or with ray_train) on Ray Train."""
    cfg.validate()
    if cfg.trainers > 1 or cfg.ray_train:
        return run_ray_train(cfg)
    return train_worker(cfg)


def print_summary(summary: dict, file=sys.stdout) -> None:
    """The final report of a run."""
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
    print("\n".join(lines), file=file)


