"""GLIDE's diffusion loss with the CLIP adapter, regularised towards the model without it.

The adapter should add what CLIP knows without unlearning what GLIDE knew. The KL term measures
how far the adapter moves GLIDE's reverse step: the model predicts a Gaussian
p(x_{t-1} | x_t) = N(mu, sigma^2) (eps gives the mean, the learned-range values the variance), so
KL(p_with_adapter || p_without) is closed form, per pixel, in nats. The prediction without the
adapter is a target (no gradient), computed with the same dropout masks as the adapted one, so
the term is zero exactly when the adapter changes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.base import LossOutput
from losses.diffusion import DiffusionLoss
from paths.diffusion_schedule import mean_flat, normal_kl


def without_clip(cond: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same conditioning with the CLIP embedding removed: the adapter's branch is skipped."""
    return {k: v for k, v in cond.items() if k != "clip"}


class ClipAdapterKLLoss(DiffusionLoss):
    """``diffusion loss(with adapter) + kl_weight * KL(p_with || stopgrad p_without)``.

    Batches must carry ``cond["clip"]`` (B, D), the CLIP embedding (``dataloaders.clip_cache``).
    Metrics: ``adapter/kl`` and the diffusion terms of the adapted model.
    """

    model_outputs = ("eps_var",)
    model_traits = ("clip_adapter",)  # the KL compares the model with and without its CLIP adapter
    data_kinds = ("captioned",)
    needs_cond = ("clip",)  # the data's CLIP embeddings: dataloaders.clip_cache

    def __init__(
        self,
        noise_schedule: str = "squaredcos_cap_v2",
        steps: int = 1000,
        loss_type: str = "simple",
        cond_dropout: float = 0.2,
        kl_weight: float = 0.1,
    ):
        super().__init__(noise_schedule, steps, loss_type, cond_dropout)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight

    def __call__(self, model: nn.Module, batch: dict) -> LossOutput:
        if "clip" not in (batch.get("cond") or {}):
            raise ValueError(
                "loss=clip_adapter_kl needs CLIP embeddings in every batch (cond['clip']); "
                "configure dataloaders.clip_cache (see scripts/precompute_clip.py)"
            )
        x_start, x_t, t, noise, cond = self.noised(batch)
        assert isinstance(cond, dict)
        rng = _rng_states(x_t.device)
        out = self.predict(model, x_t, t, cond)
        result = self.objective(out, x_start, x_t, t, noise)
        if self.kl_weight == 0:
            return result
        with torch.no_grad(), torch.random.fork_rng(devices=[x_t.device] if x_t.device.type == "cuda" else []):
            _set_rng_states(rng, x_t.device)  # the dropout masks of the adapted pass
            base = self.predict(model, x_t, t, without_clip(cond))
        channels = x_start.shape[1]
        p_with = self.schedule.p_mean_variance(out[:, :channels], out[:, channels:], x_t, t, clip=False)
        p_base = self.schedule.p_mean_variance(base[:, :channels], base[:, channels:], x_t, t, clip=False)
        kl = mean_flat(normal_kl(p_with.mean, p_with.log_variance, p_base.mean, p_base.log_variance)).mean()
        return LossOutput(result.loss + self.kl_weight * kl, {**result.metrics, "adapter/kl": kl.detach()})


def _rng_states(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)
