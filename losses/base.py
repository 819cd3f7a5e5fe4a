"""The loss contract: ``loss(model, batch) -> LossOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and detached scalar metrics to log beside it."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss.ndim != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(self.loss.shape)}")


class Loss:
    """Base of the losses: ``loss(model, batch) -> LossOutput``.

    ``check(device)`` runs once before training, so a setting the device cannot serve fails
    before any work with a ValueError that names the fix. ``fixed_model_calls`` says whether every
    step calls the model the same number of times whatever the batch holds: FSDP's all-gathers,
    one per call on every rank, need it.
    """

    fixed_model_calls = True

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        raise NotImplementedError

    def check(self, device: torch.device) -> None:
        pass


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP's and ``torch.compile``'s wrappers, for a loss that needs the model's
    frozen helpers (a VAE, a noise schedule) beside its forward pass."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model
