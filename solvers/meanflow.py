"""Few-step sampling with a MeanFlow model's average velocity."""

from __future__ import annotations

import torch
from torch import Tensor

from solvers.base import Callback, Sampler, Solution, Velocity, uniform_grid


class MeanFlowSolver(Sampler):
    """Jump along the average velocity (Geng et al. 2025, Algorithm 2): on a uniform grid of
    ``nfe`` steps, ``x_r = x_t + (r - t) u(x_t, t, r)``. One step is one-step generation,
    ``x_1 = x_0 + u(x_0, 0, 1)``. A flow-matching model (u = v only at r = t) has no average
    velocity to jump along, so it samples only MeanFlow-trained models.
    """

    samples = ("average_velocity",)

    @property
    def name(self) -> str:
        return "meanflow"

    def grid(self, nfe: int, device: torch.device | str = "cpu") -> Tensor:
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        return uniform_grid(nfe, device=device)

    def __call__(
        self,
        velocity: Velocity,
        x: Tensor,
        grid: Tensor,
        callback: Callback | None = None,
        generator: torch.Generator | None = None,
    ) -> Solution:
        ts = grid.to(device=x.device, dtype=x.dtype)
        for t, r in zip(ts[:-1], ts[1:], strict=True):
            x = x + (r - t) * velocity(x, t, r)
            if callback is not None:
                callback(r, x)
        return Solution(x, len(ts) - 1)
