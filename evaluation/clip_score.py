"""CLIP score of images against their prompts (Hessel et al. 2021, "CLIPScore").

For each (image, prompt) pair, ``100 * max(cos(E_image, E_text), 0)`` with the embeddings of an
open_clip model, averaged over pairs; higher is better. This is CLIP-S with the weight 100 that
text-to-image papers and torchmetrics report (torchmetrics clamps the mean rather than each pair,
the same whenever no cosine is negative, as for real CLIP models). Embeddings are compared in
float32. Images are resized, cropped and normalised on tensors with the model's own preprocessing
config (``adapters.open_clip_loader.CLIPImageTransform``), which matches open_clip's PIL pipeline up
to resampling differences.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from adapters.open_clip_loader import CLIPImageTransform, ClipModelError, ClipWeightsNotFoundError, load_open_clip
from evaluation.errors import EvaluationError
from evaluation.sample_folder_writer import SAMPLE

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], Tensor]


class CLIPScoreError(EvaluationError):
    """Unusable CLIP score input (prompts, images, sample folder, model)."""


class CLIPWeightsNotFoundError(CLIPScoreError):
    """The CLIP weights asked for are neither a local file nor obtainable from the hub (cache)."""


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (surrounding whitespace stripped); blank lines and ``#`` comments skipped."""
    if not path.is_file():
        raise CLIPScoreError(f"prompt file {path} does not exist")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise CLIPScoreError(f"prompt file {path} holds no prompts (blank lines and '#' comments are skipped)")
    return prompts


def clip_score(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """Per-pair ``100 * max(cos, 0)`` of row-aligned (N, D) embeddings, in float32."""
    cos = F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
    return 100 * cos.clamp(min=0)


class CLIPScore:
    """Scores images against prompts with an open_clip model, its image preprocessing (e.g.
    ``CLIPImageTransform.from_model(model)``) and its tokenizer.

    The model is put in eval mode on ``device``; everything runs without gradients.
    """

    def __init__(
        self,
        model: open_clip.CLIP | open_clip.CustomTextCLIP,
        preprocess: Callable[[Tensor], Tensor],
        tokenizer: Tokenizer,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
        """(P, D) float32 text embeddings, on the device."""
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[start : start + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float())
        return torch.cat(out)

    @torch.no_grad()
    def _embed_pixels(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels.to(self.device)).float()

    @torch.no_grad()
    def score_images(self, images: Tensor, prompts: list[str], batch_size: int = 64) -> Tensor:
        """Scores (N,) on the CPU of images (N, C, H, W) in [0, 1] (C = 1 or 3) against
        ``prompts[i]``; repeated prompts are embedded once."""
        if len(images) != len(prompts):
            raise CLIPScoreError(f"{len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise CLIPScoreError(f"expected images as (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        unique = list(dict.fromkeys(prompts))
        text = self.embed_texts(unique, batch_size)
        row = {p: i for i, p in enumerate(unique)}
        which = torch.tensor([row[p] for p in prompts], device=self.device)
        scores = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size].to(self.device))
            scores.append(clip_score(self._embed_pixels(pixels), text[which[start : start + batch_size]]))
        return torch.cat(scores).cpu()

    @torch.no_grad()
    def score_folder(self, folder: Path, prompts: list[str], batch_size: int = 64) -> tuple[float, int]:
        """(mean score, count) over the numbered samples ``000000.png ...`` in ``folder``, sample
        ``i`` (its file number) generated from ``prompts[i % len(prompts)]``. Other files are ignored.

        Images are read, preprocessed one by one (sizes may differ) and embedded in batches, so
        a folder of 50k samples never sits in memory.
        """
        files = _numbered_pngs(folder)
        if not prompts:
            raise CLIPScoreError("no prompts to score the samples against")
        text = self.embed_texts(prompts, batch_size)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            pixels = torch.cat([self.preprocess(_read_png(p).to(self.device)[None]) for p in chunk])
            which = torch.tensor([int(p.stem) % len(prompts) for p in chunk], device=self.device)
            total += clip_score(self._embed_pixels(pixels), text[which]).double().sum()
        mean = float(total) / len(files)
        log.info("CLIP score %.3f over %d samples in %s (%d prompts)", mean, len(files), folder, len(prompts))
        return mean, len(files)


def _numbered_pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CLIPScoreError(f"sample folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if SAMPLE.match(p.name))
    if not files:
        raise CLIPScoreError(f"sample folder {folder} holds no numbered PNG samples (000000.png, 000001.png, ...)")
    return files


def _read_png(path: Path) -> Tensor:
    """(3, H, W) float32 in [0, 1]; grayscale and palette PNGs come back as RGB."""
    with Image.open(path) as image:
        return TF.pil_to_tensor(image.convert("RGB")).float() / 255


def load_clip_scorer(
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> CLIPScore:
    """A ``CLIPScore`` with pretrained weights: ``pretrained`` is an open_clip tag of ``model_name``
    (fetched from the Hugging Face hub, or its cache under ``HF_HUB_OFFLINE=1``) or a local weights
    file (``adapters.open_clip_loader.load_open_clip``). Never falls back to random weights: weights
    that cannot be found raise ``CLIPWeightsNotFoundError`` with the fix in one line.
    """
    try:
        model = load_open_clip(model_name, pretrained, device, cache_dir)
        preprocess = CLIPImageTransform.from_model(model)
    except ClipWeightsNotFoundError as err:
        raise CLIPWeightsNotFoundError(str(err)) from err
    except ClipModelError as err:
        raise CLIPScoreError(str(err)) from err
    return CLIPScore(model, preprocess, open_clip.get_tokenizer(model_name), device)
