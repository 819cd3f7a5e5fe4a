"""Samplers for eps-predicting discrete diffusion models (GLIDE), with classifier-free guidance.

Every sampler is ``sample_xxx(denoiser, x_T, schedule, generator=None, callback=None, **options)``:
``denoiser(x, t) -> (eps, var_values | None)`` takes a DDPM-space state and the ORIGINAL timestep
(a 0-dim float tensor; fractional between kept steps); ``var_values`` is None for a model without a
learned variance (DDPM then uses the fixed posterior variance). ``x_T`` is standard normal noise,
``schedule`` is a respaced ``DiffusionSchedule`` and ``callback(t, x)`` sees the DDPM-space state
after each step. Guidance and conditioning live in the denoiser
(``evaluation.sample_generation.guided_denoiser``), so samplers never see a model. ``DiffusionSampler``
binds one of them to its schedule behind the common sampler contract (solvers/base.py).

What runs the update, and why:
- ``ddpm`` and ``ddim`` use diffusers' ``DDPMScheduler`` (``variance_type="learned_range"``) and
  ``DDIMScheduler`` (``use_clipped_model_output=True``): both fit GLIDE exactly — eps prediction,
  x_start clipped to [-1, 1], the learned-range variance, DDIM's eps re-derived from the clipped
  x_start. Respacing is given to them as ``trained_betas`` = the respaced betas over
  ``num_train_timesteps = len(schedule)`` with one inference step per kept step, so their
  timesteps are respaced indices and ``schedule.timestep_map`` turns them into the model's.
  tests/test_diffusion.py checks them against a direct GLIDE ``p_sample`` / ``ddim_sample``.
- ``euler``, ``euler_a`` and ``dpmpp_2m`` are written directly in sigma space (k-diffusion):
  ``x_sigma = x * sqrt(1 + sigma^2)``, ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``. diffusers'
  versions tie the model's timestep to the scheduler's own (rounded, for DPM++ with Karras
  sigmas) timesteps of the respaced process, whereas a Karras grid needs the original timestep of
  each sigma (``schedule.sigma_to_timestep``). Each is a step function on one shared loop
  (``_sample_sigma``), and the tests check them against ``EulerDiscreteScheduler``,
  ``EulerAncestralDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` driven on the same grid.
  No x_start clipping here (GLIDE clips only in its own DDPM/DDIM samplers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import Tensor

from paths.diffusion_schedule import DiffusionSchedule, betas_for
from solvers.base import Callback, Denoiser, Sampler, Solution


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise drawn on the generator's device (a CPU generator can seed a CUDA run)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _run_scheduler(
    schedulers: tuple[DDPMScheduler | DDIMScheduler, DDPMScheduler | None],
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    callback: Callback | None,
    **step_kwargs,
) -> Tensor:
    """The loop shared by the diffusers-backed samplers; scheduler indices are respaced indices.

    ``schedulers`` is (fixed variance, learned variance or None where the variance is unused):
    which one steps depends on whether the denoiser returns variance values."""
    for scheduler in schedulers:
        if scheduler is not None:
            scheduler.set_timesteps(len(schedule))
    x = x_T
    for index in schedulers[0].timesteps:
        t = schedule.timestep_map[int(index)].float()
        eps, var_values = denoiser(x, t)
        if var_values is None or schedulers[1] is None:
            x = schedulers[0].step(eps, index, x, return_dict=False, **step_kwargs)[0]
        else:
            output = torch.cat([eps, var_values], dim=1)
            x = schedulers[1].step(output, index, x, return_dict=False, **step_kwargs)[0]
        if callback is not None:
            callback(t, x)
    return x


def sample_ddpm(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020) with the learned reverse variance (Nichol & Dhariwal 2021)
    where the model has one: GLIDE's ``p_sample_loop`` via diffusers' ``DDPMScheduler``
    (``variance_type="learned_range"``, else ``"fixed_small"``, DDPM's posterior variance)."""
    schedulers = tuple(
        DDPMScheduler(
            num_train_timesteps=len(schedule),
            trained_betas=schedule.betas.tolist(),
            variance_type=variance,
            clip_sample=True,
            clip_sample_range=1.0,
            prediction_type="epsilon",
        )
        for variance in ("fixed_small", "learned_range")
    )
    return _run_scheduler(schedulers, denoiser, x_T, schedule, callback, generator=generator)  # type: ignore[arg-type]


def sample_ddim(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021), eta = 0 deterministic, as GLIDE's ``ddim_sample_loop``: x_start
    clipped to [-1, 1] and eps re-derived from it, via diffusers' ``DDIMScheduler``."""
    scheduler = DDIMScheduler(
        num_train_timesteps=len(schedule),
        trained_betas=schedule.betas.tolist(),
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
    )
    return _run_scheduler(
        (scheduler, None), denoiser, x_T, schedule, callback, eta=eta, use_clipped_model_output=True,
        generator=generator,
    )  # fmt: skip


def sigma_grid(schedule: DiffusionSchedule, karras: bool = False, rho: float = 7.0) -> Tensor:
    """Descending noise levels for the sigma-space samplers, ending in 0 (float64).

    The kept steps' own sigmas, or with ``karras`` as many levels spaced as Karras et al. (2022,
    eq. 5) between the kept steps' smallest and largest sigma.
    """
    sigmas = schedule.sigmas
    if karras:
        ramp = torch.linspace(0, 1, len(sigmas), dtype=torch.float64)
        max_inv, min_inv = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
        descending = (max_inv + ramp * (min_inv - max_inv)) ** rho
    else:
        descending = sigmas.flip(0)
    return torch.cat([descending, descending.new_zeros(1)])


def _to_ddpm(x: Tensor, sigma: float) -> Tensor:
    """A sigma-space state in DDPM space, where the denoiser and the callback see it."""
    return x / math.sqrt(1 + sigma**2)


_SigmaStep = Callable[[Tensor, Tensor, float, float], Tensor]
"""One sigma-space update ``(x, denoised, sigma, sigma_next) -> x at sigma_next``."""


def _sample_sigma(
    step: _SigmaStep,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    callback: Callback | None,
    karras: bool,
) -> Tensor:
    """The loop shared by the sigma-space samplers: x_T scaled to the grid's first sigma, then per step
    one denoiser call at the sigma's original timestep (its x_start prediction goes to ``step``)."""
    sigmas = sigma_grid(schedule, karras).tolist()
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        t = schedule.sigma_to_timestep(torch.tensor(sigma)).float()
        eps, _ = denoiser(_to_ddpm(x, sigma), t)
        x = step(x, x - sigma * eps, sigma, sigma_next)
        if callback is not None:
            callback(t, _to_ddpm(x, sigma_next))
    return x


def _euler_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Euler along the ODE direction ``dx/dsigma = (x - denoised) / sigma``."""
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def sample_euler(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    karras: bool = False,
) -> Tensor:
    """Euler on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 1 without churn)."""
    return _sample_sigma(_euler_step, denoiser, x_T, schedule, callback, karras)


def sample_euler_ancestral(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    karras: bool = False,
) -> Tensor:
    """Ancestral Euler in sigma space (k-diffusion's ``sample_euler_ancestral``, eta = 1): a
    deterministic step down to sigma_down, then fresh noise of sigma_up."""

    def step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = sigma_next**2 / sigma  # = sqrt(sigma_next^2 - sigma_up^2), without cancellation
        x = _euler_step(x, denoised, sigma, sigma_down)
        return x + sigma_up * _randn_like(x, generator) if sigma_next > 0 else x

    return _sample_sigma(step, denoiser, x_T, schedule, callback, karras)


@dataclass
class _DPMpp2MStep:
    """One DPM-Solver++(2M) update, keeping the previous step's x_start prediction and log-sigma step."""

    old_denoised: Tensor | None = None
    h_last: float = 0.0

    def __call__(self, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
        if sigma_next == 0:
            x = denoised  # the exact limit of the update as h -> inf
        else:
            h = math.log(sigma) - math.log(sigma_next)
            target = denoised
            if self.old_denoised is not None:
                r = self.h_last / h
                target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self.old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * target
            self.h_last = h
        self.old_denoised = denoised
        return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    karras: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in sigma space with lambda = -log(sigma), as
    k-diffusion's ``sample_dpmpp_2m``: first order on the first step and the step to sigma = 0."""
    return _sample_sigma(_DPMpp2MStep(), denoiser, x_T, schedule, callback, karras)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
}
SIGMA_SAMPLERS = ("dpmpp_2m", "euler", "euler_a")


class DiffusionSampler(Sampler):
    """A diffusion sampler behind the common contract (``_target_: solvers.diffusion.DiffusionSampler``).

    ``grid(nfe)`` is the training schedule respaced to ``nfe`` kept steps, or to ``respacing`` with
    ``nfe=0`` (the prompt grids of GLIDE runs); ``karras`` applies to the sigma-space samplers,
    ``eta`` to DDIM; settings that would be silently ignored are errors instead. Samples are clamped
    to [-1, 1]: the diffusion loss trains on images in that range.
    """

    calls = "denoiser"
    samples = ("eps",)

    def __init__(
        self,
        name: str = "ddim",
        respacing: str = "100",
        noise_schedule: str = "squaredcos_cap_v2",
        steps: int = 1000,
        karras: bool = False,
        eta: float = 0.0,
    ):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
        if karras and name not in SIGMA_SAMPLERS:
            raise ValueError(f"karras=True applies only to {', '.join(SIGMA_SAMPLERS)}, not {name!r}")
        if eta != 0.0 and name != "ddim":
            raise ValueError(f"eta applies only to ddim, not {name!r}")
        self.method = name
        self.respacing = str(respacing)
        self.noise_schedule = noise_schedule
        self.steps = steps
        self.full = DiffusionSchedule(betas_for(noise_schedule, steps))
        self.schedule = self.full.respace(self.respacing)
        options: dict[str, float | bool] = {"eta": eta} if name == "ddim" else {}
        if name in SIGMA_SAMPLERS:
            options["karras"] = karras
        self.options = options
        self.sample = functools.partial(SAMPLERS[name], **options)

    @property
    def name(self) -> str:
        return self.method

    def settings(self) -> dict[str, Any]:
        return {"noise_schedule": self.noise_schedule, "respacing": self.respacing, "steps": self.steps, **self.options}

    @classmethod
    def max_nfe(cls, settings: dict[str, Any]) -> int | None:
        """One step per kept timestep: at most the training schedule's length."""
        steps = settings.get("steps", 1000)
        return steps if isinstance(steps, int) else None

    def fn_options(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def grid(self, nfe: int = 0, device: torch.device | str = "cpu") -> DiffusionSchedule:
        if nfe < 0 or nfe > self.steps:
            raise ValueError(f"a diffusion sampler takes 1..{self.steps} steps, got nfe={nfe}")
        return self.schedule if nfe == 0 else self.full.respace(str(nfe))

    @torch.no_grad()
    def __call__(
        self,
        fn: Denoiser,
        x: Tensor,
        grid: DiffusionSchedule,
        callback: Callback | None = None,
        generator: torch.Generator | None = None,
    ) -> Solution:
        """Samples in [-1, 1] from standard normal ``x`` (B, C, H, W); one denoiser call per kept step."""
        out = self.sample(fn, x, grid, generator=generator, callback=callback).clamp(-1, 1)
        return Solution(out, len(grid))
