"""Evaluation of text-conditional diffusion models: sample grids of fixed prompts during training.

A fine-tuning run is watched through the same prompts at every evaluation (``every_steps`` or
``every_epochs``), from the same noise, so grids differ only through the weights. With ``clip``
set, the CLIP score of the samples against their prompts is logged beside them. The upsampler is
shown held-out images: their captions and their downsampled copies are its input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import save_image

from dataloaders.base import HeldOut
from evaluation.clip_score import CLIPScore, read_prompts
from evaluation.context import EvalContext
from evaluation.errors import EvaluationError
from evaluation.sample_eval import sampler_settings
from evaluation.sampling import sample
from solvers.base import Sampler

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], tuple[Tensor, Tensor]]


class ClipTextEncoder(Protocol):
    def encode_text(self, captions: list[str]) -> Tensor: ...


def save_grid(images: Tensor, per_prompt: int, grid_dir: Path | None, out_dir: Path | None, step: int | None) -> None:
    """``grid_step*.png`` in ``grid_dir`` during training; ``grid_final.png`` in both folders at the end
    (``out_dir`` given). One row per prompt when it has several samples."""
    folders = [d for d in (grid_dir, out_dir) if d is not None]
    name = "grid_final.png" if out_dir is not None else f"grid_step{step or 0:07d}.png"
    for folder in folders if out_dir is not None else folders[:1]:
        folder.mkdir(parents=True, exist_ok=True)
        save_image(images, folder / name, nrow=per_prompt if per_prompt > 1 else 8)


class PromptGridEval:
    """Samples ``samples_per_prompt`` images for each prompt and writes them as one grid.

    ``prompts`` (a list) or ``prompts_file`` (one per line) name what to draw; ``tokenizer`` is the
    data's; the sampler is the run's diffusion sampler at its configured respacing (``grid(0)``).
    ``low_res_size`` makes the evaluation an upsampler's. ``clip_encoder`` (anything
    with ``encode_text(prompts) -> (N, D)``, e.g. ``adapters.clip_encoder.FrozenClip``) adds the
    prompts' CLIP embeddings as ``cond["clip"]``, for models with a CLIP adapter; guidance then acts
    on the text, with the CLIP embedding in both halves.
    """

    data_kinds = ("captioned",)
    model_outputs = ("eps_var",)
    uses_sampler = True

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        samples_per_prompt: int = 1,
        guidance_scale: float = 3.0,
        seed: int = 0,
        image_size: int = 64,
        low_res_size: int | None = None,
        every_epochs: int = 1,
        every_steps: int = 0,
        grid_dir: str | None = None,
        clip: CLIPScore | None = None,
        clip_encoder: ClipTextEncoder | None = None,
    ):
        if prompts_file:
            prompts = read_prompts(Path(prompts_file))
        if not prompts:
            raise EvaluationError("eval needs prompts: set eval.prompts=[...] or eval.prompts_file=PATH")
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.samples_per_prompt = samples_per_prompt
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.image_size = image_size
        self.low_res_size = low_res_size
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.grid_dir = Path(grid_dir) if grid_dir else None
        self.clip = clip
        self.clip_encoder = clip_encoder

    def prepare(self, device: torch.device) -> None:
        """Nothing to load ahead: the CLIP scorer, if any, was built with the config."""

    def settings(self, solver: Sampler) -> dict[str, Any]:
        return {
            **sampler_settings(solver),
            "eval/guidance_scale": self.guidance_scale,
            "eval/seed": self.seed,
            "eval/num_prompts": len(self.prompts),
        }

    def __call__(self, model: nn.Module, solver: Sampler, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        device = ctx.device
        prompts, cond = self._conditioning(data.reference, data.captions, device)
        if self.clip_encoder is not None:
            cond["clip"] = self.clip_encoder.encode_text(prompts).to(device)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(len(prompts), 3, self.image_size, self.image_size, generator=g).to(device)
        was_training = model.training
        model.eval()
        solution, _ = sample(
            model, solver, noise, 0, ctx.autocast, 0, cond, self.guidance_scale,
            torch.Generator(device).manual_seed(self.seed),
        )  # fmt: skip
        model.train(was_training)
        images = ((solution.x.float() + 1) / 2).clamp(0, 1).cpu()
        save_grid(images, self.samples_per_prompt, self.grid_dir, ctx.out_dir, ctx.step)
        metrics = {}
        if self.clip is not None:
            metrics["eval/clip_score"] = float(self.clip.score_images(images, prompts).mean())
        return metrics

    def _conditioning(
        self, reference: Tensor, captions: list[str] | None, device: torch.device
    ) -> tuple[list[str], dict[str, Tensor]]:
        """Prompts repeated ``samples_per_prompt`` times, tokenized; an upsampler's low-res inputs."""
        if self.low_res_size is None:
            prompts = [p for p in self.prompts for _ in range(self.samples_per_prompt)]
            tokens, mask = self.tokenizer(prompts)
            return prompts, {"tokens": tokens.to(device), "mask": mask.to(device)}
        if captions is None or len(reference) == 0:
            raise EvaluationError(
                "the upsampler's evaluation needs held-out captioned images (dataloaders.num_eval > 0)"
            )
        n = min(len(self.prompts), len(reference), len(captions))
        prompts = list(captions[:n])
        low = F.interpolate(reference[:n].float(), size=self.low_res_size, mode="area")
        tokens, mask = self.tokenizer(prompts)
        return prompts, {"tokens": tokens.to(device), "mask": mask.to(device), "low_res": low.to(device)}
