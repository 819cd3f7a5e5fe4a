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
    trains = ""  # what the model learns to predict: velocity | average_velocity | eps (training/compat.py)
    model_outputs: tuple[str, ...] = ("field",)  # the model outputs it can train
    model_traits: tuple[str, ...] = ()  # what else the model must have (a CLIP adapter)
    data_kinds: tuple[str, ...] = ()  # the data it trains on; () = whatever the model takes
    needs_cond: tuple[str, ...] = ()  # batch entries beyond x1 and the condition (CLIP embeddings)
    cond_dropout: float = 0.0  # share of rows trained with the null condition

    @classmethod
    def trainable_outputs(cls, settings: dict) -> tuple[str, ...]:
        """``model_outputs`` for these settings (a loss option can need more of the model)."""
        return cls.model_outputs

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        raise NotImplementedError

    def check(self, device: torch.device) -> None:
        pass
