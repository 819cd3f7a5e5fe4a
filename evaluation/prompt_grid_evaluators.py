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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.base import HeldOut
from evaluation.clip_score import CLIPScore, read_prompts
from evaluation.contract import EvalContext, Evaluator, SamplerT, eval_mode
from evaluation.errors import EvaluationError
from evaluation.pictures import Row, Titles, figure_pixels, grid_figure, save_png
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


@dataclass(kw_only=True, eq=False)
class PromptGrid(Evaluator[SamplerT]):
    """What both prompt-grid evaluators share: ``prompts`` (a list) or ``prompts_file`` (one per line)
    name what to draw, ``samples_per_prompt`` images of ``image_size`` each, written as one grid with
    a row per prompt, captioned with it, under a title naming the run, sampler, steps and guidance
    (``grid_dir``/grid_step*.png during training, grid_final.png there and in the run directory at
    the end); with ``clip`` set, their CLIP score against the prompts is logged and in the title."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    samples_per_prompt: int = 1
    image_size: int = 64
    grid_dir: str | None = None
    clip: CLIPScore | None = None

    def __post_init__(self) -> None:
        self.prompts = fixed_prompts(self.prompts, self.prompts_file)

    def settings(self, sampler: SamplerT) -> dict[str, Any]:
        return {**super().settings(sampler), "eval/num_prompts": len(self.prompts)}

    def repeated_prompts(self) -> list[str]:
        """Each prompt ``samples_per_prompt`` times in a row: one grid row per prompt."""
        return [p for p in self.prompts for _ in range(self.samples_per_prompt)]

    def finish(
        self, images: Tensor, prompts: list[str], ctx: EvalContext, titles: Titles, steps: str
    ) -> dict[str, float]:
        """Write the grid of ``images`` (N, 3, H, W) in [0, 1], titled with the run, sampler, ``steps``,
        guidance and, when a CLIP scorer is set, their CLIP score against ``prompts`` (``eval/clip_score``)."""
        scores = {} if self.clip is None else {"clip_score": float(self.clip.score_images(images, prompts).mean())}
        self.save_grid(prompt_rows(images, prompts), titles.title(steps, scores), ctx)
        return {f"eval/{k}": v for k, v in scores.items()}

    def save_grid(self, rows: list[Row], title: str, ctx: EvalContext) -> None:
        """``grid_step*.png`` in ``grid_dir`` during training; ``grid_final.png`` in both folders at
        the end (``ctx.out_dir`` given). One row per prompt, captioned with it."""
        grid_dir = Path(self.grid_dir) if self.grid_dir else None
        folders = [d for d in (grid_dir, ctx.out_dir) if d is not None]
        folders = folders if ctx.out_dir is not None else folders[:1]
        name = "grid_final.png" if ctx.out_dir is not None else f"grid_step{ctx.step or 0:07d}.png"
        if folders:
            pixels = figure_pixels(grid_figure(rows, title))
            for folder in folders:
                save_png(pixels, folder / name)


def prompt_rows(images: Tensor, prompts: list[str]) -> list[Row]:
    """One grid row per run of equal consecutive prompts (a prompt's samples), labelled with the prompt."""
    rows: list[Row] = []
    start = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            rows.append(Row(images[start:i], prompts[start]))
            start = i
    return rows


@dataclass(kw_only=True, eq=False)
class PromptGridEval(PromptGrid[Sampler]):
    """Samples ``samples_per_prompt`` images for each prompt and writes them as one grid.

    ``tokenizer`` is the data's; the sampler is the run's diffusion sampler at its configured
    respacing (``grid(0)``). ``low_res_size`` makes the evaluation an upsampler's. ``clip_encoder``
    (anything with ``encode_text(prompts) -> (N, D)``, e.g. ``adapters.clip_encoder.FrozenClip``)
    adds the prompts' CLIP embeddings as ``cond["clip"]``, for models with a CLIP adapter; guidance
    then acts on the text, with the CLIP embedding in both halves.
    """

    data_kinds = ("captioned",)
    model_outputs = ("eps_var",)
    uses_sampler = True

    tokenizer: Tokenizer
    guidance_scale: float = 3.0  # Evaluator's, with this evaluator's default
    low_res_size: int | None = None
    clip_encoder: ClipTextEncoder | None = None

    def settings(self, solver: Sampler) -> dict[str, Any]:
        return {**sampler_settings(solver), **super().settings(solver)}

    def __call__(self, model: nn.Module, solver: Sampler, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        device = ctx.device
        prompts, cond = self._conditioning(data.reference, data.captions, device)
        if self.clip_encoder is not None:
            cond["clip"] = self.clip_encoder.encode_text(prompts).to(device)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(len(prompts), 3, self.image_size, self.image_size, generator=g).to(device)
        with eval_mode(model):
            solution, _ = sample(
                model, solver, noise, 0, ctx.autocast, 0, cond, self.guidance_scale,
                torch.Generator(device).manual_seed(self.seed),
            )  # fmt: skip
        images = ((solution.x.float() + 1) / 2).clamp(0, 1).cpu()
        titles = Titles(ctx.label, solver.label(), self.guidance_scale, ctx.step)
        return self.finish(images, prompts, ctx, titles, f"{solution.nfe} steps")

    def _conditioning(
        self, reference: Tensor, captions: list[str] | None, device: torch.device
    ) -> tuple[list[str], dict[str, Tensor]]:
        """Prompts repeated ``samples_per_prompt`` times, tokenized; an upsampler's low-res inputs."""
        if self.low_res_size is None:
            prompts = self.repeated_prompts()
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


@dataclass(kw_only=True, eq=False)
class PipelinePromptEval(PromptGrid[None]):
    """``samples_per_prompt`` images per prompt through the model's pipeline in
    ``num_inference_steps`` steps, each from its own seed (``seed + index``)."""

    data_kinds = ("captioned", "sdxl_cache")
    model_outputs = ("pipeline",)
    uses_sampler = False  # the model's own pipeline and scheduler sample it

    num_inference_steps: int = 30
    guidance_scale: float = 5.0  # the base classes' settings, with this evaluator's defaults
    image_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 8:
            raise EvaluationError(f"eval.image_size={self.image_size} must be a multiple of 8 (the VAE downsamples 8x)")

    def settings(self, solver: None) -> dict[str, Any]:
        return {
            "eval/sampler": "pipeline",  # the model's own diffusers pipeline and scheduler
            "eval/num_inference_steps": self.num_inference_steps,
            **super().settings(solver),
        }

    def __call__(self, model: nn.Module, solver: None, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        prompts = self.repeated_prompts()
        generators = [torch.Generator(ctx.device).manual_seed(self.seed + i) for i in range(len(prompts))]
        with eval_mode(model), torch.no_grad(), ctx.autocast():
            images = model.sample(  # type: ignore[operator]
                prompt=prompts, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                height=self.image_size, width=self.image_size, generator=generators,
            ).cpu()  # fmt: skip
        titles = Titles(ctx.label, "pipeline", self.guidance_scale, ctx.step)
        return self.finish(images, prompts, ctx, titles, f"{self.num_inference_steps} steps")
