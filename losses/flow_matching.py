"""Conditional flow matching (Lipman et al. 2023; Liu et al. 2023) on a probability path from paths/."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.base import Loss, LossOutput
from losses.coupling import Coupling, IndependentCoupling
from models.conditioning import check_dropout, drop_condition
from paths.affine import LinearPath, ProbabilityPath
from paths.time import TimeSampler, UniformTimeSampler


class FlowMatchingLoss(Loss):
    """MSE between ``v(x_t, t)`` and the path's conditional velocity at ``x_t``.

    Noise x_0 ~ N(0, I) is paired with data x_1 by the ``coupling``, t drawn by the ``time_sampler`` (default
    U(0, 1)) and (x_t, target) by the ``path`` (default the straight line, target ``x_1 - x_0``).
    The model is called with r = t, so models built for MeanFlow's (t, r) work unchanged.
    ``cond_dropout``: the share of rows trained with the null condition, for guided sampling.
    """

    trains = "velocity"
    model_outputs = ("field",)

    def __init__(
        self,
        coupling: Coupling | None = None,
        path: ProbabilityPath | None = None,
        time_sampler: TimeSampler | None = None,
        cond_dropout: float = 0.1,
    ):
        check_dropout(cond_dropout)
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.path = path if path is not None else LinearPath()
        self.time_sampler = time_sampler if time_sampler is not None else UniformTimeSampler()
        self.cond_dropout = cond_dropout

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x_1 = batch["x1"]
        x_0 = torch.randn_like(x_1)
        x_0, x_1 = self.coupling(x_0, x_1)
        t = self.time_sampler(len(x_1), x_1.device, x_1.dtype)
        sample = self.path.sample(x_0, x_1, t)
        pred = model(sample.x_t, t, t, drop_condition(batch.get("cond"), self.cond_dropout))
        return LossOutput(F.mse_loss(pred.float(), sample.target.float()))
