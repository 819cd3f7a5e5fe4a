"""The evaluator contract.

Every evaluator is an ``Evaluator``: called ``evaluator(model, sampler, data, ctx) -> metrics`` with
``data`` the data set's ``HeldOut`` (dataloaders/base.py) and ``ctx`` an ``EvalContext``;
``prepare(device)`` loads what it needs before training, ``settings(sampler)`` says how its scores
were made (for metrics.json), and class attributes declare what it can score (``data_kinds``,
``model_outputs``) and whether it samples with the run's sampler (``uses_sampler``), for
training/compat.py. Its settings are keyword-only dataclass fields, the keys of its ``configs/eval`` file.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from dataloaders.base import HeldOut
from solvers.base import Sampler

Autocast = Callable[[], contextlib.AbstractContextManager]
SamplerT = TypeVar("SamplerT", bound="Sampler | None")  # None: the model samples itself (``uses_sampler = False``)


@dataclass(frozen=True)
class EvalContext:
    """Where and how one evaluation runs. ``out_dir`` is given at the final evaluation: samples and
    pictures are written there. ``source`` names the weights (checkpoint and step) for sample folders;
    ``label`` names the run and its model in the pictures' titles (``digits_mf (unet, meanflow)``)."""

    device: torch.device
    autocast: Autocast = contextlib.nullcontext
    out_dir: Path | None = None
    step: int | None = None
    source: str = ""
    label: str = ""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; the model's train/eval mode is restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(kw_only=True, eq=False)
class Evaluator(ABC, Generic[SamplerT]):
    """What every evaluator has: when it runs during training (every ``every_epochs`` epochs, 0 = only at
    the end, and every ``every_steps`` optimizer steps, 0 = off; always at the end), the ``seed`` of its
    noise, and the classifier-free ``guidance_scale`` it samples with (1 = none)."""

    data_kinds: ClassVar[tuple[str, ...]]
    model_outputs: ClassVar[tuple[str, ...]]
    uses_sampler: ClassVar[bool]

    every_epochs: int = 1
    every_steps: int = 0
    seed: int = 0
    guidance_scale: float = 1.0

    @abstractmethod
    def __call__(self, model: nn.Module, sampler: SamplerT, data: HeldOut, ctx: EvalContext) -> dict[str, float]:
        """The scores, as flat keys (``eval/...``); with ``ctx.out_dir`` (the final evaluation) also what
        the evaluator writes there."""

    def prepare(self, device: torch.device) -> None:
        """Load what evaluation needs before any training, so a missing piece fails fast (nothing here)."""

    def settings(self, sampler: SamplerT) -> dict[str, Any]:
        """How the scores were made, for metrics.json beside them."""
        return {"eval/seed": self.seed, "eval/guidance_scale": self.guidance_scale}
