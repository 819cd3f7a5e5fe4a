"""Few-step sampling with a MeanFlow model's average velocity."""

from __future__ import annotations

from torch import Tensor

from solvers.base import Velocity
from solvers.fixed_step import FixedStepSolver


class MeanFlowSolver(FixedStepSolver):
    """Jump along the average velocity (Geng et al. 2025, Algorithm 2): on a uniform grid of
    ``nfe`` steps, ``x_r = x_t + (r - t) u(x_t, t, r)``. One step is one-step generation,
    ``x_1 = x_0 + u(x_0, 0, 1)``. A flow-matching model (u = v only at r = t) has no average
    velocity to jump along, so it samples only MeanFlow-trained models.
    """

    stages = 1
    samples = ("average_velocity",)

    @property
    def name(self) -> str:
        return "meanflow"

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        return x + dt * velocity(x, t, t + dt)
