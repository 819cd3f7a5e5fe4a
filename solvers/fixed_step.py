"""Explicit fixed-step Runge-Kutta solvers sharing one integration loop.

``nfe`` is a budget of function evaluations: a method with s stages takes ``max(1, nfe // s)``
steps, so the NFE it reports can exceed the budget when the budget is below s.
"""

from __future__ import annotations

from torch import Tensor

from solvers.base import Callback, ODESolution, Solver, Velocity, uniform_grid


class FixedStepSolver(Solver):
    stages: int = 1

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, velocity: Velocity, x: Tensor, nfe: int, callback: Callback | None = None) -> ODESolution:
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        steps = max(1, nfe // self.stages)
        ts = uniform_grid(steps, device=x.device, dtype=x.dtype)
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            x = self.step(velocity, x, t, t_next - t)
            if callback is not None:
                callback(t_next, x)
        return ODESolution(x, steps * self.stages)


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
