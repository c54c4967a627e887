"""EngramModule (docs/algorithm.md step 6) against a plain reference written here, forward and backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.engram import EngramModule, LocalMemory
from trainer.hashing import HashConfig, NgramHasher, head_primes


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference(mod: EngramModule, h, e, kernel, dilation):
    """Step 6 token by token, branch by branch, tap by tap."""
    B, T, M, D = h.shape
    eps = torch.finfo(h.dtype).eps  # nn.RMSNorm(eps=None)
    v = torch.zeros(B, T, M, D, dtype=h.dtype)
    v_rows = {}
    for b in range(B):
        for t in range(T):
            ef = e[b, t].reshape(-1)
            val = mod.value_proj.weight @ ef + mod.value_proj.bias
            for m in range(M):
                k = rms(
                    mod.key_projs[m].weight @ ef + mod.key_projs[m].bias, mod.norm_k[m].weight, eps
                )
                q = rms(h[b, t, m], mod.norm_q[m].weight, eps)
                s = (k * q).sum() / math.sqrt(D)
                s2 = torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))
                v_rows[b, t, m] = torch.sigmoid(s2) * val
    v = torch.stack(
        [
            torch.stack([torch.stack([v_rows[b, t, m] for m in range(M)]) for t in range(T)])
            for b in range(B)
        ]
    )  # (B, T, M, D)
    sc = mod.short_conv
    normed = torch.stack([rms(v[:, :, m], sc.norms[m].weight, 1e-5) for m in range(M)], dim=2)
    flat = normed.reshape(B, T, M * D)
    w = sc.conv.weight[:, 0, :]  # (M*D, kernel)
    out = []
    for t in range(T):
        acc = torch.zeros(B, M * D, dtype=h.dtype)
        for j in range(kernel):
            src = t - (kernel - 1 - j) * dilation  # causal: only positions <= t
            if src >= 0:
                acc = acc + w[:, j] * flat[:, src]
        out.append(acc)
    conv = torch.nn.functional.silu(torch.stack(out, dim=1)).reshape(B, T, M, D)
    return v + conv


@pytest.mark.parametrize("M", [1, 2])
def test_engram_module_matches_reference(M):
    torch.manual_seed(M)
    B, T, D, H, dh, N, kernel = 2, 9, 16, 4, 6, 3, 4
    mod = EngramModule(D, H * dh, max_ngram=N, hc_mult=M, kernel_size=kernel).double()
    assert torch.count_nonzero(mod.short_conv.conv.weight) == 0  # zero-initialised, as the paper
    with torch.no_grad():  # random everything, so every path carries gradient
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p.shape[0] == D else 0.0))
    h = torch.randn(B, T, M, D, dtype=torch.float64, requires_grad=True)
    e = torch.randn(B, T, H, dh, dtype=torch.float64, requires_grad=True)
    h_in = h[:, :, 0] if M == 1 else h  # M = 1 takes (B, T, D)
    y = mod(h_in, e)
    assert y.shape == h_in.shape
    y_ref = reference(mod, h, e, kernel, N)
    if M == 1:
        y_ref = y_ref[:, :, 0]
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)

    g = torch.randn_like(y)
    params = list(mod.parameters())
    grads = torch.autograd.grad((y * g).sum(), [e, h, *params])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [e, h, *params])
    names = ["e", "h"] + [n for n, _ in mod.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
        assert torch.count_nonzero(a) > 0, name


def test_engram_module_is_causal():
    torch.manual_seed(0)
    mod = EngramModule(8, 12, max_ngram=2, kernel_size=4)
    torch.nn.init.normal_(mod.short_conv.conv.weight)
    h, e = torch.randn(1, 10, 8), torch.randn(1, 10, 2, 6)
    y = mod(h, e)
    h2, e2 = h.clone(), e.clone()
    h2[:, 6:] += 1.0
    e2[:, 6:] -= 1.0
    torch.testing.assert_close(mod(h2, e2)[:, :6], y[:, :6])


def test_engram_module_shape_errors():
    mod = EngramModule(8, 12, max_ngram=3, hc_mult=2)
    with pytest.raises(ValueError, match="branches"):
        mod(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 2, 6))
    with pytest.raises(ValueError, match="memory"):
        mod(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 5))


def test_local_memory_rows_and_sparse_grad():
    cfg = HashConfig(layers=(0, 2), heads=2, base_sizes=(31, 37), n_embed_per_ngram=8)
    mem = LocalMemory(cfg)
    primes = head_primes(cfg)
    for layer in cfg.layers:
        assert mem.tables[str(layer)].weight.shape == (sum(sum(o) for o in primes[layer]), 4)
    hasher = NgramHasher(cfg, np.arange(20))
    ids = hasher.global_ids(np.random.default_rng(0).integers(0, 20, size=(2, 5)))
    rows = mem(ids)
    assert rows[2].shape == (2, 5, 4, 4)
    torch.testing.assert_close(rows[0][1, 3, 2], mem.tables["0"].weight[int(ids[0][1, 3, 2])])
    rows[0].sum().backward()
    assert mem.tables["0"].weight.grad.is_sparse
