"""2D toy distributions, matching torchcfm's samplers so results compare with its benchmarks.

Each sampler draws ``n`` points with an explicit ``torch.Generator`` so data sets are
reproducible independently of the global RNG.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_moons(n: int, noise: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved half circles as torchcfm's ``sample_moons`` (torchdyn's ``generate_moons``).

    Unlike scikit-learn's make_moons, torchdyn adds one uniform offset ``U(0, noise)`` per point
    to both coordinates (a shift along the diagonal); torchcfm then scales by 3 and shifts by -1.
    The points are returned shuffled.
    """
    n_out = n // 2
    n_in = n - n_out
    a_out = torch.linspace(0, math.pi, n_out, dtype=torch.float64)
    a_in = torch.linspace(0, math.pi, n_in, dtype=torch.float64)
    outer = torch.stack([a_out.cos(), a_out.sin()], dim=1)
    inner = torch.stack([1 - a_in.cos(), 1 - a_in.sin() - 0.5], dim=1)
    x = torch.cat([outer, inner])
    x = x + noise * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    x = x[torch.randperm(n, generator=generator)]
    return (3 * x - 1).float()


def sample_8gaussians(n: int, scale: float = 5.0, var: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """Eight Gaussians on a circle of radius ``scale``, as torchcfm's ``sample_8gaussians``.

    torchcfm builds ``MultivariateNormal(0, sqrt(var) * I)``: the covariance is ``sqrt(var)``,
    so the per-axis standard deviation is ``var ** 0.25``. Kept as is so numbers compare.
    """
    s = 1 / math.sqrt(2)
    centers = scale * torch.tensor(
        [(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (-s, s), (s, -s), (-s, -s)], dtype=torch.float32
    )
    which = torch.randint(0, 8, (n,), generator=generator)
    noise = var**0.25 * torch.randn(n, 2, generator=generator)
    return centers[which] + noise


def sample_checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """The 4x4 checkerboard of FFJORD: uniform on alternate unit squares of [-4, 4]^2."""
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2 = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator) * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1) * 2
