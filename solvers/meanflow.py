"""Few-step sampling with a MeanFlow model's average velocity."""

from __future__ import annotations

from torch import Tensor

from solvers.base import Callback, ODESolution, Solver, Velocity, uniform_grid


class MeanFlowSolver(Solver):
    """Jump along the average velocity (Geng et al. 2025, Algorithm 2): on a uniform grid of
    ``nfe`` steps, ``x_r = x_t + (r - t) u(x_t, t, r)``. One step is one-step generation,
    ``x_1 = x_0 + u(x_0, 0, 1)``; for a flow-matching model (u = v) it would be Euler's method
    only if called with r = t, so use it with MeanFlow-trained models.
    """

    def __call__(self, velocity: Velocity, x: Tensor, nfe: int, callback: Callback | None = None) -> ODESolution:
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        ts = uniform_grid(nfe, device=x.device, dtype=x.dtype)
        for t, r in zip(ts[:-1], ts[1:], strict=True):
            x = x + (r - t) * velocity(x, t, r)
            if callback is not None:
                callback(r, x)
        return ODESolution(x, nfe)
