"""Fault injection for tests: a real flow-matching loss that turns NaN after a number of calls."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.base import LossOutput
from losses.flow_matching import FlowMatchingLoss
from losses.meanflow import MeanFlowLoss


class NaNAfter(FlowMatchingLoss):
    """Flow matching whose loss becomes NaN from call ``after + 1`` on (each call is a micro-batch)."""

    def __init__(self, after: int, **kwargs):
        super().__init__(**kwargs)
        self.after = after
        self.calls = 0

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        out = super().__call__(model, batch)
        self.calls += 1
        if self.calls > self.after:
            return LossOutput(out.loss * torch.tensor(float("nan")))
        return out


class MeanFlowNaNAfter(MeanFlowLoss):
    """MeanFlow whose jvp term (and so the loss) turns NaN from call ``after + 1`` on."""

    def __init__(self, after: int, **kwargs):
        super().__init__(**kwargs)
        self.after = after
        self.calls = 0

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        out = super().__call__(model, batch)
        self.calls += 1
        if self.calls > self.after:
            nan = torch.tensor(float("nan"))
            return LossOutput(
                out.loss * nan, {**out.metrics, "meanflow/dudt_norm": out.metrics["meanflow/dudt_norm"] * nan}
            )
        return out
