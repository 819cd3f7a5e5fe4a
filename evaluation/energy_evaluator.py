"""The energy-distance evaluator (``eval=energy``): generated samples against held-out data per NFE
budget, for points and, on flattened pixels, images; with their scatter plots or image grids."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from dataloaders.base import HeldOut
from evaluation.contract import EvalContext, Evaluator, eval_mode
from evaluation.energy_distance import energy_distance
from evaluation.errors import EvaluationError
from evaluation.fid_evaluator import FIDEval
from evaluation.plots_2d import plot_trajectories, scatter_samples
from evaluation.sample_generation import sample, sampler_settings, to_unit_range
from solvers.base import Sampler

log = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False)
class EnergyDistanceEval(Evaluator[Sampler]):
    """Sample ``num_samples`` points at each NFE in ``nfe`` and score them against held-out data.

    The noise (and, for class-conditional data, the labels: 0, 1, ..., K-1, 0, ...) come from
    their own generator (``seed``), so every evaluation of a run, and every run, integrates the
    same starting points: scores differ only through the model and solver. An adaptive solver
    is run once and reported under ``@adaptive``. ``guidance_scale`` != 1 samples conditional
    models with classifier-free guidance. Images are scored on flattened pixels.
    """

    data_kinds: ClassVar[tuple[str, ...]] = ("dense", "image", "latent")  # ImageEval keeps two of them
    model_outputs = ("field",)
    uses_sampler = True

    nfe: list[int]
    num_samples: int = 5000
    every_epochs: int = 10  # Evaluator's settings, with this evaluator's defaults
    seed: int = 1234
    trajectory_points: int = 256
    batch_size: int = 5000
    fid: FIDEval | None = None

    def __post_init__(self) -> None:
        self.nfe = list(self.nfe)

    def __call__(self, model: nn.Module, solver: Sampler, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        """Scores as flat keys (``eval/energy_distance@nfe10``); with ``ctx.out_dir`` (the final
        evaluation) also writes the samples and plots there (``write_artifacts``)."""
        reference = data.reference
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.num_samples, *reference.shape[1:], generator=g)
        labels = torch.arange(self.num_samples) % data.num_classes if data.num_classes else None
        metrics: dict[str, float] = {}
        samples: dict[str, Tensor] = {}
        trajectory = None
        keys = self.budgets(solver)
        with eval_mode(model):
            for i, key in enumerate(keys):
                want_path = self.trajectory_points if (ctx.out_dir is not None and i == len(keys) - 1) else 0
                x, used, path = self._generate(model, solver, noise, labels, budget_nfe(key), ctx, want_path)
                metrics[f"eval/energy_distance@{key}"] = energy_distance(x.to(ctx.device), reference.to(ctx.device))
                metrics[f"eval/nfe_used@{key}"] = float(used)
                samples[key] = x
                trajectory = path if path is not None else trajectory
        if ctx.out_dir is not None:
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            decode = data.decode
            to_pixels = None if decode is None else (lambda z: decode(z.to(ctx.device)).float().cpu())
            self.write_artifacts(reference.cpu(), samples, trajectory, ctx.out_dir, to_pixels)
        return metrics

    def prepare(self, device: torch.device) -> None:
        if self.fid is not None and self.fid.enabled:
            raise EvaluationError(
                "FID/KID need image samples; eval=energy scores points: use eval=image with image data"
            )

    def budgets(self, solver: Sampler, nfe: list[int] | None = None) -> list[str]:
        """Metric keys of the NFE budgets: ``nfe10``..., or ``adaptive`` for an adaptive solver."""
        return ["adaptive"] if solver.adaptive else [f"nfe{n}" for n in (self.nfe if nfe is None else nfe)]

    def settings(self, solver: Sampler) -> dict[str, Any]:
        return {**sampler_settings(solver), "eval/num_samples": self.num_samples, **super().settings(solver)}

    def _generate(
        self,
        model: nn.Module,
        solver: Sampler,
        noise: Tensor,
        labels: Tensor | None,
        nfe: int,
        ctx: EvalContext,
        trajectory_points: int,
    ) -> tuple[Tensor, int, Tensor | None]:
        """Samples in chunks of ``batch_size`` (so 50k images never sit on the device at once)."""
        out, used, trajectory = [], 0, None
        generator = torch.Generator().manual_seed(self.seed + 1)  # ancestral samplers' fresh noise
        for start in range(0, len(noise), self.batch_size):
            chunk = noise[start : start + self.batch_size].to(ctx.device)
            cond = None if labels is None else labels[start : start + self.batch_size].to(ctx.device)
            points = trajectory_points if start == 0 else 0
            solution, path = sample(
                model, solver, chunk, nfe, ctx.autocast, points, cond, self.guidance_scale, generator
            )
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
        """``samples_{key}.npy``, ``samples.png`` (data beside samples) and ``trajectories.png``;
        for images, ``grid_{key}.png`` per budget and ``grid_data.png`` instead of the scatter plots."""
        if reference.ndim > 2:
            write_image_artifacts(reference, samples, out_dir, decode)
            return
        for key, x in samples.items():
            np.save(out_dir / f"samples_{key}.npy", x.numpy())
        scatter_samples(reference.numpy(), {k: v.numpy() for k, v in samples.items()}, out_dir / "samples.png")
        if trajectory is not None:
            plot_trajectories(trajectory.numpy(), out_dir / "trajectories.png")


def write_image_artifacts(
    reference: Tensor, samples: dict[str, Tensor], out_dir: Path, decode: Callable[[Tensor], Tensor] | None = None
) -> None:
    """Samples as (N, C, H, W) floats in [0, 1]; latent samples (``decode`` given) are saved raw and
    only their grids are decoded to pixels."""
    pictures = to_unit_range if decode is None else (lambda x: to_unit_range(decode(x)))
    for key, x in samples.items():
        np.save(out_dir / f"samples_{key}.npy", (to_unit_range(x) if decode is None else x).numpy())
        save_image(pictures(x[:64]), out_dir / f"grid_{key}.png", nrow=8)
    save_image(pictures(reference[:64]), out_dir / "grid_data.png", nrow=8)


def budget_nfe(key: str) -> int:
    """``nfe10`` -> 10; ``adaptive`` -> 0 (the solver picks its steps)."""
    return 0 if key == "adaptive" else int(key.removeprefix("nfe"))
