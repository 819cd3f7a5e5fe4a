"""A tiny SDXL of the real layout, built from config dicts and saved as a diffusers folder, so the
tests load it through the same path real weights take (``model.pretrained=FOLDER``).

Same structure as SDXL base: a UNet with ``text_time`` addition embeddings and cross-attention on
both text encoders' hidden states side by side, CLIP-L's ``CLIPTextModel`` and OpenCLIP-G's
``CLIPTextModelWithProjection`` (pooled, projected), an ``AutoencoderKL`` with 8x downsampling and
SDXL base's Euler scheduler; only the widths are tiny. The tokenizers are CLIP's BPE from open_clip.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from adapters.sdxl_arch import TINY_SDXL
from adapters.sdxl_components import build_random

FP32 = ["model.unet_dtype=float32", "model.text_encoder_dtype=float32"]


def save_tiny_sdxl(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny random SDXL as a diffusers folder (unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/)."""
    torch.manual_seed(seed)
    configs = {**TINY_SDXL, "scheduler": {**TINY_SDXL["scheduler"], "prediction_type": prediction_type}}
    parts = build_random(configs, folder / "bpe")
    StableDiffusionXLPipeline(**vars(parts)).save_pretrained(folder)
    return folder
