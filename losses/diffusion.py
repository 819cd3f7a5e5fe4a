"""The diffusion loss of GLIDE / improved-diffusion: eps-MSE, optionally plus the VLB on a learned variance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.base import Loss, LossOutput
from models.conditioning import Cond, check_dropout, drop_condition
from models.contract import diffusion_time
from paths.diffusion_schedule import DiffusionSchedule, betas_for, mean_flat

LOSS_TYPES = ("simple", "hybrid")


class DiffusionLoss(Loss):
    """Nichol & Dhariwal (2021) training objective on discrete timesteps, as GLIDE trains it.

    The model is called ``model(x_t, t, None, cond)`` with t the (float) timestep on the original
    ``steps`` scale and returns eps in the first C channels and, for a model with a learned variance
    (GLIDE), learned-range variance values in the last C; a model with C output channels (UNet,
    DiT, CNN, MLP) predicts eps alone and samples with the fixed variance. ``"simple"``:
    ``||eps - eps_hat||^2``. ``"hybrid"``: plus the variational bound term L_t on the variance with
    the mean stop-gradded, so the VLB trains only the variance; scaling it by ``steps / 1000`` is
    improved-diffusion's ``RESCALED_MSE``, i.e. lambda = 0.001 times the T-term bound.
    ``cond_dropout``: the share of rows trained with the null condition (GLIDE's empty caption, or
    the null class), for classifier-free guidance. Batch: ``{"x1": images in [-1, 1], "cond": ...}``.
    """

    trains = "eps"
    model_outputs: tuple[str, ...] = ("field", "eps_var")
    data_kinds: tuple[str, ...] = ("image", "captioned")  # samplers clip x_start to [-1, 1]: pixels only

    def __init__(
        self,
        noise_schedule: str = "squaredcos_cap_v2",
        steps: int = 1000,
        loss_type: str = "simple",
        cond_dropout: float = 0.2,
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        check_dropout(cond_dropout)
        self.schedule = DiffusionSchedule(betas_for(noise_schedule, steps))
        self.loss_type = loss_type
        self.cond_dropout = cond_dropout

    @classmethod
    def trainable_outputs(cls, settings: dict) -> tuple[str, ...]:
        """ "hybrid" trains a learned variance, which only GLIDE's eps_var output has."""
        return ("eps_var",) if settings.get("loss_type") == "hybrid" else cls.model_outputs

    def __call__(self, model: nn.Module, batch: dict) -> LossOutput:
        x_start, x_t, t, noise, cond = self.noised(batch)
        return self.objective(self.predict(model, x_t, t, cond), x_start, x_t, t, noise)

    def noised(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Cond]:
        """(x_start, x_t, t, noise, cond): a random timestep per row, its noised image, and the
        conditioning with a share ``cond_dropout`` of the rows dropped."""
        x_start = batch["x1"].float()
        cond = drop_condition(batch.get("cond"), self.cond_dropout)
        t = torch.randint(0, len(self.schedule), (len(x_start),), device=x_start.device)
        noise = torch.randn_like(x_start)
        return x_start, self.schedule.q_sample(x_start, t, noise), t, noise, cond

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The model's (B, 2C, ...) or (B, C, ...) output, float32 even under autocast."""
        time = diffusion_time(model, t.float(), len(self.schedule))
        out = model(x_t, time, time, cond).float()
        channels = x_t.shape[1]
        if out.shape[1] not in (channels, 2 * channels) or (
            self.loss_type == "hybrid" and out.shape[1] != 2 * channels
        ):
            raise ValueError(
                f"model must return eps ({channels} channels) or eps and variance values ({2 * channels}), "
                f"got {out.shape[1]}; loss_type=hybrid needs the variance"
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
