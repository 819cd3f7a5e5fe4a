"""Parameter groups by name and the 8-bit AdamW option, so no model needs optimizer code.

``param_groups`` rules match parameter names with regular expressions: the first rule a
parameter's name matches decides it. A rule either freezes the parameters (``freeze: true``:
``requires_grad=False``, no optimizer state) or sets their options (``lr``, ``weight_decay``, and the
trainer's ``grad_clip`` and ``name``: a group clipped to its own norm, logged under its name); the
rest train with the optimizer's defaults. GLIDE fine-tuning uses this to give the text
encoder its own learning rate or to freeze it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from training.callbacks import Callback

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, rules: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer groups for ``model`` from ``rules`` (``[{pattern, lr?, weight_decay?, freeze?}]``)."""
    compiled = []
    for rule in rules:
        if "pattern" not in rule:
            raise ValueError(f"param_groups rule {dict(rule)} needs a 'pattern' (a regular expression on names)")
        try:
            compiled.append((re.compile(rule["pattern"]), {k: v for k, v in rule.items() if k != "pattern"}))
        except re.error as e:
            raise ValueError(f"param_groups pattern {rule['pattern']!r} is not a regular expression: {e}") from e
    groups: list[dict[str, Any]] = [{"params": []} for _ in compiled] + [{"params": []}]
    for name, p in model.named_parameters():
        index = next((i for i, (pattern, _) in enumerate(compiled) if pattern.search(name)), len(compiled))
        options = compiled[index][1] if index < len(compiled) else {}
        if options.get("freeze"):
            p.requires_grad_(False)
            continue
        if p.requires_grad:
            groups[index]["params"].append(p)
    for (pattern, options), group in zip(compiled, groups, strict=False):
        if not options.get("freeze"):
            group.update({k: v for k, v in options.items() if k != "freeze"})
        if not group["params"] and not options.get("freeze"):
            raise ValueError(
                f"param_groups pattern {pattern.pattern!r} matches no trainable parameter; check the names"
            )
        n = sum(p.numel() for p in group["params"])
        log.info("param group %r: %d tensors, %.2fM parameters, %s", pattern.pattern, len(group["params"]), n / 1e6,
                 "frozen" if options.get("freeze") else options)  # fmt: skip
    return [g for g in groups if g["params"]]


def optimizer_groups(model: nn.Module, rules: list[dict[str, Any]], callbacks: list[Callback]) -> list[dict]:
    """The optimizer's parameter groups: a callback's (an adapter's training phase), else the
    ``param_groups`` rules'; both at once would be two answers to one question, so it is refused."""
    provided = [groups for cb in callbacks if (groups := cb.param_groups(model)) is not None]
    if not provided:
        return param_groups(model, rules)
    if rules or len(provided) > 1:
        raise ValueError(
            "the adapter's training phase defines the optimizer groups; drop the param_groups rules "
            "(set the adapter's learning rates and clipping in adapter_training.*)"
        )
    return provided[0]


def adamw8bit(
    params: Any, lr: float = 1e-4, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0
) -> Optimizer:
    """bitsandbytes' 8-bit AdamW: optimizer state in 8 bits, a quarter of AdamW's memory. CUDA only."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not torch.cuda.is_available() or any(p.device.type != "cuda" for p in tensors):
        raise ValueError("optimizer=adamw8bit (bitsandbytes) needs CUDA; on this device use optimizer=adamw")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError(
            "optimizer=adamw8bit needs bitsandbytes: pip install -e '.[gpu]' (or pip install bitsandbytes)"
        ) from e
    make: Callable[..., Optimizer] = bnb.optim.AdamW8bit
    return make(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
