"""A small decoder-only transformer with optional Engram layers (nanoGPT layout, RMSNorm).

The model holds no Engram tables: `forward(idx, memory)` takes each Engram layer's rows, fetched
from the store (or LocalMemory) by the trainer. With `engram_layers=()` it is the baseline: the same
backbone, no Engram.

Layer numbering: `engram_layers` are 0-based block indices, as in the authors' demo (layer 0 is the
first transformer block); docs/algorithm.md's "layers [1, 15]" means blocks 1 and 15 of a 30-block model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ModelConfig  # torch-free, so the CLI can read its defaults
from trainer.engram import EngramModule
from trainer.hashing import HashConfig, head_primes


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, D)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # (B, nh, T, hs)
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, D)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, D)


class Block(nn.Module):
    """RMSNorm -> attention -> RMSNorm -> MLP, with Engram added to the residual first if present."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.engram = None
        if layer in config.engram_layers:
            assert config.hash is not None
            with torch.random.fork_rng(devices=[]):  # draws nothing from the backbone's stream
                self.engram = EngramModule.from_hash_config(
                    config.n_embd, config.hash, config.hc_mult, config.kernel_size
                )
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        if self.engram is not None:
            x = x + self.engram(x, e)  # (B, T, D); the gate reads the un-normed residual
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only LM. forward(idx (B, T), memory {layer: (B, T, H, d_head)} | None, targets)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        # The backbone draws its init from the global RNG exactly as the model without Engram
        # does, so an Engram model and its baseline built after the same torch.manual_seed start
        # from identical backbone weights (a paired comparison). The Engram modules draw from
        # their own generator, seeded from the same seed and the layer.
        seed = torch.initial_seed()
        self._apply_backbone(self, self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and ".engram." not in name:
                # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for block in self.blocks:
            if block.engram is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((seed * 1_000_003 + 7919 * (block.layer + 1)) % 2**63)
                    block.engram.apply(self._init_weights)
                    nn.init.zeros_(block.engram.short_conv.conv.weight)  # the paper's zero conv

    @staticmethod
    def _apply_backbone(module: nn.Module, fn) -> None:
        """module.apply(fn) skipping Engram submodules (same visiting order as nn.Module.apply)."""
        for child in module.children():
            if not isinstance(child, EngramModule):
                GPT._apply_backbone(child, fn)
        fn(module)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def engram_layers(self) -> tuple[int, ...]:
        return self.config.engram_layers

    def forward(
        self,
        idx: torch.Tensor,
        memory: Mapping[int, torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, T, vocab) and the mean cross-entropy against targets (B, T) (-1 = ignore)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        missing = [layer for layer in self.engram_layers if memory is None or layer not in memory]
        if missing:
            raise ValueError(f"memory rows missing for Engram layer(s) {missing}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, D)
        for block in self.blocks:
            e = memory[block.layer] if block.engram is not None else None  # (B, T, H, d_head)
            x = block(x, e)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss


def param_split(model: GPT, hash_config: HashConfig | None = None) -> dict:
    """Parameter counts: backbone (dense, incl. embeddings), engram_dense (projections, norms, conv),
    engram_tables (sum(primes) * d_head per layer, held by the store) and their shares."""
    hash_config = hash_config if hash_config is not None else model.config.hash
    backbone = engram_dense = 0
    for name, p in model.named_parameters():  # named_parameters counts the tied head once
        if ".engram." in name:
            engram_dense += p.numel()
        else:
            backbone += p.numel()
    table_rows: dict[int, int] = {}
    tables = 0
    if hash_config is not None and model.engram_layers:
        primes = head_primes(hash_config)
        for layer in model.engram_layers:
            table_rows[layer] = sum(p for order in primes[layer] for p in order)
            tables += table_rows[layer] * hash_config.d_head
    total = backbone + engram_dense + tables
    return {
        "backbone": backbone,
        "engram_dense": engram_dense,
        "engram_tables": tables,
        "total": total,
        "table_rows": table_rows,
        "table_fraction": tables / total if total else 0.0,
    }


def summary(model: GPT, hash_config: HashConfig | None = None) -> str:
    """A few printable lines: the shape and the parameter split."""
    c = model.config
    s = param_split(model, hash_config)
    lines = [
        f"GPT: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size}, "
        f"vocab {c.vocab_size}",
        f"  backbone params     {s['backbone']:>15,}",
    ]
    if c.engram_layers:
        h = hash_config or c.hash
        lines += [
            f"  Engram layers {list(c.engram_layers)}: N={h.max_ngram}, K={h.heads}, "
            f"d_head={h.d_head}, memory width {h.memory_dim}",
            f"  engram dense params {s['engram_dense']:>15,}",
            f"  engram table params {s['engram_tables']:>15,}  "
            f"({', '.join(f'l{k}: {v:,} rows' for k, v in s['table_rows'].items())})",
            f"  total               {s['total']:>15,}  (tables {100 * s['table_fraction']:.1f}%)",
        ]
    return "\n".join(lines)
