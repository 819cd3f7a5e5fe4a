"""Adaptive-step solvers from torchdiffeq."""

from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint

from solvers.base import Callback, ODESolution, Solver, Velocity


class Dopri5(Solver):
    """Dormand-Prince 5(4) with adaptive steps (torchdiffeq), within ``rtol``/``atol``.

    ``nfe`` is ignored: the tolerances decide the number of evaluations, which is counted and
    reported. ``callback`` sees the state at ``trajectory_times`` evenly spaced times.
    """

    adaptive = True

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, trajectory_times: int = 20):
        self.rtol = rtol
        self.atol = atol
        self.trajectory_times = trajectory_times

    def __call__(self, velocity: Velocity, x: Tensor, nfe: int = 0, callback: Callback | None = None) -> ODESolution:
        count = 0

        def func(t: Tensor, y: Tensor) -> Tensor:
            nonlocal count
            count += 1
            return velocity(y, t)

        points = self.trajectory_times if callback is not None else 1
        ts = torch.linspace(0.0, 1.0, points + 1, device=x.device, dtype=x.dtype)
        path = odeint(func, x, ts, rtol=self.rtol, atol=self.atol, method="dopri5")
        if callback is not None:
            for t, x_t in zip(ts[1:], path[1:], strict=True):
                callback(t, x_t)
        return ODESolution(path[-1], count)
