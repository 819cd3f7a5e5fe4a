"""The diffusion loss of GLIDE / improved-diffusion: eps-MSE, optionally plus the VLB on a learned variance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.base import Loss, LossOutput
from solvers.diffusion_schedule import DiffusionSchedule, betas_for, mean_flat

LOSS_TYPES = ("simple", "hybrid")


def drop_condition(cond: dict[str, Tensor] | None, p: float) -> dict[str, Tensor] | None:
    """A copy of ``cond`` in which each row's text mask is all False with probability ``p``.

    An all-False mask is GLIDE's empty caption, so the same model also learns the unconditional
    prediction that classifier-free guidance needs. Tokens are left alone; the mask hides them.
    """
    if cond is None or p <= 0:
        return cond
    mask = cond["mask"]
    drop = torch.rand(mask.shape[0], device=mask.device) < p
    drop = drop.view(-1, *([1] * (mask.ndim - 1)))
    return {**cond, "mask": torch.where(drop, torch.zeros_like(mask), mask)}


class DiffusionLoss(Loss):
    """Nichol & Dhariwal (2021) training objective on discrete timesteps, as GLIDE trains it.

    The model is called ``model(x_t, t, None, cond)`` with t the (float) timestep on the original
    ``steps`` scale and returns eps in the first C channels and learned-range variance values in
    the last C. ``"simple"``: ``||eps - eps_hat||^2``. ``"hybrid"``: plus the variational bound
    term L_t on the variance with the mean stop-gradded, so the VLB trains only the variance;
    scaling it by ``steps / 1000`` is improved-diffusion's ``RESCALED_MSE``, i.e. lambda = 0.001
    times the T-term bound. Batch: ``{"x1": images in [-1, 1], "cond": dict or None}``.
    """

    def __init__(
        self,
        noise_schedule: str = "squaredcos_cap_v2",
        steps: int = 1000,
        loss_type: str = "simple",
        uncond_p: float = 0.2,
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if not 0 <= uncond_p <= 1:
            raise ValueError(f"uncond_p must be in [0, 1], got {uncond_p}")
        self.schedule = DiffusionSchedule(betas_for(noise_schedule, steps))
        self.loss_type = loss_type
        self.uncond_p = uncond_p

    def __call__(self, model: nn.Module, batch: dict) -> LossOutput:
        x_start, x_t, t, noise, cond = self.noised(batch)
        return self.objective(self.predict(model, x_t, t, cond), x_start, x_t, t, noise)

    def noised(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor] | None]:
        """(x_start, x_t, t, noise, cond): a random timestep per row, its noised image, and the
        conditioning with the text of a share ``uncond_p`` of the rows dropped."""
        x_start = batch["x1"].float()
        cond = drop_condition(batch.get("cond"), self.uncond_p)
        t = torch.randint(0, len(self.schedule), (len(x_start),), device=x_start.device)
        noise = torch.randn_like(x_start)
        return x_start, self.schedule.q_sample(x_start, t, noise), t, noise, cond

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        """The model's (B, 2C, H, W) output, float32 even under autocast."""
        out = model(x_t, t.float(), None, cond).float()
        if out.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(
                f"model must return eps and variance values ({2 * x_t.shape[1]} channels), got {out.shape[1]}"
            )
        return out

    def objective(self, out: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> LossOutput:
        """eps-MSE, plus the bound on the variance for ``hybrid``."""
        channels = x_start.shape[1]
        eps, var_values = out[:, :channels], out[:, channels:]
        mse = mean_flat((noise - eps) ** 2)
        metrics = {"diffusion/mse": mse.mean().detach()}
        if self.loss_type == "simple":
            return LossOutput(mse.mean(), metrics)
        # stop-grad on the mean: the bound only learns the variance (improved-diffusion, Sec. 3.1)
        vb = self.schedule.vb_terms_bpd(x_start, x_t, t, eps.detach(), var_values) * (len(self.schedule) / 1000.0)
        metrics["diffusion/vb"] = vb.mean().detach()
        return LossOutput((mse + vb).mean(), metrics)
