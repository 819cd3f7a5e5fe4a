"""A Gaussian mixture with k centres in D dimensions: dense data of any size."""

from __future__ import annotations

import torch
from torch import Tensor


class GaussianMixture:
    """k isotropic Gaussians whose centres are drawn once from N(0, center_scale^2 I).

    The centres depend only on ``center_seed``, so the train and eval sets (drawn with the
    data generator) come from the same mixture.
    """

    def __init__(self, k: int, dim: int, center_scale: float = 4.0, std: float = 0.5, center_seed: int = 0):
        g = torch.Generator().manual_seed(center_seed)
        self.centers = center_scale * torch.randn(k, dim, generator=g)
        self.std = std

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        which = torch.randint(0, len(self.centers), (n,), generator=generator)
        noise = torch.randn(n, self.centers.shape[1], generator=generator)
        return self.centers[which] + self.std * noise
