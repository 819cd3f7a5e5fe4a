"""Building blocks shared by the image models, all safe under forward-mode AD (``torch.func.jvp``).

MeanFlow differentiates the model along (x, t, r) with one jvp, so every op here must have a
forward-mode rule on CPU and CUDA: attention is written out (the fused SDPA kernels have none)
and group norm is composed from plain reductions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def zero_(module: nn.Module) -> None:
    """Zero every parameter of ``module`` in place (zero-initialised output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v over the last two dims; (B, heads, N, d) -> (B, heads, N, d)."""
    scale = q.shape[-1] ** -0.5
    weights = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # (B, h, N, N)
    return weights @ v


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed from mean/var reductions, so jvp works on every backend.

    Statistics are taken in fp32 under autocast, as the fused kernel does.
    """

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(shape[0], self.num_groups, -1)
        mean = h.mean(dim=-1, keepdim=True)
        var = h.var(dim=-1, unbiased=False, keepdim=True)
        h = ((h - mean) * torch.rsqrt(var + self.eps)).reshape(shape).to(x.dtype)
        if self.affine:
            view = (1, -1) + (1,) * (len(shape) - 2)
            h = h * self.weight.view(view) + self.bias.view(view)
        return h


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of a (B,) float time, as in DiT/ADM; (B,) -> (B, dim)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # float64 stays float64 (gradient checks)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``scale * t`` through a two-layer MLP.

    Our times live in [0, 1]; ``scale=1000`` spreads them over the frequency range the
    sinusoids were designed for (DiT's integer timesteps).
    """

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.fc1 = nn.Linear(freq_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(self.scale * t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(nn.functional.silu(self.fc1(features)))


class LabelEmbedder(nn.Module):
    """Class labels to vectors, with one extra learned row for "no class" (index ``num_classes``).

    ``cond=None`` selects the null row for the whole batch, which is what classifier-free
    guidance needs; a label of -1 selects it for that row, which is how the losses' condition
    dropout (models/conditioning.py) marks a dropped label without knowing the number of classes.
    """

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if cond is None:
            cond = torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
        return self.table(torch.where(cond < 0, self.num_classes, cond))
