"""The Engram layer, model side (docs/algorithm.md steps 5-6), and a local stand-in for the memory store.

EngramModule holds only the small dense part (key/value projections, norms, short convolution). The
memory rows themselves arrive from outside as a tensor `e` (B, T, H, d_head), H = (N-1)*K heads: the
trainer fetches them from the store ahead of time (their addresses depend only on token ids), makes
them a leaf with requires_grad, and after backward pushes `e.grad` back to the store. LocalMemory
plays the store's part in tests and single-process reference runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.hashing import HashConfig, head_primes


class ShortConv(nn.Module):
    """Per-branch RMSNorm, causal depthwise Conv1d over all branches' channels, SiLU."""

    def __init__(
        self,
        dim: int,
        hc_mult: int = 1,
        kernel_size: int = 4,
        dilation: int = 1,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.hc_mult = hc_mult
        channels = dim * hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )
        # The paper zero-initialises the conv: at step 0 the Engram output is exactly v.
        nn.init.zeros_(self.conv.weight)
        self.norms = nn.ModuleList(nn.RMSNorm(dim, eps=norm_eps) for _ in range(hc_mult))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, M, D = x.shape  # (B, T, M, D)
        xn = torch.cat([self.norms[i](x[:, :, i]) for i in range(M)], dim=-1)  # (B, T, M*D)
        # symmetric padding then keep the first T outputs: output t sees inputs <= t only
        y = self.conv(xn.transpose(1, 2))[..., :T]  # (B, M*D, T)
        return F.silu(y).transpose(1, 2).reshape(B, T, M, D)  # (B, T, M, D)


class EngramModule(nn.Module):
    """Gates memory rows by the hidden state and mixes them locally (docs/algorithm.md step 6).

    forward(h, e): h (B, T, M, D) or (B, T, D) when M = 1; e (B, T, H, d_head) the layer's fetched
    rows in order-major head order. Returns y, same shape as h, to be added to the residual
    stream before attention.
    """

    def __init__(
        self, n_embd: int, memory_dim: int, max_ngram: int, hc_mult: int = 1, kernel_size: int = 4
    ):
        super().__init__()
        self.n_embd = n_embd
        self.memory_dim = memory_dim
        self.hc_mult = hc_mult
        self.value_proj = nn.Linear(memory_dim, n_embd)  # W_V, shared by the branches
        self.key_projs = nn.ModuleList(nn.Linear(memory_dim, n_embd) for _ in range(hc_mult))
        self.norm_k = nn.ModuleList(nn.RMSNorm(n_embd) for _ in range(hc_mult))
        self.norm_q = nn.ModuleList(nn.RMSNorm(n_embd) for _ in range(hc_mult))
        # dilation N: the conv mixes positions t, t-N, t-2N, ... (docs/algorithm.md step 6)
        self.short_conv = ShortConv(n_embd, hc_mult, kernel_size, dilation=max_ngram)
        self.record_gates = False  # when True, forward keeps its gates in self.gates (probes)
        self.gates: torch.Tensor | None = None  # (B, T, M) of the last forward

    @classmethod
    def from_hash_config(
        cls, n_embd: int, hash_config: HashConfig, hc_mult: int = 1, kernel_size: int = 4
    ) -> EngramModule:
        return cls(n_embd, hash_config.memory_dim, hash_config.max_ngram, hc_mult, kernel_size)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        single = h.dim() == 3
        if single:
            h = h.unsqueeze(2)  # (B, T, 1, D)
        B, T, M, D = h.shape
        if M != self.hc_mult:
            raise ValueError(f"hidden state has {M} branches, module was built for {self.hc_mult}")
        if e.shape[:2] != (B, T) or e.shape[2] * e.shape[3] != self.memory_dim:
            raise ValueError(
                f"memory rows {tuple(e.shape)} do not fit hidden state {tuple(h.shape)} "
                f"and memory width {self.memory_dim}"
            )
        e_flat = e.flatten(-2).to(h.dtype)  # (B, T, H*d_head)
        gates = []
        for m in range(M):
            k = self.norm_k[m](self.key_projs[m](e_flat))  # (B, T, D)
            q = self.norm_q[m](h[:, :, m])  # (B, T, D)
            s = (k * q).sum(dim=-1) / math.sqrt(D)  # (B, T)
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()  # keeps the sign, tames the scale
            gates.append(s.sigmoid())
        alpha = torch.stack(gates, dim=2).unsqueeze(-1)  # (B, T, M, 1)
        if self.record_gates:
            self.gates = alpha.detach().squeeze(-1)  # (B, T, M)
        v = alpha * self.value_proj(e_flat).unsqueeze(2)  # (B, T, M, D)
        y = v + self.short_conv(v)  # (B, T, M, D)
        return y.squeeze(2) if single else y


class LocalMemory(nn.Module):
    """The Engram tables in-process: one nn.Embedding(sum(primes), d_head, sparse=True) per layer.

    Row space and init match the store's tables (TableConfig head_rows = the layer's primes, normal
    init with std 1.0). Call with {layer: global row ids (B, T, H)} -> {layer: rows (B, T, H, d_head)}.
    """

    def __init__(self, hash_config: HashConfig, init_std: float = 1.0):
        super().__init__()
        self.layers = tuple(hash_config.layers)
        primes = head_primes(hash_config)
        self.tables = nn.ModuleDict()
        for layer in self.layers:
            rows = sum(p for order in primes[layer] for p in order)
            emb = nn.Embedding(rows, hash_config.d_head, sparse=True)
            nn.init.normal_(emb.weight, std=init_std)
            self.tables[str(layer)] = emb

    def forward(
        self, global_ids: Mapping[int, np.ndarray | torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        out = {}
        for layer in self.layers:
            ids = global_ids[layer]
            if isinstance(ids, np.ndarray):
                ids = torch.from_numpy(ids)
            table = self.tables[str(layer)]
            out[layer] = table(ids.to(table.weight.device, torch.long))  # (B, T, H, d_head)
        return out
