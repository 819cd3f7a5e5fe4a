"""A tiny SDXL of the real layout, built from config dicts and saved as a diffusers folder, so the
tests load it through the same path real weights take (``model.pretrained=FOLDER``).

Same structure as SDXL base: a UNet with ``text_time`` addition embeddings and cross-attention on
both text encoders' hidden states side by side, CLIP-L's ``CLIPTextModel`` and OpenCLIP-G's
``CLIPTextModelWithProjection`` (pooled, projected), an ``AutoencoderKL`` with 8x downsampling and
SDXL base's Euler scheduler; only the widths are tiny. The tokenizers are CLIP's BPE from open_clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from adapters.sdxl_components import build_random

TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 49408, "projection_dim": 16, "hidden_act": "gelu", "bos_token_id": 49406,
        "eos_token_id": 49407, "pad_token_id": 1}  # fmt: skip
TINY_SDXL: dict[str, dict[str, Any]] = {
    "unet": {
        "block_out_channels": (16, 32), "layers_per_block": 1, "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4), "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8, "transformer_layers_per_block": (1, 1),
        "projection_class_embeddings_input_dim": 16 + 6 * 8,  # pooled (OpenCLIP-G's projection) + 6 size ids
        "cross_attention_dim": 32, "norm_num_groups": 8,  # CLIP-L's 16 + OpenCLIP-G's 16 hidden widths
    },
    "vae": {
        "block_out_channels": [8, 8, 8, 8], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "sample_size": 64, "norm_num_groups": 4, "scaling_factor": 0.13025,
    },
    "text_encoder": TEXT,
    "text_encoder_2": TEXT,
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon"},
}  # fmt: skip
FP32 = ["model.unet_dtype=float32", "model.text_encoder_dtype=float32"]


def save_tiny_sdxl(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny random SDXL as a diffusers folder (unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/)."""
    torch.manual_seed(seed)
    configs = {**TINY_SDXL, "scheduler": {**TINY_SDXL["scheduler"], "prediction_type": prediction_type}}
    parts = build_random(configs, folder / "bpe")
    StableDiffusionXLPipeline(**vars(parts)).save_pretrained(folder)
    return folder
