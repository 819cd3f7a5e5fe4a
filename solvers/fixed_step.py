"""Explicit fixed-step Runge-Kutta solvers sharing one integration loop.

``nfe`` is a budget of function evaluations: a method with s stages takes ``max(1, nfe // s)``
steps, so the NFE it reports can exceed the budget when the budget is below s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from solvers.base import Callback, Sampler, Solution, Velocity, uniform_grid


class FixedStepSolver(Sampler):
    stages: int = 1

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        raise NotImplementedError

    def grid(self, nfe: int, device: torch.device | str = "cpu") -> Tensor:
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        return uniform_grid(max(1, nfe // self.stages), device=device)

    def __call__(
        self,
        velocity: Velocity,
        x: Tensor,
        grid: Tensor,
        callback: Callback | None = None,
        generator: torch.Generator | None = None,
    ) -> Solution:
        ts = grid.to(device=x.device, dtype=x.dtype)
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            x = self.step(velocity, x, t, t_next - t)
            if callback is not None:
                callback(t_next, x)
        return Solution(x, (len(ts) - 1) * self.stages)


class Euler(FixedStepSolver):
    """Forward Euler: first order, one evaluation per step."""

    stages = 1

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        return x + dt * velocity(x, t)


class Heun(FixedStepSolver):
    """Heun's method (explicit trapezoid): second order, two evaluations per step."""

    stages = 2

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        k1 = velocity(x, t)
        k2 = velocity(x + dt * k1, t + dt)
        return x + dt / 2 * (k1 + k2)


class Midpoint(FixedStepSolver):
    """Explicit midpoint rule: second order, two evaluations per step."""

    stages = 2

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        k1 = velocity(x, t)
        return x + dt * velocity(x + dt / 2 * k1, t + dt / 2)


class RK4(FixedStepSolver):
    """The classical fourth-order Runge-Kutta method: four evaluations per step."""

    stages = 4

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        k1 = velocity(x, t)
        k2 = velocity(x + dt / 2 * k1, t + dt / 2)
        k3 = velocity(x + dt / 2 * k2, t + dt / 2)
        k4 = velocity(x + dt * k3, t + dt)
        return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
