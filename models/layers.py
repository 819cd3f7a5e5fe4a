"""Building blocks shared by the image models.

Every block calls PyTorch's fused kernels (``F.group_norm``, ``F.scaled_dot_product_attention``).
MeanFlow differentiates the model along (x, t, r) with one ``torch.func.jvp``, and a forward-mode AD
through any model runs inside ``jvp_safe_kernels`` (losses/meanflow.py, tests/test_jvp_models.py):
- the fused attention kernels (flash, memory-efficient, CPU flash) have no forward-mode rule; inside it
  SDPA takes its math backend, composed of ops that have one;
- the fused group norm has a rule, but it costs about 1.3x the jvp of group norm written as mean/var
  reductions (measured on the digits UNet, CPU); inside it ``GroupNorm`` takes that form.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

_FORWARD_AD = contextvars.ContextVar("forward_ad", default=False)


@contextlib.contextmanager
def jvp_safe_kernels() -> Iterator[None]:
    """The kernels a jvp through the model needs: SDPA's math backend, group norm from reductions."""
    token = _FORWARD_AD.set(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _FORWARD_AD.reset(token)


def channels_last(h: Tensor) -> Tensor:
    """Activations in NHWC on CPU and CUDA, where the conv kernels (oneDNN, cuDNN) run fastest in it and
    group norm and SDPA keep it; ``(B, C, H, W) -> (B, HW, C)`` token views are then free. Parameters
    keep their layout, so checkpoints and exports do not change."""
    return h.contiguous(memory_format=torch.channels_last) if h.device.type in ("cpu", "cuda") else h


def maybe_checkpoint(enabled: bool, block: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``block(*args)``, through non-reentrant activation checkpointing when ``enabled`` and gradients are
    being recorded: its activations are recomputed in the backward instead of kept. Without gradients
    (sampling, MeanFlow's no-grad jvp) there is nothing to save, and the block runs as is."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def zero_(module: nn.Module) -> None:
    """Zero every parameter of ``module`` in place (zero-initialised output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with its statistics in fp32 whatever the activation dtype, returned in that
    dtype (GLIDE's GroupNorm32): bf16/fp16 statistics lose too much under autocast. Inside
    ``jvp_safe_kernels`` it is computed from mean/var reductions, whose forward-mode AD is cheaper."""

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = self._from_reductions(h) if _FORWARD_AD.get() else super().forward(h)
        return h.to(x.dtype)

    def _from_reductions(self, x: Tensor) -> Tensor:
        groups = x.reshape(x.shape[0], self.num_groups, -1)
        var, mean = torch.var_mean(groups, dim=-1, unbiased=False, keepdim=True)
        h = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if not self.affine:
            return h
        view = (1, -1) + (1,) * (x.dim() - 2)
        return h * self.weight.view(view) + self.bias.view(view)


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
