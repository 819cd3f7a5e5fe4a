"""Component configs (the classes' keyword arguments) of SDXL base, and of a tiny SDXL of the same
layout, for ``sdxl_components.build_random``: memory benchmarks at the real sizes, and tests.

The tiny one keeps everything that makes SDXL SDXL: ``text_time`` addition embeddings (pooled text +
six size ids), cross-attention on both text encoders' hidden states side by side, CLIP-L's
``CLIPTextModel`` and OpenCLIP-G's projected ``CLIPTextModelWithProjection``, an 8x ``AutoencoderKL``
and SDXL base's Euler schedule; only widths and depths shrink.
"""

from __future__ import annotations

from typing import Any

TEXT_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu", "vocab_size": 49408}  # fmt: skip
TEXT_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
          "projection_dim": 1280, "hidden_act": "gelu", "vocab_size": 49408}  # fmt: skip
# stabilityai/stable-diffusion-xl-base-1.0's component configs (the keys that differ from the classes' defaults)
SDXL_BASE: dict[str, dict[str, Any]] = {
    "unet": {
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2,
        "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
    },
    "text_encoder": TEXT_L,
    "text_encoder_2": TEXT_G,
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon"},
}  # fmt: skip
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
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
    "text_encoder": TINY_TEXT,
    "text_encoder_2": TINY_TEXT,
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon"},
}  # fmt: skip
