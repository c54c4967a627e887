"""The backbone with and without Engram: forward/backward, memory plumbing, config errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engram_store.engine.errors import ConfigError
from trainer.engram import LocalMemory
from trainer.hashing import HashConfig, NgramHasher, head_primes
from trainer.model import GPT, ModelConfig, param_split, summary

HASH = HashConfig(
    layers=(1, 2), max_ngram=3, heads=2, base_sizes=(97, 89), pad_id=2, n_embed_per_ngram=16
)
CFG = ModelConfig(
    vocab_size=64, n_layer=3, n_head=2, n_embd=32, block_size=16, engram_layers=(1, 2), hash=HASH
)


def test_forward_backward_with_engram():
    torch.manual_seed(0)
    model = GPT(CFG)
    mem = LocalMemory(HASH)
    hasher = NgramHasher(HASH, np.arange(CFG.vocab_size))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 13))
    idx, targets = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
    # the trainer's path: rows fetched elsewhere become leaves; their .grad goes back to the store
    rows = {
        k: v.detach().requires_grad_(True)
        for k, v in mem(hasher.global_ids(tokens[:, :-1])).items()
    }
    assert rows[1].shape == (2, 12, HASH.heads_per_layer, HASH.d_head)
    logits, loss = model(idx, rows, targets)
    assert logits.shape == (2, 12, CFG.vocab_size) and loss.ndim == 0
    assert abs(loss.item() - np.log(CFG.vocab_size)) < 0.5
    loss.backward()
    for layer in (1, 2):
        assert rows[layer].grad is not None and rows[layer].grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_forward_backward_through_local_memory():
    torch.manual_seed(0)
    model, mem = GPT(CFG), LocalMemory(HASH)
    hasher = NgramHasher(HASH, np.arange(CFG.vocab_size))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(2, 9))
    _, loss = model(
        torch.from_numpy(tokens[:, :-1]),
        mem(hasher.global_ids(tokens[:, :-1])),
        torch.from_numpy(tokens[:, 1:]),
    )
    loss.backward()
    assert mem.tables["1"].weight.grad.is_sparse


def test_baseline_forward_backward():
    base = CFG.baseline()
    assert base.engram_layers == () and base.hash is None
    model = GPT(base)
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = model(idx, None, idx)
    loss.backward()
    assert logits.shape == (2, 16, 64)
    assert not any(".engram." in n for n, _ in model.named_parameters())
    # same backbone: every baseline parameter exists, with the same shape, in the Engram model
    eng = dict(GPT(CFG).named_parameters())
    for n, p in model.named_parameters():
        assert eng[n].shape == p.shape


def test_missing_memory_raises():
    with pytest.raises(ValueError, match=r"Engram layer\(s\) \[1, 2\]"):
        GPT(CFG)(torch.zeros(1, 4, dtype=torch.long))


def test_param_split_and_summary():
    model = GPT(CFG)
    split = param_split(model)
    primes = head_primes(HASH)
    rows = {layer: sum(sum(o) for o in primes[layer]) for layer in (1, 2)}
    assert split["table_rows"] == rows
    assert split["engram_tables"] == sum(rows.values()) * HASH.d_head
    assert split["backbone"] == sum(p.numel() for p in GPT(CFG.baseline()).parameters())
    assert split["total"] == split["backbone"] + split["engram_dense"] + split["engram_tables"]
    text = summary(model)
    assert "engram table params" in text and "l1:" in text


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(engram_layers=(1, 3)), "engram_layers"),
        (dict(engram_layers=(-1,), hash=None), "engram_layers"),
        (dict(engram_layers=(2, 1)), "hash.layers"),
        (dict(n_embd=31), "n_embd"),
        (dict(hc_mult=2), "hc_mult"),
        (dict(vocab_size=2), "pad_id"),
    ],
)
def test_bad_model_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(CFG, **change)


def test_ngram_order_below_two_names_the_field():
    with pytest.raises(ConfigError, match="max_ngram"):
        ModelConfig(
            n_layer=2, engram_layers=(1,), hash=HashConfig(layers=(1,), max_ngram=1, base_sizes=())
        )


def test_default_hash_config_follows_engram_layers():
    cfg = ModelConfig(n_layer=4, engram_layers=(1, 3))
    assert cfg.hash.layers == (1, 3) and cfg.hash.base_sizes == (646400, 646400)


def test_engram_and_baseline_share_the_backbone_init():
    """Issue 13: after the same manual_seed the Engram model's backbone weights equal the
    baseline's (the Engram modules draw from their own generator), so a comparison is paired."""
    cfg = CFG
    base = dataclasses.replace(cfg, engram_layers=(), hash=None)
    torch.manual_seed(11)
    e = GPT(cfg)
    torch.manual_seed(11)
    b = GPT(base)
    bp = dict(b.named_parameters())
    shared = [n for n, _ in e.named_parameters() if ".engram." not in n]
    assert set(shared) == set(bp)
    assert all(torch.equal(p, bp[n]) for n, p in e.named_parameters() if n in bp)
    # the Engram modules are still initialised (not zeros), reproducibly, and differ by seed
    torch.manual_seed(11)
    again = GPT(cfg)
    torch.manual_seed(12)
    other = GPT(cfg)
    ev = dict(e.named_parameters())
    for n, p in again.named_parameters():
        assert torch.equal(p, ev[n])
    w = [n for n in ev if n.endswith("value_proj.weight")][0]
    assert 0.015 < float(ev[w].detach().std()) < 0.025
    assert not torch.equal(ev[w], dict(other.named_parameters())[w])
