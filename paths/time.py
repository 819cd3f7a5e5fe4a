"""Training-time samplers: the distribution of t (noise at 0, data at 1) a flow loss trains at.

A loss takes one as an argument, so another time distribution is a YAML under configs/loss/time_sampler/.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class TimeSampler(ABC):
    """``sampler(shape, device, dtype) -> t``: independent times in [0, 1] of that shape."""

    @abstractmethod
    def __call__(self, shape: int | tuple[int, ...], device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        """``dtype`` None: torch's default dtype."""


class UniformTimeSampler(TimeSampler):
    """t ~ U(0, 1): every noise level as often (Lipman et al. 2023)."""

    def __call__(self, shape: int | tuple[int, ...], device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        return torch.rand(shape, device=device, dtype=dtype)


class LogitNormalTimeSampler(TimeSampler):
    """logit(t) ~ N(mean, std^2): more training at intermediate times (Esser et al. 2024, SD3); mean > 0 leans
    towards the data.

    Drawn as ``1 - sigmoid(std z - mean)``, equal in law to ``sigmoid(mean + std z)``: it is how MeanFlow draws its
    times in the paper's reversed time (data at 0), so its seeded runs keep the same times bit for bit.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"time_sampler.std must be > 0, got {std}")
        self.mean = mean
        self.std = std

    def __call__(self, shape: int | tuple[int, ...], device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        z = torch.randn(shape, device=device, dtype=dtype)
        return 1 - torch.sigmoid(self.std * z - self.mean)
