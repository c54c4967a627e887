"""The training loop of one worker: Engram rows from the store, dense weights data-parallel.

Per step (each trainer worker, rank r of W):
  take the prefetched batch (its memory rows are leaf tensors, requires_grad) -> forward/backward
  -> dense optimizer step (AdamW; DDP averaged the dense grads) -> push each Engram layer's
  unique-row gradients to the store with the global step (server-side Adam, table_lr_mult x lr, no
  weight decay, as in the paper).

With W > 1 the workers all-reduce their (ids, grads) per layer (trainer/allreduce.py) and each
pushes the ids it owns, so every row is pushed once per step, with the gradient of the whole global
batch. In sync mode a barrier follows the pushes, so no worker uses a row before every push of the
step is acknowledged: training is then identical to a single process on the concatenated batch.
See trainer/prefetch.py for the async staleness bound.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engram_store.engine.config import TableConfig
from engram_store.engine.errors import ConfigError
from trainer.allreduce import allreduce_sparse, owned
from trainer.checkpoint import check_resume, save_checkpoint
from trainer.config import PrefetchConfig, TrainConfig
from trainer.corpus import Corpus, worker_batches
from trainer.fetch import Fetcher, LocalFetcher
from trainer.hashing import NgramHasher
from trainer.metrics import TrainerMetrics
from trainer.model import GPT, param_split
from trainer.prefetch import Fetched, Prefetcher
from trainer.preset_data import run_corpus
from trainer.summary import DistinctRows, Meter, build_summary, store_summary
from trainer.tables import connect_store, open_tables, store_memory_bytes, table_specs

if TYPE_CHECKING:
    from engram_store.rpc.client import StoreClient

#: the row source of validation batches: rows are looked up, never pushed
VAL_PREFETCH = PrefetchConfig(depth=1, update="async")


def check_corpus(cfg: TrainConfig, corpus: Corpus, world: int | None = None) -> None:
    """Raise ConfigError, naming the `engram train` flags to change, unless the corpus yields a
    training batch and (with evaluation on) a validation batch of the configured shape. Cheap:
    draws one batch of each, so a run can check it before starting Ray or the store."""
    world = world or cfg.trainers
    splits = ["train"] + (["val"] if cfg.eval_batches else [])
    for split in splits:
        try:
            next(worker_batches(corpus, split, cfg, 0, world))
        except ConfigError as e:
            # the split's size (trainer/data.py words it as block_size); the advice is below
            facts = str(e).split(";")[0].replace("block_size", "--seq-len ")
            eval_advice = ", or --eval-batches 0 (no validation)" if split == "val" else ""
            raise ConfigError(
                f"--corpus {cfg.corpus} is too small for --seq-len {cfg.seq_len} and "
                f"--batch-size {cfg.batch_size} x {world} trainer(s): {facts}; lower --seq-len "
                f"or --batch-size, or give a larger --corpus (validation takes ~5% of its "
                f"documents){eval_advice}"
            ) from None


def resolve_device(name: str) -> torch.device:
    """auto: cuda if available, else cpu. cuda without a GPU is a configuration error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda but torch sees no GPU: install the CUDA build of torch "
            "or use --device cpu"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class Worker:
    """One trainer process's share of a run: model, optimizer, tables and its row source."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    corpus: Corpus
    model: GPT
    dmodel: torch.nn.Module  # the model, DDP-wrapped when world > 1
    opt: torch.optim.Optimizer
    hasher: NgramHasher | None
    specs: dict[int, TableConfig]  # layer -> its table; {} for the baseline
    store: StoreClient | None  # None for the local backend and the baseline
    start: int  # steps done before this run (resume)
    # Push request ids must be unique per run: a store remembers them (exactly-once retries), so
    # reusing ids of an earlier run on the same store would drop this run's pushes as duplicates.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    touched: DistinctRows = field(default_factory=DistinctRows)  # rows pushed, per layer
    fetcher: Fetcher = field(init=False)

    def row_source(self, split: str, batches: Iterator, pcfg: PrefetchConfig) -> Fetcher:
        """A Fetcher for `batches`: in-process tables (local backend, or no Engram) or the store."""
        hcfg = self.model.config.hash
        if self.cfg.backend == "local" or not self.specs:
            return LocalFetcher(self.hasher, self.specs, hcfg, batches, self.device)
        assert self.store is not None and self.hasher is not None and hcfg is not None
        tables = {layer: s.name for layer, s in self.specs.items()}
        return Prefetcher(
            self.store,
            self.hasher.global_ids,
            tables,
            batches,
            pcfg,
            self.device,
            dim=hcfg.d_head,
            request_prefix=f"{self.run_id}/r{self.rank}/{split}/",
        )

    def val_fetcher(self) -> Fetcher:
        """Validation batches; in-process tables are the training fetcher's own."""
        batches = worker_batches(self.corpus, "val", self.cfg, self.rank, self.world)
        if isinstance(self.fetcher, LocalFetcher):
            return self.fetcher.over(batches)
        return self.row_source("val", batches, VAL_PREFETCH)


def build_worker(
    cfg: TrainConfig, corpus: Corpus, rank: int, world: int, device: torch.device
) -> Worker:
    """The model (resumed if cfg.resume), its tables (created by rank 0) and the row source."""
    ckpt = check_resume(cfg, corpus)
    mcfg = cfg.model_config(corpus.vocab_size, corpus.pad_id)
    model = GPT(mcfg).to(device)
    hasher = NgramHasher(mcfg.hash, corpus.lookup, corpus.compressed_vocab) if mcfg.hash else None
    specs = table_specs(cfg, hasher) if hasher else {}
    store, specs = _open_store(cfg, specs, rank, world)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
        eps=cfg.adam_eps,
    )
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
    dmodel: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dmodel = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    w = Worker(cfg, rank, world, device, corpus, model, dmodel, opt, hasher, specs, store, start)
    w.fetcher = w.row_source(
        "train", worker_batches(corpus, "train", cfg, rank, world, start_step=start), cfg.prefetch
    )
    return w


def _open_store(
    cfg: TrainConfig, specs: dict[int, TableConfig], rank: int, world: int
) -> tuple[StoreClient | None, dict[int, TableConfig]]:
    """A client of the store with the run's tables created (None without store tables), and
    the tables as the store holds them: a preset run trains tables the store already has at
    the preset's geometry (imported ones) in their stored format (trainer.tables.open_tables)."""
    if not specs or cfg.backend != "store":
        return None, specs
    store = connect_store(cfg.store, cfg.store_token)
    if rank == 0:
        specs = open_tables(store, specs, adopt=bool(cfg.preset))
    if world > 1:
        dist.barrier()  # tables exist before anyone looks rows up
        specs = {layer: store.table_info(s.name).spec for layer, s in specs.items()}
    return store, specs


def _store_summary(w: Worker) -> dict:
    """The store after the run (rows touched and stored, bytes per parameter), {} without one."""
    if w.store is None:
        return {}
    tables = {layer: s.name for layer, s in w.specs.items()}
    memory = store_memory_bytes(w.cfg.store_metrics, w.cfg.store_token)
    return store_summary(w.store.stats(), tables, w.touched.counts(), memory)


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


def train_step(w: Worker, step: int) -> tuple[Fetched, torch.Tensor]:
    """One optimizer step on the next batch: dense weights here, table gradients pushed."""
    f = w.fetcher.next()
    _, loss = w.dmodel(f.x, f.memory, f.y)
    w.opt.zero_grad(set_to_none=True)
    loss.backward()
    w.opt.step()
    if w.specs:
        _push(w, step, f.grads())  # in-process tables: {} (their grads are in autograd)
    return f, loss


def _push(w: Worker, step: int, updates: dict) -> None:
    """This step's table gradients: pushed as they are (one worker), or averaged over the
    workers, each pushing the rows it owns (sync: acknowledged by all before the next step)."""
    if w.world == 1:
        for layer, (ids, _) in updates.items():
            w.touched.add(layer, ids)
        w.fetcher.push(step, updates)
        return
    union = allreduce_sparse(updates, w.world)
    for layer, (ids, _) in union.items():
        w.touched.add(layer, ids)
    w.fetcher.push(step, owned(union, w.rank, w.world), pushed_ids={})  # patches: after barrier
    if w.cfg.prefetch.update == "sync":
        dist.barrier()  # every worker's part of the step is acknowledged
    w.fetcher.after_push({layer: ids for layer, (ids, _) in union.items()})


def _out_of_time(t_start: float, minutes: float, world: int, device: torch.device) -> bool:
    """Whether the time budget is spent; with several workers, whether any worker says so (all
    workers call this at the same steps, so they stop together)."""
    late = time.perf_counter() - t_start > 60 * minutes
    if world > 1:
        flag = torch.tensor([int(late)], device=device)  # nccl reduces CUDA tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        late = bool(flag.item())
    return late


def _validation_loss(w: Worker) -> float:
    return evaluate(w.model, w.val_fetcher, w.cfg.eval_batches) if w.cfg.eval_batches else math.nan


def _run_steps(
    w: Worker, meter: Meter, t_start: float, metrics: TrainerMetrics | None = None
) -> int:
    """Steps start+1..cfg.steps; returns the step at which the time budget stopped it, else 0.
    Time spent in periodic evaluation goes to meter.eval_s (it is not training time)."""
    cfg = w.cfg
    for step in range(w.start + 1, cfg.steps + 1):
        t_step = time.perf_counter()
        f, loss = train_step(w, step)
        if metrics is not None:
            metrics.observe_stats(w.fetcher.stats)
        m = meter.add(step, f.x.numel(), float(loss.detach()), time.perf_counter() - t_step)
        if m is None:
            continue
        late = bool(cfg.max_minutes) and _out_of_time(t_start, cfg.max_minutes, w.world, w.device)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            t_eval = time.perf_counter()
            m["val_loss"] = _validation_loss(w)
            meter.exclude(time.perf_counter() - t_eval)
        meter.show(step, m)
        if late:
            return step
    return 0


def _serve_metrics(cfg: TrainConfig, rank: int) -> TrainerMetrics | None:
    """This worker's TrainerMetrics, served on 127.0.0.1 at cfg.metrics_port + rank (any free
    port when 0), the bound port said on stderr; None when cfg.metrics_port is None."""
    if cfg.metrics_port is None:
        return None
    metrics = TrainerMetrics(rank)
    port = metrics.serve(cfg.metrics_port + rank if cfg.metrics_port else 0)
    print(
        f"[engram] trainer metrics (rank {rank}) on http://127.0.0.1:{port}/metrics",
        file=sys.stderr,
        flush=True,
    )
    return metrics


def sized_for(cfg: TrainConfig, corpus: Corpus) -> TrainConfig:
    """cfg with an auto table size and table lr filled in for this corpus (TrainConfig.sized);
    a resumed run keeps its checkpoint's."""
    if not cfg.needs_sizing:
        return cfg
    ckpt = check_resume(cfg, corpus)
    return cfg.sized(corpus.train_tokens, ckpt["config"] if ckpt is not None else None)


def train_worker(
    cfg: TrainConfig,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    corpus: Corpus | None = None,
    report: Callable[[dict], None] | None = None,
    metrics: TrainerMetrics | None = None,
) -> dict:
    """Train on this process (one worker of `world`); returns the final summary (rank 0 saves
    the checkpoint). With world > 1, torch.distributed must already be initialised (Ray Train
    does it). `report(metrics)` replaces rank 0's progress output, once per logging window.
    `metrics` (else one served when cfg.metrics_port is set) observes every step."""
    cfg.validate()
    device = device or resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    corpus = corpus or run_corpus(cfg)
    cfg = sized_for(cfg, corpus)
    w = build_worker(cfg, corpus, rank, world, device)
    served = _serve_metrics(cfg, rank) if metrics is None else None
    metrics = metrics or served
    try:
        val_before = _validation_loss(w)
        meter = Meter(cfg, rank, world, w.start, w.fetcher.stats, report)
        t_start = time.perf_counter()
        try:
            stopped = _run_steps(w, meter, t_start, metrics)
            w.fetcher.drain()  # every push acknowledged before evaluation and the checkpoint
            if world > 1:
                dist.barrier()
        finally:
            meter.close()
        # training time: periodic evaluation excluded, like its tokens
        train_s = time.perf_counter() - t_start - meter.eval_s
        val_after = _validation_loss(w)
        w.fetcher.close()
        summary = build_summary(
            cfg,
            world=world,
            device=str(device),
            start=w.start,
            last=stopped or cfg.steps,
            stopped_early=bool(stopped),
            train_s=train_s,
            eval_s=meter.eval_s,
            tokens_trained=meter.tokens_trained,
            stats=w.fetcher.stats,
            history=meter.history,
            val_before=val_before,
            val_after=val_after,
            params=param_split(w.model, w.model.config.hash),
            tables={layer: s.name for layer, s in w.specs.items()},
            meter=meter,
            store=_store_summary(w),
        )
        if rank == 0:
            summary["checkpoint"] = save_checkpoint(
                cfg,
                w.model,
                w.opt,
                corpus,
                summary,
                w.store,
                {k: v.to_dict() for k, v in w.specs.items()},
            )
        return summary
    finally:
        if w.store is not None:
            w.store.close()
        if served is not None:
            served.close()
