"""Generating samples from a velocity model with any solver."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
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


def to_unit_range(x: Tensor) -> Tensor:
    """Model space [-1, 1] to image space [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


class ImageSampler:
    """``generate(start, stop)`` for ``write_samples``: images in [0, 1] for sample indices [start, stop).

    Sample i starts from noise drawn from its own seed (``seed``, i), with label i % K for
    class-conditional models, so it is the same image however the samples are batched and
    wherever an interrupted run resumes. ``decode`` maps latents to pixels in [-1, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        solver: Solver,
        nfe: int,
        shape: tuple[int, ...],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        seed: int = 0,
        num_classes: int = 0,
        guidance_scale: float = 1.0,
        decode: Callable[[Tensor], Tensor] | None = None,
    ):
        self.model, self.solver, self.nfe, self.shape = model, solver, nfe, tuple(shape)
        self.device, self.autocast, self.seed = device, autocast, seed
        self.num_classes, self.guidance_scale, self.decode = num_classes, guidance_scale, decode

    def noise(self, start: int, stop: int) -> Tensor:
        # the CPU generator keeps 32 bits of a seed: hash (seed, i) into them instead of packing both
        seeds = [int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0]) for i in range(start, stop)]
        g = torch.Generator()
        return torch.stack([torch.randn(self.shape, generator=g.manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def __call__(self, start: int, stop: int) -> Tensor:
        x0 = self.noise(start, stop).to(self.device)
        cond = torch.arange(start, stop, device=self.device) % self.num_classes if self.num_classes else None
        solution, _ = sample(self.model, self.solver, x0, self.nfe, self.autocast, 0, cond, self.guidance_scale)
        x = solution.x if self.decode is None else self.decode(solution.x)
        return to_unit_range(x).cpu()
