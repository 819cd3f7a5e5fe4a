"""EMA of weights with warmup, as an ``AveragedModel`` averaging function."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

TensorList = list[Tensor] | tuple[Tensor, ...]


def ema_with_warmup(decay: float) -> Callable[[TensorList, TensorList, Tensor | int], None]:
    """Decay ``min(decay, (1 + n) / (10 + n))`` after n updates.

    A constant 0.999 would keep ~70% of the random initialisation after 300 steps, so short
    runs would be evaluated on a model that barely trained; the warmup follows the weights early.
    """

    @torch.no_grad()
    def update(ema: TensorList, current: TensorList, num_averaged: Tensor | int) -> None:
        if not torch.is_floating_point(ema[0]):  # integer buffers (counters) follow the model
            torch._foreach_copy_(ema, current)
            return
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema, current, 1 - d)

    return update
