"""Conditional flow matching on the linear path (Lipman et al. 2023; Liu et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.base import Loss, LossOutput
from losses.coupling import Coupling, IndependentCoupling
from models.conditioning import check_dropout, drop_condition


class FlowMatchingLoss(Loss):
    """MSE between ``v(x_t, t)`` and the conditional velocity ``x_1 - x_0``.

    Path: ``x_t = (1 - t) x_0 + t x_1 (+ sigma * eps)`` with noise x_0 ~ N(0, I) at t = 0 and
    data x_1 at t = 1; t ~ U(0, 1). ``sigma > 0`` gives torchcfm's ConditionalFlowMatcher path.
    The model is called with r = t, so models built for MeanFlow's (t, r) work unchanged.
    ``cond_dropout``: the share of rows trained with the null condition, for guided sampling.
    """

    trains = "velocity"
    model_outputs = ("field",)

    def __init__(self, coupling: Coupling | None = None, sigma: float = 0.0, cond_dropout: float = 0.1):
        check_dropout(cond_dropout)
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.sigma = sigma
        self.cond_dropout = cond_dropout

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x_1 = batch["x1"]
        x_0 = torch.randn_like(x_1)
        x_0, x_1 = self.coupling(x_0, x_1)
        t = torch.rand(len(x_1), device=x_1.device, dtype=x_1.dtype)
        t_ = t.view(-1, *([1] * (x_1.ndim - 1)))
        x_t = torch.lerp(x_0, x_1, t_)
        if self.sigma > 0:
            x_t = x_t + self.sigma * torch.randn_like(x_t)
        v_t = x_1 - x_0
        pred = model(x_t, t, t, drop_condition(batch.get("cond"), self.cond_dropout))
        return LossOutput(F.mse_loss(pred.float(), v_t.float()))
