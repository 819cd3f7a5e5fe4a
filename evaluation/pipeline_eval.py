"""Sample grids of fixed prompts from a model that brings its own diffusers pipeline (SDXL + LoRA).

The model is anything with ``sample(prompt=..., generator=..., ...) -> images in [0, 1]`` (a
diffusers pipeline's arguments, e.g. ``adapters.sdxl.SDXLLoRA``); the grid is drawn from per-image
seeds (``seed + index``) so grids across a run differ only through the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataloaders.base import HeldOut
from evaluation.clip_score import CLIPScore, read_prompts
from evaluation.context import EvalContext
from evaluation.errors import EvaluationError
from evaluation.prompt_eval import save_grid

log = logging.getLogger(__name__)


class PipelinePromptEval:
    """``samples_per_prompt`` images per prompt through the model's pipeline, written as one grid
    (``grids/grid_step*.png`` during training, ``grid_final.png`` in the run directory at the end);
    with ``clip`` set, their CLIP score against the prompts is logged."""

    data_kinds = ("captioned", "sdxl_cache")
    model_outputs = ("pipeline",)
    uses_sampler = False  # the model's own pipeline and scheduler sample it

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        samples_per_prompt: int = 1,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        image_size: int = 512,
        seed: int = 0,
        every_epochs: int = 1,
        every_steps: int = 0,
        grid_dir: str | None = None,
        clip: CLIPScore | None = None,
    ):
        if prompts_file:
            prompts = read_prompts(Path(prompts_file))
        if not prompts:
            raise EvaluationError("eval needs prompts: set eval.prompts=[...] or eval.prompts_file=PATH")
        if image_size % 8:
            raise EvaluationError(f"eval.image_size={image_size} must be a multiple of 8 (the VAE downsamples 8x)")
        self.prompts = list(prompts)
        self.samples_per_prompt = samples_per_prompt
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.image_size = image_size
        self.seed = seed
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.grid_dir = Path(grid_dir) if grid_dir else None
        self.clip = clip

    def prepare(self, device: torch.device) -> None:
        """Nothing to load ahead: the pipeline is the model's own."""

    def settings(self, solver: None) -> dict[str, Any]:
        return {
            "eval/sampler": "pipeline",  # the model's own diffusers pipeline and scheduler
            "eval/num_inference_steps": self.num_inference_steps,
            "eval/guidance_scale": self.guidance_scale,
            "eval/seed": self.seed,
            "eval/num_prompts": len(self.prompts),
        }

    def __call__(self, model: nn.Module, solver: None, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        device, step, out_dir = ctx.device, ctx.step, ctx.out_dir
        prompts = [p for p in self.prompts for _ in range(self.samples_per_prompt)]
        generators = [torch.Generator(device).manual_seed(self.seed + i) for i in range(len(prompts))]
        was_training = model.training
        model.eval()
        with torch.no_grad(), ctx.autocast():
            images = model.sample(  # type: ignore[operator]
                prompt=prompts, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                height=self.image_size, width=self.image_size, generator=generators,
            ).cpu()  # fmt: skip
        model.train(was_training)
        save_grid(images, self.samples_per_prompt, self.grid_dir, out_dir, step)
        if self.clip is None:
            return {}
        return {"eval/clip_score": float(self.clip.score_images(images, prompts).mean())}
