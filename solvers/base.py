"""The sampler contract shared by ODE solvers and diffusion samplers.

Every sampler is called the same way, with an explicit grid (k-diffusion's samplers take their
sigmas, flow_matching's ``ODESolver`` its ``time_grid``)::

    grid = sampler.grid(nfe)                      # times (ODE) or a respaced schedule (diffusion)
    solution = sampler(fn, x, grid, callback=None, generator=None)   # -> Solution(x, nfe)

``fn`` is a closure over the model, built by ``evaluation.sample_generation.model_fn`` for the call the
sampler declares in ``calls``: ``velocity(x, t[, r])`` for ODE solvers (time runs from noise at
t = 0 to data at t = 1; with r it is MeanFlow's average velocity from t to r), or
``denoiser(x, t) -> (eps, var_values | None)`` for diffusion samplers. Conditioning and guidance
live in that closure, so samplers never see a model. ``samples`` declares what the model must
have been trained to predict (a loss's ``trains``); composition is checked against it before any
work (training/compat.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

Velocity = Callable[..., Tensor]  # velocity(x, t) or velocity(x, t, r)
Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, "Tensor | None"]]  # (x, t_orig) -> (eps, var_values | None)
Callback = Callable[[Tensor, Tensor], None]  # callback(t, x) after each step


@dataclass
class Solution:
    x: Tensor
    nfe: int  # function evaluations actually spent


def uniform_grid(steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """``steps + 1`` equally spaced times from 0 to 1."""
    return torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype)


class Sampler:
    """Base of all samplers. ``adaptive`` samplers choose their own steps: ``grid`` ignores ``nfe``."""

    adaptive: ClassVar[bool] = False
    calls: ClassVar[str] = "velocity"  # the closure it integrates: velocity | denoiser
    samples: ClassVar[tuple[str, ...]] = ("velocity", "average_velocity")  # what the model was trained to predict

    def grid(self, nfe: int, device: torch.device | str = "cpu") -> Any:
        raise NotImplementedError

    def __call__(
        self,
        fn: Callable[..., Any],
        x: Tensor,
        grid: Any,
        callback: Callback | None = None,
        generator: torch.Generator | None = None,
    ) -> Solution:
        raise NotImplementedError

    @classmethod
    def max_nfe(cls, settings: dict[str, Any]) -> int | None:
        """The largest NFE budget these settings can serve (None: any), checked before a run starts."""
        return None

    def fn_options(self) -> dict[str, Any]:
        """What the closure needs to know of the sampler (a diffusion sampler: its schedule's length)."""
        return {}

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def settings(self) -> dict[str, Any]:
        """The settings that change its samples, for metrics.json and checkpoints."""
        return {k: v for k, v in sorted(vars(self).items()) if isinstance(v, (int, float, str, bool))}

    def label(self) -> str:
        """``euler``, or ``dopri5(atol=1e-05, rtol=1e-05)`` for a sampler with settings."""
        options = self.settings()
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in options.items())})" if options else self.name
