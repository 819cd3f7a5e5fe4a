"""SDXL's training loss: DDPM noise (or v) prediction on VAE latents, with the options LoRA
fine-tuning uses: caption dropout for classifier-free guidance, noise offset, min-SNR-γ weighting.

The prediction target follows the scheduler config the weights came with (``prediction_type``
``epsilon`` for SDXL base, ``v_prediction`` for v-models), never a flag that could disagree with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from losses.base import Loss, LossOutput
from models.conditioning import check_dropout, drop_condition
from models.contract import unwrap


class SDXLDiffusionLoss(Loss):
    """``mean(w(t) * ||target - model(x_t, t, cond)||^2)`` over latents.

    ``cond_dropout``: the share of rows whose text embeddings are zeroed (``cond["drop"]``, the null
    condition of models/conditioning.py), as SDXL was trained for classifier-free guidance.
    ``noise_offset``: adds ``offset * N(0, 1)`` per (sample, channel) to the noise, so the model can
    learn to shift an image's mean brightness (Guttenberg 2023; 0.0357 in SDXL recipes).
    ``min_snr_gamma``: weights each timestep by ``min(SNR, γ) / SNR`` (ε) or ``/ (SNR + 1)`` (v),
    Hang et al. 2023; None is the plain MSE. The model is called ``model(x_t, t, None, cond)``; its
    VAE and noise schedule are read from the unwrapped model (``latents``, ``noise_scheduler``).
    """

    trains = "eps"  # or v, as the scheduler config says: the model's own pipeline samples it either way
    model_outputs = ("pipeline",)

    def __init__(self, cond_dropout: float = 0.1, noise_offset: float = 0.0, min_snr_gamma: float | None = None):
        check_dropout(cond_dropout)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"loss.min_snr_gamma must be > 0 (5 is the paper's), or null; got {min_snr_gamma}")
        self.cond_dropout = cond_dropout
        self.noise_offset = noise_offset
        self.min_snr_gamma = min_snr_gamma

    def __call__(self, model: nn.Module, batch: dict) -> LossOutput:
        sdxl: Any = unwrap(model)  # SDXLLoRA (adapters/), known here by its contract only
        schedule = sdxl.noise_scheduler
        latents = sdxl.latents(batch)
        b = latents.shape[0]
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(b, latents.shape[1], 1, 1, device=latents.device)
        t = torch.randint(0, schedule.config.num_train_timesteps, (b,), device=latents.device)
        noisy = schedule.add_noise(latents, noise, t)
        prediction_type = schedule.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = schedule.get_velocity(latents, noise, t)
        else:
            raise ValueError(
                f"scheduler prediction_type {prediction_type!r} is not trained here (epsilon or v_prediction)"
            )
        cond = drop_condition(batch["cond"], self.cond_dropout)
        pred = model(noisy, t, None, cond).float()
        mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        metrics = {"sdxl/mse": mse.mean().detach()}
        if self.min_snr_gamma is None:
            return LossOutput(mse.mean(), metrics)
        weights = min_snr_weights(schedule.alphas_cumprod.to(latents.device)[t], self.min_snr_gamma, prediction_type)
        return LossOutput((weights * mse).mean(), metrics)


def min_snr_weights(alphas_cumprod: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights for ᾱ_t: ``min(SNR, γ) / SNR`` for ε targets, ``/ (SNR + 1)`` for v."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
