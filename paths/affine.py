"""Probability paths: how a training pair (noise x_0, data x_1) becomes the point x_t a flow model sees and the
velocity it regresses.

Time runs from noise at t = 0 to data at t = 1, the direction the samplers integrate. The path is its own object
(as facebookresearch/flow_matching separates path, scheduler and solver), so a loss takes it as an argument and
a new path is one class and one YAML under configs/loss/path/.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (B,) viewed as (B, 1, ..., 1): one value per row of ``x``, broadcast over its other dimensions."""
    return t.view(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class PathSample:
    """A point x_t of the path and the target a flow loss regresses there: the conditional velocity d x_t / dt."""

    x_t: Tensor
    target: Tensor

    def __post_init__(self) -> None:
        if self.x_t.shape != self.target.shape:
            raise ValueError(f"x_t {tuple(self.x_t.shape)} and target {tuple(self.target.shape)} differ in shape")


class ProbabilityPath(ABC):
    """``path.sample(x_0, x_1, t) -> PathSample``: x_0 the noise (B, ...), x_1 the data of the same shape, t (B,)."""

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        if x_0.shape != x_1.shape or x_1.ndim == 0 or tuple(t.shape) != (x_1.shape[0],):
            raise ValueError(
                f"path.sample needs x_0 and x_1 of one shape (B, ...) and t of shape (B,); got x_0 "
                f"{tuple(x_0.shape)}, x_1 {tuple(x_1.shape)}, t {tuple(t.shape)}"
            )
        return self.interpolate(x_0, x_1, expand_like(t, x_1).to(x_1.dtype))

    @abstractmethod
    def interpolate(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """The sample for shapes already checked, ``t`` broadcast against x_1 and in its dtype."""


class AffinePath(ProbabilityPath):
    """``x_t = alpha_t x_1 + sigma_t x_0``, from pure noise (alpha_0 = 0, sigma_0 = 1) to the data (alpha_1 = 1,
    sigma_1 = 0); its velocity is ``d_alpha_t x_1 + d_sigma_t x_0``."""

    @abstractmethod
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha_t, sigma_t, d_alpha_t, d_sigma_t)``, the derivatives in t."""

    def interpolate(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = self.coefficients(t)
        return PathSample(sigma_t * x_0 + alpha_t * x_1, d_sigma_t * x_0 + d_alpha_t * x_1)


class LinearPath(AffinePath):
    """The straight line ``x_t = (1 - t) x_0 + t x_1`` with constant velocity ``x_1 - x_0``: conditional OT
    (Lipman et al. 2023, sigma_min = 0) and rectified flow (Liu et al. 2023).

    ``sigma > 0`` adds ``sigma * eps`` to x_t, torchcfm's ConditionalFlowMatcher: a tube of constant width around
    the line, so the target stays ``x_1 - x_0``.
    """

    def __init__(self, sigma: float = 0.0):
        if sigma < 0:
            raise ValueError(f"path.sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)

    def interpolate(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        x_t = torch.lerp(x_0, x_1, t)  # one fused kernel, exact at both ends
        if self.sigma > 0:
            x_t = x_t + self.sigma * torch.randn_like(x_t)
        return PathSample(x_t, x_1 - x_0)


class CosinePath(AffinePath):
    """``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)``: variance preserving (alpha_t^2 + sigma_t^2 = 1)
    for unit-variance data, the cosine schedule of Nichol & Dhariwal (2021) without its offset, as
    flow_matching's CosineScheduler."""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        angle = t * (math.pi / 2)
        sin, cos = torch.sin(angle), torch.cos(angle)
        return sin, cos, (math.pi / 2) * cos, -(math.pi / 2) * sin
