"""Generating samples from a model with any sampler: the model-facing closures, one sampling call, the
per-index image sampler that sample folders are written with, and the sampler's settings for metrics.json."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.conditioning import Cond, null_condition
from models.contract import diffusion_time
from solvers.base import Denoiser, Sampler, Solution, Velocity


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


def _with_null(cond: Cond) -> Cond:
    """``cond`` followed by its null counterpart, as one batch of 2B."""
    if isinstance(cond, Tensor):
        return torch.cat([cond, torch.full_like(cond, -1)])
    assert cond is not None
    null = null_condition(cond)
    assert isinstance(null, dict)
    first = next(iter(cond.values()))
    own = {**cond, "drop": cond.get("drop", torch.zeros(first.shape[0], dtype=torch.bool, device=first.device))}
    return {k: torch.cat([v, null[k]]) for k, v in own.items()}


def guided_denoiser(model: nn.Module, cond: Cond, guidance_scale: float = 1.0, steps: int = 1000) -> Denoiser:
    """Wrap ``model(x, t, None, cond)`` as the diffusion samplers' ``denoiser(x, t) -> (eps, var_values)``.

    A model with 2C output channels (GLIDE) returns eps and learned-variance values; one with C
    channels eps alone (var_values None). With a scale other than 1, the conditional and
    unconditional halves run as one batch of 2B, as GLIDE does: ``eps = eps_u + s (eps_c - eps_u)``;
    the variance values come from the conditional half. The unconditional half is the null
    condition (models/conditioning.py). Scale 1 is one plain conditional call. ``steps`` is the
    training schedule's length, which turns a timestep into a field model's time.
    """

    def batch_t(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(len(x))  # (B,)
        return diffusion_time(model, t, steps)

    def split(out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        return out[:, :channels], (out[:, channels:] if out.shape[1] == 2 * channels else None)

    def conditional(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        time = batch_t(x, t)
        return split(model(x, time, time, cond).to(x.dtype), x.shape[1])

    if cond is None or guidance_scale == 1.0:
        return conditional
    both = _with_null(cond)

    def guided(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        t = batch_t(x, t)
        t = torch.cat([t, t])
        out = model(torch.cat([x, x]), t, t, both).to(x.dtype)  # (2B, C or 2C, ...)
        cond_out, uncond_out = out.chunk(2)
        (eps_c, var_values), (eps_u, _) = split(cond_out, x.shape[1]), split(uncond_out, x.shape[1])
        return eps_u + guidance_scale * (eps_c - eps_u), var_values

    return guided


MODEL_FUNCTIONS: dict[str, Callable[..., Any]] = {"velocity": velocity_of, "denoiser": guided_denoiser}


def model_fn(model: nn.Module, sampler: Sampler, cond: Cond = None, guidance_scale: float = 1.0) -> Callable[..., Any]:
    """The closure over ``model`` that ``sampler`` integrates (its ``calls``, with its ``fn_options``)."""
    return MODEL_FUNCTIONS[sampler.calls](model, cond, guidance_scale, **sampler.fn_options())


@torch.no_grad()
def sample(
    model: nn.Module,
    sampler: Sampler,
    noise: Tensor,
    nfe: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    trajectory_points: int = 0,
    cond: Cond = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Solution, Tensor | None]:
    """Integrate ``noise`` to samples on ``sampler.grid(nfe)``; with ``trajectory_points > 0`` also
    return the path of the first that many points as a (T, N, ...) tensor (T = steps + 1)."""
    path: list[Tensor] = []
    callback = None
    if trajectory_points:
        path.append(noise[:trajectory_points].float().cpu())

        def callback(t: Tensor, x: Tensor) -> None:
            path.append(x[:trajectory_points].float().cpu())

    with autocast():
        fn = model_fn(model, sampler, cond, guidance_scale)
        solution = sampler(fn, noise, sampler.grid(nfe, noise.device), callback, generator)
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
        solver: Sampler,
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
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start)  # ancestral samplers' noise
        solution, _ = sample(
            self.model, self.solver, x0, self.nfe, self.autocast, 0, cond, self.guidance_scale, generator
        )
        x = solution.x if self.decode is None else self.decode(solution.x)
        return to_unit_range(x).cpu()


def sampler_settings(sampler: Sampler) -> dict[str, Any]:
    """The sampler by name and settings, for metrics.json: ``eval/sampler`` (``meanflow``, ``ddpm``),
    ``eval/solver`` (its label with settings, ``dopri5(atol=1e-05, rtol=1e-05)``)."""
    return {"eval/sampler": sampler.name, "eval/solver": sampler.label()}
