"""Fault injection for tests: real losses that turn NaN, real signals sent at a known step."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from torch import Tensor, nn

from losses.base import Loss, LossOutput
from losses.flow_matching import FlowMatchingLoss
from losses.meanflow import MeanFlowLoss
from training import distributed
from training.callbacks import Callback

# a moons MLP run of seconds, for tests that launch the real entry points (the CLI, Modal's container)
SMALL_RUN = [
    "device=cpu",
    "epochs=1",
    "dataloaders.num_eval=128",
    "dataloaders.batch_size=128",
    "model.hidden=16",
    "eval.nfe=[2]",
    "eval.num_samples=128",
    "eval.trajectory_points=8",
]


class _NaNAfterMixin(Loss):
    """From call ``after + 1`` on (each call is a micro-batch) the loss, and the metric ``term``
    if one is named, become NaN."""

    term: str | None = None

    def __init__(self, after: int, **kwargs):
        super().__init__(**kwargs)
        self.after = after
        self.calls = 0

    def bad(self) -> bool:
        return self.calls > self.after

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        out = super().__call__(model, batch)
        self.calls += 1
        if not self.bad():
            return out
        nan = torch.tensor(float("nan"))
        metrics = {k: v * nan if k == self.term else v for k, v in out.metrics.items()}
        return LossOutput(out.loss * nan, metrics)


class NaNAfter(_NaNAfterMixin, FlowMatchingLoss):
    """Flow matching whose loss becomes NaN."""


class MeanFlowNaNAfter(_NaNAfterMixin, MeanFlowLoss):
    """MeanFlow whose jvp term (and so the loss) becomes NaN."""

    term = "meanflow/dudt_norm"


class NaNOnce(_NaNAfterMixin, FlowMatchingLoss):
    """Flow matching whose loss is NaN at call ``at`` only: one bad batch, as a rollback recovers from."""

    def __init__(self, at: int, **kwargs):
        super().__init__(after=at - 1, **kwargs)

    def bad(self) -> bool:
        return self.calls == self.after + 1


class SignalAt(Callback):
    """Sends this process ``signals`` (names, e.g. SIGTERM) when the trainer reaches ``step``: a real
    signal at a known step, as SLURM or a Modal shutdown would send it from outside."""

    def __init__(self, step: int, signals: tuple[str, ...] = ("SIGTERM",), rank: int | None = None):
        self.step = step
        self.signals = tuple(signals)
        self.rank = rank  # only this rank of a multi-process run gets the signal; None: every process

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        if trainer.step == self.step and self.rank in (None, distributed.rank()):
            for name in self.signals:
                os.kill(os.getpid(), getattr(signal, name))
        return {}


class Recorder:
    """A tracker that keeps what the run logs (the ``recorder`` fixture puts it in place of trackio)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def finish(self) -> None:
        pass

    def values(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of ``key``, once per step (the final evaluation logs again what it scored)."""
        return list(dict((step, m[key]) for step, m in self.rows if key in m).items())
