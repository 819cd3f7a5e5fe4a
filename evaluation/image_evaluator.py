"""The image evaluator (``eval=image``): the energy evaluator on pixels or latents, plus FID/KID of
the samples at the final evaluation (``eval.fid``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dataloaders.base import HeldOut
from evaluation.contract import EvalContext, eval_mode
from evaluation.energy_evaluator import EnergyDistanceEval, budget_nfe
from evaluation.fid_evaluator import FIDEval
from evaluation.sample_generation import ImageSampler
from solvers.base import Sampler


class ImageEval(EnergyDistanceEval):
    """Image samples: energy distance on flattened pixels, grids instead of scatter plots, and
    at the final evaluation FID/KID when ``fid`` is enabled (``eval.fid.num_samples > 0``).

    Writes ``samples_{key}.npy`` as (N, C, H, W) floats in [0, 1] (raw latents for latent data)
    and ``grid_{key}.png`` per budget (one row per class, titled with the sampler, NFE, guidance,
    energy distance and FID), plus ``grid_data.png`` of held-out images; latent samples are decoded
    to pixels for the grids and FID, and scored in latent space by energy distance.
    """

    data_kinds = ("image", "latent")

    def __call__(self, model: nn.Module, solver: Sampler, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        sampled = self.sample_and_score(model, solver, data, ctx)
        if ctx.out_dir is None:
            return sampled.metrics
        if self.fid is not None and self.fid.enabled:  # before the grids, whose titles carry the FID
            sampled.metrics.update(self._fid(model, solver, data, ctx, self.fid))
        self.write_artifacts(sampled, data, solver, ctx)
        return sampled.metrics

    def _fid(
        self, model: nn.Module, solver: Sampler, data: HeldOut, ctx: EvalContext, fid: FIDEval
    ) -> dict[str, float]:
        """FID/KID per budget of ``fid.nfe``, on samples streamed to a folder of PNGs."""
        decode = data.decode
        generators = {
            key: ImageSampler(
                model,
                solver,
                budget_nfe(key),
                tuple(data.reference.shape[1:]),
                ctx.device,
                ctx.autocast,
                fid.seed,
                data.num_classes,
                self.guidance_scale,
                None if decode is None else (lambda z: decode(z.to(ctx.device))),
            )
            for key in self.budgets(solver, fid.nfe)
        }
        settings = self.settings(solver)
        folder_settings = {
            "source": ctx.source,
            "solver": settings["eval/solver"],
            "guidance_scale": self.guidance_scale,
        }
        with eval_mode(model):
            return fid(generators, folder_settings, ctx.device)

    def prepare(self, device: torch.device) -> None:
        if self.fid is not None and self.fid.enabled:
            self.fid.reference_stats(device)

    def settings(self, solver: Sampler) -> dict[str, Any]:
        fid = {} if self.fid is None or not self.fid.enabled else self.fid.settings()
        return {**super().settings(solver), **fid}
