"""Exponential moving average of a model's weights, with warmup."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen copy of ``model`` whose floating-point parameters and buffers trail the model's.

    Decay after n updates is ``min(decay, (1 + n) / (10 + n))``: a constant 0.999 would keep ~70%
    of the random initialisation after 300 steps, so short runs would be scored on a model that
    barely trained. Integer buffers (counters) are copied. ``torch.optim.swa_utils.AveragedModel``
    does the same job but reads its counter back from the device on every update, which stalls
    a CUDA stream once per step; the step count here is a Python int.

    Frozen parameters (``requires_grad=False`` when the EMA is made) are shared with the model, not
    copied: their average is themselves, and a LoRA on a frozen SDXL would otherwise hold a second
    copy of 3.5B weights to average ~10M.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"trainer.ema_decay must be in [0, 1], got {decay}")
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(model, memo=dict(frozen)).eval().requires_grad_(False)
        self.decay = decay
        self._pairs_of: nn.Module | None = None
        self._cache: tuple[list[torch.Tensor], ...] = ()

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(EMA floats, model floats, EMA others, model others), built once per model."""
        if self._pairs_of is not model:
            both = zip((*self.module.parameters(), *self.module.buffers()), (*model.parameters(), *model.buffers()),
                       strict=True)  # fmt: skip
            pairs = [(e, c) for e, c in both if e is not c]  # frozen parameters are shared: nothing to average
            ema, cur = [e for e, _ in pairs], [c.detach() for _, c in pairs]
            is_float = [t.is_floating_point() for t in ema]
            self._cache = (
                [t for t, f in zip(ema, is_float, strict=True) if f],
                [t for t, f in zip(cur, is_float, strict=True) if f],
                [t for t, f in zip(ema, is_float, strict=True) if not f],
                [t for t, f in zip(cur, is_float, strict=True) if not f],
            )
            self._pairs_of = model
        return self._cache

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        d = min(self.decay, (1 + num_updates) / (10 + num_updates))
        ema_f, cur_f, ema_o, cur_o = self._pairs(model)
        torch._foreach_lerp_(ema_f, cur_f, 1 - d)
        if ema_o:
            torch._foreach_copy_(ema_o, cur_o)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
