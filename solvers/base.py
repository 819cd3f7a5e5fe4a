"""The solver contract and the time grid.

A solver integrates ``dx/dt = velocity(x, t)`` from t = 0 (noise) to t = 1 (data):
``solver(velocity, x, nfe, callback) -> ODESolution``. ``velocity(x, t)`` takes a state and a 0-dim
time tensor; ``velocity(x, t, r)`` gives the model's average velocity from t to r (MeanFlow),
and with r omitted it is the instantaneous one. Conditioning and guidance live in that closure,
so solvers never see a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Velocity = Callable[..., Tensor]  # velocity(x, t) or velocity(x, t, r)
Callback = Callable[[Tensor, Tensor], None]  # callback(t, x) after each step


@dataclass
class ODESolution:
    x: Tensor
    nfe: int  # function evaluations actually spent


def uniform_grid(steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """``steps + 1`` equally spaced times from 0 to 1."""
    return torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype)


class Solver:
    """Base of all ODE solvers; ``adaptive`` solvers choose their own steps and ignore ``nfe``."""

    adaptive = False

    def __call__(self, velocity: Velocity, x: Tensor, nfe: int, callback: Callback | None = None) -> ODESolution:
        raise NotImplementedError
