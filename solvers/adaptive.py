"""Adaptive-step solvers from torchdiffeq."""

from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint

from solvers.base import Callback, Sampler, Solution, Velocity


class Dopri5(Sampler):
    """Dormand-Prince 5(4) with adaptive steps (torchdiffeq), within ``rtol``/``atol``.

    The tolerances decide the number of evaluations, which is counted and reported; the grid holds
    the output times: ``trajectory_times`` evenly spaced ones (what a callback sees).
    """

    adaptive = True

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, trajectory_times: int = 20):
        self.rtol = rtol
        self.atol = atol
        self.trajectory_times = trajectory_times

    def grid(self, nfe: int = 0, device: torch.device | str = "cpu") -> Tensor:
        return torch.linspace(0.0, 1.0, self.trajectory_times + 1, device=device)

    def __call__(
        self,
        velocity: Velocity,
        x: Tensor,
        grid: Tensor,
        callback: Callback | None = None,
        generator: torch.Generator | None = None,
    ) -> Solution:
        count = 0

        def func(t: Tensor, y: Tensor) -> Tensor:
            nonlocal count
            count += 1
            return velocity(y, t)

        ts = grid.to(device=x.device, dtype=x.dtype) if callback is not None else grid[[0, -1]].to(x.device, x.dtype)
        path = odeint(func, x, ts, rtol=self.rtol, atol=self.atol, method="dopri5")
        if callback is not None:
            for t, x_t in zip(ts[1:], path[1:], strict=True):
                callback(t, x_t)
        return Solution(path[-1], count)
