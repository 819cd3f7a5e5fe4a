"""Condition dropout: the one mechanism by which every loss trains the null condition that
classifier-free guidance subtracts.

The null condition has one spelling per kind of condition, which every model honours:
- class labels (a tensor): label -1, the model's learned null class (``models.layers.LabelEmbedder``);
- text (a dict: tokens, cached embeddings, ...): ``cond["drop"]`` (B,) bool, True where the row is
  unconditional: GLIDE reads it as the empty caption (mask all False), SDXL as zeroed text
  embeddings, each as it was trained. Other entries (an upsampler's low-res image, a CLIP
  embedding) stay: they are inputs, not the condition guidance acts on.
"""

from __future__ import annotations

import torch
from torch import Tensor

Cond = Tensor | dict[str, Tensor] | None


def check_dropout(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"loss.cond_dropout must be in [0, 1], got {p}")


def _rows(n: int, p: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) < p


def drop_condition(cond: Cond, p: float) -> Cond:
    """A copy of ``cond`` in which each row is the null condition with probability ``p``."""
    if cond is None or p <= 0 or (isinstance(cond, dict) and not cond):  # nothing to drop
        return cond
    if isinstance(cond, Tensor):
        return torch.where(_rows(len(cond), p, cond.device), torch.full_like(cond, -1), cond)
    first = next(iter(cond.values()))
    drop = _rows(first.shape[0], p, first.device)
    return {**cond, "drop": drop | cond["drop"] if "drop" in cond else drop}


def null_condition(cond: Cond) -> Cond:
    """The unconditional counterpart of ``cond`` (what classifier-free guidance subtracts)."""
    if cond is None or isinstance(cond, Tensor):
        return None
    first = next(iter(cond.values()))
    return {**cond, "drop": torch.ones(first.shape[0], dtype=torch.bool, device=first.device)}
