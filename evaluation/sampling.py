"""Generating samples from a velocity model with any solver."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from solvers.base import ODESolution, Solver, Velocity


def velocity_of(model: nn.Module, cond: Tensor | None = None, guidance_scale: float = 1.0) -> Velocity:
    """The solver-facing ``velocity(x, t, r=t)`` of a model called as ``model(x, t, r, cond)``.

    With ``guidance_scale`` w != 1 and labels, classifier-free guidance (Ho & Salimans 2022):
    ``u(∅) + w (u(c) - u(∅))``, the unconditional call using the model's null class (cond=None).
    """

    def velocity(x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        t_b = t.to(x.dtype).expand(len(x))
        r_b = t_b if r is None else r.to(x.dtype).expand(len(x))
        u = model(x, t_b, r_b, cond).to(x.dtype)
        if cond is None or guidance_scale == 1.0:
            return u
        u_null = model(x, t_b, r_b, None).to(x.dtype)
        return u_null + guidance_scale * (u - u_null)

    return velocity


@torch.no_grad()
def sample(
    model: nn.Module,
    solver: Solver,
    noise: Tensor,
    nfe: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    trajectory_points: int = 0,
    cond: Tensor | None = None,
    guidance_scale: float = 1.0,
) -> tuple[ODESolution, Tensor | None]:
    """Integrate ``noise`` to samples; with ``trajectory_points > 0`` also return the path of the
    first that many points as a (T, N, D) tensor (T = steps + 1)."""
    path: list[Tensor] = []
    callback = None
    if trajectory_points:
        path.append(noise[:trajectory_points].float().cpu())

        def callback(t: Tensor, x: Tensor) -> None:
            path.append(x[:trajectory_points].float().cpu())

    with autocast():
        solution = solver(velocity_of(model, cond, guidance_scale), noise, nfe, callback)
    return solution, torch.stack(path) if path else None
