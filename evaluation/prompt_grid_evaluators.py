"""The prompt-grid evaluators of text-conditional models: sample grids of fixed prompts during training.

A fine-tuning run is watched through the same prompts at every evaluation (``every_steps`` or
``every_epochs``), from the same noise, so grids differ only through the weights. With ``clip``
set, the CLIP score of the samples against their prompts is logged beside them.

- ``PromptGridEval`` (``eval=prompts``): GLIDE-style models sampled with the run's diffusion sampler.
  The upsampler is shown held-out images: their captions and their downsampled copies are its input.
- ``PipelinePromptEval`` (``eval=sdxl_prompts``): a model that brings its own diffusers pipeline
  (SDXL + LoRA), anything with ``sample(prompt=..., generator=..., ...) -> images in [0, 1]`` (e.g.
  ``adapters.sdxl.SDXLLoRA``); the grid is drawn from per-image seeds (``seed + index``).
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
from evaluation.contract import EvalContext
from evaluation.errors import EvaluationError
from evaluation.sample_generation import sample, sampler_settings
from solvers.base import Sampler

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], tuple[Tensor, Tensor]]


class ClipTextEncoder(Protocol):
    def encode_text(self, captions: list[str]) -> Tensor: ...


def fixed_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The evaluation's prompts: ``prompts_file`` (one per line) when given, else ``prompts``."""
    if prompts_file:
        prompts = read_prompts(Path(prompts_file))
    if not prompts:
        raise EvaluationError("eval needs prompts: set eval.prompts=[...] or eval.prompts_file=PATH")
    return list(prompts)


def clip_metrics(clip: CLIPScore | None, images: Tensor, prompts: list[str]) -> dict[str, float]:
    """``eval/clip_score`` of the images against their prompts, when a CLIP scorer is set."""
    if clip is None:
        return {}
    return {"eval/clip_score": float(clip.score_images(images, prompts).mean())}


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
        self.tokenizer = tokenizer
        self.prompts = fixed_prompts(prompts, prompts_file)
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
        return clip_metrics(self.clip, images, prompts)

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
        self.prompts = fixed_prompts(prompts, prompts_file)
        if image_size % 8:
            raise EvaluationError(f"eval.image_size={image_size} must be a multiple of 8 (the VAE downsamples 8x)")
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
        return clip_metrics(self.clip, images, prompts)
