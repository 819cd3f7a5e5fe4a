"""Evaluation of dense data: energy distance of generated samples to held-out data per NFE."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from evaluation.energy_distance import energy_distance
from evaluation.plots import plot_trajectories, scatter_samples
from evaluation.sampling import sample
from solvers.base import Solver

log = logging.getLogger(__name__)


class EnergyDistanceEval:
    """Sample ``num_samples`` points at each NFE in ``nfe`` and score them against held-out data.

    The noise is drawn from its own generator (``seed``), so every evaluation of a run, and every
    run, integrates the same starting points: scores differ only through the model and solver.
    An adaptive solver is run once and reported under ``@adaptive``.
    """

    def __init__(
        self,
        nfe: list[int],
        num_samples: int = 5000,
        every_epochs: int = 10,
        seed: int = 1234,
        trajectory_points: int = 256,
    ):
        self.nfe = list(nfe)
        self.num_samples = num_samples
        self.every_epochs = every_epochs
        self.seed = seed
        self.trajectory_points = trajectory_points

    def __call__(
        self,
        model: nn.Module,
        solver: Solver,
        reference: Tensor,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        out_dir: Path | None = None,
    ) -> dict[str, float]:
        """Scores as flat keys (``eval/energy_distance@nfe10``); with ``out_dir`` also writes
        ``samples_nfe{N}.npy``, ``samples.png`` and ``trajectories.png`` there."""
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.num_samples, *reference.shape[1:], generator=g).to(device)
        was_training = model.training
        model.eval()
        budgets: list[int | str] = ["adaptive"] if solver.adaptive else list(self.nfe)
        metrics: dict[str, float] = {}
        samples: dict[str, np.ndarray] = {}
        trajectory = None
        for i, budget in enumerate(budgets):
            last = i == len(budgets) - 1
            want_path = self.trajectory_points if (out_dir is not None and last) else 0
            solution, path = sample(
                model, solver, noise, 0 if budget == "adaptive" else int(budget), autocast, want_path
            )
            key = "adaptive" if budget == "adaptive" else f"nfe{budget}"
            metrics[f"eval/energy_distance@{key}"] = energy_distance(solution.x, reference.to(device))
            metrics[f"eval/nfe_used@{key}"] = float(solution.nfe)
            samples[key] = solution.x.float().cpu().numpy()
            trajectory = path if path is not None else trajectory
        model.train(was_training)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for key, x in samples.items():
                np.save(out_dir / f"samples_{key}.npy", x)
            scatter_samples(reference.cpu().numpy(), samples, out_dir / "samples.png")
            if trajectory is not None:
                plot_trajectories(trajectory.numpy(), out_dir / "trajectories.png")
        return metrics
