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

from dataloaders.base import HeldOut
from evaluation.contract import EvalContext, Evaluator, eval_mode
from evaluation.energy_distance import energy_distance
from evaluation.errors import EvaluationError
from evaluation.fid_evaluator import FIDEval
from evaluation.pictures import (
    Row,
    Titles,
    budget_scores,
    class_rows,
    grid_figure,
    image_gif,
    nfe_text,
    save_figure,
)
from evaluation.plots_2d import write_2d_pictures
from evaluation.sample_generation import sample, sampler_settings, to_unit_range
from solvers.base import Sampler

log = logging.getLogger(__name__)


@dataclass
class Sampled:
    """One evaluation's samples per budget key, the labels they were drawn for (class-conditional
    data), the sampling path (T, P, ...) of the last budget's first samples, and the scores."""

    samples: dict[str, Tensor]
    labels: Tensor | None
    trajectory: Tensor | None
    metrics: dict[str, float]


@dataclass(kw_only=True, eq=False)
class EnergyDistanceEval(Evaluator[Sampler]):
    """Sample ``num_samples`` points at each NFE in ``nfe`` and score them against held-out data.

    The noise (and, for class-conditional data, the labels: 0, 1, ..., K-1, 0, ...) come from
    their own generator (``seed``), so every evaluation of a run, and every run, integrates the
    same starting points: scores differ only through the model and solver. An adaptive solver
    is run once and reported under ``@adaptive``. ``guidance_scale`` != 1 samples conditional
    models with classifier-free guidance. Images are scored on flattened pixels. The pictures of the
    final evaluation are titled with the run (``ctx.label``), sampler, NFE, guidance and score;
    ``animate`` adds ``sampling.gif``, the last budget's sampling path.
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
    animate: bool = False

    def __post_init__(self) -> None:
        self.nfe = list(self.nfe)

    def __call__(self, model: nn.Module, solver: Sampler, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        """Scores as flat keys (``eval/energy_distance@nfe10``); with ``ctx.out_dir`` (the final
        evaluation) also writes the samples and pictures there (``write_artifacts``)."""
        sampled = self.sample_and_score(model, solver, data, ctx)
        if ctx.out_dir is not None:
            self.write_artifacts(sampled, data, solver, ctx)
        return sampled.metrics

    def sample_and_score(self, model: nn.Module, solver: Sampler, data: HeldOut, ctx: EvalContext) -> Sampled:
        """Samples and energy distances at every budget; at the final evaluation (``ctx.out_dir``) also
        the sampling path of the last budget's first ``path_points`` samples."""
        reference = data.reference
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.num_samples, *reference.shape[1:], generator=g)
        labels = torch.arange(self.num_samples) % data.num_classes if data.num_classes else None
        sampled = Sampled({}, labels, None, {})
        keys = self.budgets(solver)
        with eval_mode(model):
            for i, key in enumerate(keys):
                want_path = self.path_points(data) if (ctx.out_dir is not None and i == len(keys) - 1) else 0
                x, used, path = self._generate(model, solver, noise, labels, budget_nfe(key), ctx, want_path)
                sampled.metrics[f"eval/energy_distance@{key}"] = energy_distance(
                    x.to(ctx.device), reference.to(ctx.device)
                )
                sampled.metrics[f"eval/nfe_used@{key}"] = float(used)
                sampled.samples[key] = x
                sampled.trajectory = path if path is not None else sampled.trajectory
        return sampled

    def path_points(self, data: HeldOut) -> int:
        """How many samples' sampling paths the final evaluation keeps: ``trajectory_points`` for
        points; for images, with ``animate``, those of the animated grid (8 per class of up to 10
        classes, or 64)."""
        if data.reference.ndim <= 2:
            return self.trajectory_points
        if not self.animate:
            return 0
        wanted = 8 * min(data.num_classes, 10) if data.num_classes else 64
        return min(wanted, self.num_samples, self.batch_size)

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

    def write_artifacts(self, sampled: Sampled, data: HeldOut, solver: Sampler, ctx: EvalContext) -> None:
        """``samples_{key}.npy``, ``samples.png`` (data beside samples, each panel titled with its NFE and
        energy distance) and ``trajectories.png``; for images ``grid_{key}.png`` per budget and
        ``grid_data.png`` instead (``write_image_artifacts``); with ``animate``, ``sampling.gif``."""
        assert ctx.out_dir is not None
        out_dir = ctx.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        titles = Titles(ctx.label, solver.label(), self.guidance_scale, ctx.step)
        if data.reference.ndim > 2:
            decode, device = data.decode, ctx.device
            to_pixels = None if decode is None else (lambda z: decode(z.to(device)))
            write_image_artifacts(sampled, data.reference, titles, out_dir, to_pixels, self.animate)
            return
        for key, x in sampled.samples.items():
            np.save(out_dir / f"samples_{key}.npy", x.numpy())
        samples = {key: x.numpy() for key, x in sampled.samples.items()}
        trajectory = None if sampled.trajectory is None else sampled.trajectory.numpy()
        gif = "sampling.gif" if self.animate else None
        write_2d_pictures(data.reference.cpu().numpy(), samples, sampled.metrics, trajectory, titles, out_dir, gif)


def write_image_artifacts(
    sampled: Sampled,
    reference: Tensor,
    titles: Titles,
    out_dir: Path,
    decode: Callable[[Tensor], Tensor] | None = None,
    animate: bool = False,
) -> None:
    """Samples as (N, C, H, W) floats in [0, 1] (latent samples, ``decode`` given, raw) and grids of
    their pixels: one row per class for class-conditional models, each titled with the sampler, NFE,
    guidance and scores; ``grid_data.png`` of held-out images; with ``animate``, ``sampling.gif``."""
    pictures = to_unit_range if decode is None else (lambda z: to_unit_range(decode(z)))
    for key, x in sampled.samples.items():
        np.save(out_dir / f"samples_{key}.npy", (to_unit_range(x) if decode is None else x).numpy())
        rows = class_rows(x, sampled.labels)
        shown = _decoded(pictures, torch.cat([row.images for row in rows]))  # decode only what is shown
        grid = [Row(p, row.label) for p, row in zip(shown.split([len(r.images) for r in rows]), rows, strict=True)]
        nfe = nfe_text(key, sampled.metrics[f"eval/nfe_used@{key}"])
        title = titles.title(nfe, budget_scores(sampled.metrics, key))
        save_figure(grid_figure(grid, title), out_dir / f"grid_{key}.png")
    held_out = class_rows(_decoded(pictures, reference[:64]), None)
    save_figure(grid_figure(held_out, f"held-out data\n{titles.label}".rstrip()), out_dir / "grid_data.png")
    if animate and sampled.trajectory is not None:
        last = list(sampled.samples)[-1]
        frames = torch.stack([_decoded(pictures, x) for x in sampled.trajectory])
        title = titles.title(nfe_text(last, sampled.metrics[f"eval/nfe_used@{last}"]))
        image_gif(frames, sampled.labels, title, out_dir / "sampling.gif")


def _decoded(pictures: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 64) -> Tensor:
    """``pictures`` (to [0, 1] pixels, decoding latents) in chunks, on the CPU."""
    return torch.cat([pictures(part).float().cpu() for part in x.split(chunk)])


def budget_nfe(key: str) -> int:
    """``nfe10`` -> 10; ``adaptive`` -> 0 (the solver picks its steps)."""
    return 0 if key == "adaptive" else int(key.removeprefix("nfe"))
