"""Shared helpers of the trainer-with-store tests: shard servers on port 0, a tiny config, and the
single-process reference (the model + LocalMemory + torch.optim.SparseAdam) the store must match."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib

import numpy as np
import torch

from engram_store.engine.config import ShardConfig
from engram_store.engine.init import initial_rows
from engram_store.rpc.config import ServerConfig
from engram_store.rpc.server import create_server, stop_server
from trainer.config import TrainConfig
from trainer.corpus import load_corpus, worker_batches
from trainer.engram import LocalMemory
from trainer.hashing import NgramHasher
from trainer.model import GPT
from trainer.tables import table_specs

ROOT = pathlib.Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def shard_servers(tmp_path: pathlib.Path, n: int = 2):
    """n in-process shard servers on port 0, each with its own LMDB dir; yields their addresses."""
    servers = [
        create_server(ServerConfig(ShardConfig(data_dir=str(tmp_path / f"shard{i}")), workers=4))
        for i in range(n)
    ]
    try:
        yield tuple(f"127.0.0.1:{port}" for _, port, _ in servers)
    finally:
        for server, _, shard in servers:
            stop_server(server, shard, grace_s=1.0)


def tiny_config(**kw) -> TrainConfig:
    """A model small enough for 20 exact steps in a second or two. `kw` in the flat names
    TrainConfig.from_dict maps into the nested configs (n_layer=..., prefetch_depth=...).

    lr 3e-4 and AdamW eps 1e-6: at lr 3e-3 / eps 1e-8 this tiny model is chaotic (a 1e-7 relative
    perturbation of the dense grads, the float noise of DDP's different summation order, grows to
    1e-2 in 20 steps), which would hide real differences behind rounding.
    """
    base = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        engram_layers=(1,),
        max_ngram=3,
        hash_heads=2,
        n_embed_per_ngram=16,
        table_base_size=500,
        corpus="synthetic",
        vocab_size=64,
        seq_len=16,
        batch_size=4,
        steps=20,
        lr=3e-4,
        adam_eps=1e-6,
        # the exactness tests' own regime (the paper's table lr and init), not the trainer's
        # default recipe: what they check is store == reference, at any recipe
        table_lr_mult=5.0,
        table_init_std=1.0,
        update="sync",
        eval_batches=0,
        log_every=5,
        progress=False,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def reference_run(cfg: TrainConfig, world: int = 1) -> tuple[dict, dict[int, np.ndarray]]:
    """Single-process training on the global batch (batch_size * world) with in-process tables.

    Returns (dense state_dict, {layer: table weights}).
    """
    ref_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * world, trainers=1)
    corpus = load_corpus(ref_cfg)
    torch.manual_seed(ref_cfg.seed)
    mcfg = ref_cfg.model_config(corpus.vocab_size, corpus.pad_id)
    model = GPT(mcfg)
    hasher = NgramHasher(mcfg.hash, corpus.lookup, corpus.compressed_vocab)
    specs = table_specs(ref_cfg, hasher)
    memory = LocalMemory(mcfg.hash)
    with torch.no_grad():  # the store's initial rows, so both start from the same table
        for layer, spec in specs.items():
            rows = initial_rows(spec, np.arange(spec.num_rows))
            memory.tables[str(layer)].weight.copy_(torch.from_numpy(rows))
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=ref_cfg.lr,
        weight_decay=ref_cfg.weight_decay,
        betas=(0.9, 0.95),
        eps=ref_cfg.adam_eps,
    )
    sparse = torch.optim.SparseAdam(list(memory.parameters()), lr=ref_cfg.table_lr)
    batches = worker_batches(corpus, "train", ref_cfg, 0, 1)
    for _ in range(ref_cfg.steps):
        x, y = next(batches)
        mem = memory(hasher.global_ids(x))
        _, loss = model(torch.from_numpy(x), mem, torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        sparse.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sparse.step()
    tables = {layer: memory.tables[str(layer)].weight.detach().numpy().copy() for layer in specs}
    return model.state_dict(), tables


def store_tables(addresses, cfg: TrainConfig, num_rows: dict[int, int]) -> dict[int, np.ndarray]:
    """Every row of each Engram table as the store holds it now."""
    from engram_store.rpc.client import StoreClient

    with StoreClient(list(addresses)) as c:
        return {
            layer: c.lookup(cfg.table_prefix + f"engram_l{layer}", np.arange(n))
            for layer, n in num_rows.items()
        }


def _spec(ckpt: dict, layer: int):
    from engram_store.engine.config import TableConfig

    return TableConfig.from_dict(ckpt["store"]["specs"][layer])


def assert_matches(ckpt_path: str, addresses, cfg: TrainConfig, ref: tuple, atol: float = 1e-5):
    """The run's checkpointed dense weights and the store's rows equal the reference."""
    state, tables = ref
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for name, want in state.items():
        got = ckpt["model"][name]
        assert torch.allclose(got, want, atol=atol, rtol=0), (
            f"{name}: max diff {(got - want).abs().max().item():.3g}"
        )
    rows = store_tables(addresses, cfg, {k: v.shape[0] for k, v in tables.items()})
    initial = {k: initial_rows(_spec(ckpt, k), np.arange(v.shape[0])) for k, v in tables.items()}
    for layer, want in tables.items():
        diff = np.abs(rows[layer] - want).max()
        assert diff <= atol, f"table of layer {layer}: max diff {diff:.3g}"
        moved = np.abs(rows[layer] - initial[layer]).max(axis=1) > 1e-4
        assert moved.sum() > 10, "the run did not train the table"
    assert ckpt["step"] == cfg.steps
