"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``) as a frozen codec between images and latents.

Latents are the posterior scaled by the VAE's own ``config.scaling_factor`` (0.18215 for the SD 1.x/2.x
VAEs, so that latents have about unit variance, like the flow's noise) after subtracting its
``config.shift_factor`` where it has one. ``encode`` and ``decode`` undo each other up to the VAE's
reconstruction error. The VAE never trains: it stays in eval mode with ``requires_grad=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models import AutoencoderKL
from huggingface_hub import constants
from torch import Tensor, nn


def _unusable(pretrained: str, subfolder: str | None, error: Exception) -> ValueError:
    """What diffusers/huggingface_hub raised for ``pretrained``, as one line that names the fix."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if Path(pretrained).expanduser().is_dir():
        where = f"{pretrained}/{subfolder}" if subfolder else pretrained
        return ValueError(f"SD VAE folder {where} holds no AutoencoderKL (config.json and weights): {reason}")
    if constants.HF_HUB_OFFLINE:
        return ValueError(
            f"SD VAE '{pretrained}' is not a local folder and the hub is offline (HF_HUB_OFFLINE=1); "
            "download it once online or pass the folder of a saved AutoencoderKL instead"
        )
    return ValueError(f"SD VAE '{pretrained}' is neither a local folder nor a downloadable hub id ({reason})")


def require_vae(pretrained: str, subfolder: str | None = None) -> None:
    """Fail early, reading only its config, when ``pretrained`` is neither a VAE folder nor cached or reachable."""
    try:
        AutoencoderKL.load_config(pretrained, subfolder=subfolder or None)
    except (OSError, ValueError) as e:
        raise _unusable(pretrained, subfolder, e) from e


def load_autoencoder(pretrained: str, subfolder: str | None = None) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained``, its errors turned into one line that names the fix."""
    try:
        return AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder or None, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise _unusable(pretrained, subfolder, e) from e


class SDVAE(nn.Module):
    """A frozen ``AutoencoderKL`` from ``pretrained`` (a folder or hub id, with an optional ``subfolder``
    such as ``"vae"`` of a pipeline) or, for tests, randomly initialised from a diffusers ``config`` dict."""

    def __init__(
        self, pretrained: str | None = None, subfolder: str | None = None, config: dict[str, Any] | None = None
    ):
        super().__init__()
        if pretrained is not None and config is None:
            self.vae = load_autoencoder(pretrained, subfolder)
        elif config is not None and pretrained is None:
            self.vae = AutoencoderKL.from_config(config)
        else:
            raise ValueError("SDVAE needs exactly one of pretrained (a folder or hub id) and config")
        self.source = pretrained or "config"
        self.vae.requires_grad_(False)
        self.scaling_factor = float(self.vae.config["scaling_factor"])
        self.shift_factor = float(self.vae.config.get("shift_factor") or 0.0)
        self.train(False)

    def train(self, mode: bool = True) -> SDVAE:
        return super().train(False)  # frozen: dropout and norms always in inference mode

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), float32.

        The posterior mean by default (deterministic, as the precomputed data sets store it);
        ``sample=True`` draws from the posterior with ``generator``.
        """
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], float32."""
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1, 1)
