"""The model contract's helpers: ``forward(x, t, r, cond) -> prediction``.

Models declare ``data_kinds`` (what they take) and ``output``: ``field`` (a tensor of x's shape,
made a velocity, an average velocity or eps by the loss that trains it; time t in [0, 1], noise at
0, data at 1), ``eps_var`` (GLIDE: eps and learned-variance values, on the original discrete
timesteps) or ``pipeline`` (SDXL: sampled by its own diffusers pipeline).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Model(nn.Module):
    """Base of every model: ``forward(x, t, r, cond)`` and the declarations training/compat.py reads.

    ``needs_cond`` and ``learned_null`` answer from the model's config node (its settings), so a run
    is checked before the model is built.
    """

    data_kinds: ClassVar[tuple[str, ...]] = ()
    output: ClassVar[str] = ""
    traits: ClassVar[tuple[str, ...]] = ()
    tokenizer: ClassVar[str | None] = None  # the tokens a text model reads: glide | sdxl

    @classmethod
    def needs_cond(cls, settings: dict[str, Any]) -> tuple[str, ...]:
        """Batch entries beyond x1 and the condition that these settings need (an upsampler: low_res)."""
        return ()

    @classmethod
    def learned_null(cls, settings: dict[str, Any]) -> bool:
        """Whether the weights it starts from already learned the null condition guidance needs."""
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP's and ``torch.compile``'s wrappers, for code that reads the model's
    declarations or frozen helpers (a VAE, a noise schedule) beside its forward pass."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def diffusion_time(model: nn.Module, t: Tensor, steps: int) -> Tensor:
    """The time a model takes for diffusion timestep ``t`` of ``steps``: the timestep itself for
    models built on discrete timesteps (GLIDE), ``1 - t / steps`` for field models, whose time runs
    from noise (0) to data (1) as in flow matching."""
    return t if unwrap(model).output != "field" else 1 - t / steps
