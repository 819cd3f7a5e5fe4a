"""The loss contract: ``loss(model, batch) -> LossOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and detached scalar metrics to log beside it."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss.ndim != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(self.loss.shape)}")
