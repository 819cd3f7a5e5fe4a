"""Evaluation of dense data: energy distance of generated samples to held-out data per NFE."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from evaluation.energy_distance import energy_distance
from evaluation.plots import plot_trajectories, scatter_samples
from evaluation.sampling import sample
from solvers.base import Solver

log = logging.getLogger(__name__)


class EnergyDistanceEval:
    """Sample ``num_samples`` points at each NFE in ``nfe`` and score them against held-out data.

    The noise (and, for class-conditional data, the labels: 0, 1, ..., K-1, 0, ...) come from
    their own generator (``seed``), so every evaluation of a run, and every run, integrates the
    same starting points: scores differ only through the model and solver. An adaptive solver
    is run once and reported under ``@adaptive``. ``guidance_scale`` != 1 samples conditional
    models with classifier-free guidance. Images are scored on flattened pixels.
    """

    def __init__(
        self,
        nfe: list[int],
        num_samples: int = 5000,
        every_epochs: int = 10,
        seed: int = 1234,
        trajectory_points: int = 256,
        batch_size: int = 5000,
        guidance_scale: float = 1.0,
    ):
        self.nfe = list(nfe)
        self.num_samples = num_samples
        self.every_epochs = every_epochs
        self.seed = seed
        self.trajectory_points = trajectory_points
        self.batch_size = batch_size
        self.guidance_scale = guidance_scale

    def __call__(
        self,
        model: nn.Module,
        solver: Solver,
        reference: Tensor,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        out_dir: Path | None = None,
        num_classes: int = 0,
        decode: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, float]:
        """Scores as flat keys (``eval/energy_distance@nfe10``); with ``out_dir`` also writes the
        samples and plots there (``write_artifacts``)."""
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.num_samples, *reference.shape[1:], generator=g)
        labels = torch.arange(self.num_samples) % num_classes if num_classes else None
        was_training = model.training
        model.eval()
        budgets: list[int | str] = ["adaptive"] if solver.adaptive else list(self.nfe)
        metrics: dict[str, float] = {}
        samples: dict[str, Tensor] = {}
        trajectory = None
        for i, budget in enumerate(budgets):
            want_path = self.trajectory_points if (out_dir is not None and i == len(budgets) - 1) else 0
            nfe = 0 if budget == "adaptive" else int(budget)
            x, used, path = self._generate(model, solver, noise, labels, nfe, device, autocast, want_path)
            key = "adaptive" if budget == "adaptive" else f"nfe{budget}"
            metrics[f"eval/energy_distance@{key}"] = energy_distance(x.to(device), reference.to(device))
            metrics[f"eval/nfe_used@{key}"] = float(used)
            samples[key] = x
            trajectory = path if path is not None else trajectory
        model.train(was_training)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            to_pixels = None if decode is None else (lambda z: decode(z.to(device)).float().cpu())
            self.write_artifacts(reference.cpu(), samples, trajectory, out_dir, to_pixels)
        return metrics

    def _generate(
        self,
        model: nn.Module,
        solver: Solver,
        noise: Tensor,
        labels: Tensor | None,
        nfe: int,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
        trajectory_points: int,
    ) -> tuple[Tensor, int, Tensor | None]:
        """Samples in chunks of ``batch_size`` (so 50k images never sit on the device at once)."""
        out, used, trajectory = [], 0, None
        for start in range(0, len(noise), self.batch_size):
            chunk = noise[start : start + self.batch_size].to(device)
            cond = None if labels is None else labels[start : start + self.batch_size].to(device)
            points = trajectory_points if start == 0 else 0
            solution, path = sample(model, solver, chunk, nfe, autocast, points, cond, self.guidance_scale)
            out.append(solution.x.float().cpu())
            used = solution.nfe
            trajectory = path if path is not None else trajectory
        return torch.cat(out), used, trajectory

    def write_artifacts(
        self,
        reference: Tensor,
        samples: dict[str, Tensor],
        trajectory: Tensor | None,
        out_dir: Path,
        decode: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """``samples_{key}.npy``, ``samples.png`` (data beside samples) and ``trajectories.png``."""
        for key, x in samples.items():
            np.save(out_dir / f"samples_{key}.npy", x.numpy())
        scatter_samples(reference.numpy(), {k: v.numpy() for k, v in samples.items()}, out_dir / "samples.png")
        if trajectory is not None:
            plot_trajectories(trajectory.numpy(), out_dir / "trajectories.png")


class ImageEval(EnergyDistanceEval):
    """Image samples: energy distance on flattened pixels, grids instead of scatter plots.

    Writes ``samples_{key}.npy`` as (N, C, H, W) floats in [0, 1] (raw latents for latent data)
    and ``grid_{key}.png`` per budget, plus ``grid_data.png`` of held-out images; latent samples
    are decoded to pixels for the grids only, and scored in latent space.
    """

    def write_artifacts(
        self,
        reference: Tensor,
        samples: dict[str, Tensor],
        trajectory: Tensor | None,
        out_dir: Path,
        decode: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Latent samples (``decode`` given) are saved raw; only their grids are decoded to pixels."""
        pictures = to_unit_range if decode is None else (lambda x: to_unit_range(decode(x)))
        for key, x in samples.items():
            np.save(out_dir / f"samples_{key}.npy", (to_unit_range(x) if decode is None else x).numpy())
            save_image(pictures(x[:64]), out_dir / f"grid_{key}.png", nrow=8)
        save_image(pictures(reference[:64]), out_dir / "grid_data.png", nrow=8)


def to_unit_range(x: Tensor) -> Tensor:
    """Model space [-1, 1] to image space [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)
