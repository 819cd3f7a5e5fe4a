"""Fault injection for tests: real losses that turn NaN after a number of calls."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.base import Loss, LossOutput
from losses.flow_matching import FlowMatchingLoss
from losses.meanflow import MeanFlowLoss


class _NaNAfterMixin(Loss):
    """From call ``after + 1`` on (each call is a micro-batch) the loss, and the metric ``term``
    if one is named, become NaN."""

    term: str | None = None

    def __init__(self, after: int, **kwargs):
        super().__init__(**kwargs)
        self.after = after
        self.calls = 0

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        out = super().__call__(model, batch)
        self.calls += 1
        if self.calls <= self.after:
            return out
        nan = torch.tensor(float("nan"))
        metrics = {k: v * nan if k == self.term else v for k, v in out.metrics.items()}
        return LossOutput(out.loss * nan, metrics)


class NaNAfter(_NaNAfterMixin, FlowMatchingLoss):
    """Flow matching whose loss becomes NaN."""


class MeanFlowNaNAfter(_NaNAfterMixin, MeanFlowLoss):
    """MeanFlow whose jvp term (and so the loss) becomes NaN."""

    term = "meanflow/dudt_norm"
