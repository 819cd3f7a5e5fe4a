"""The evaluator contract.

Every evaluator is called ``evaluator(model, sampler, data, ctx) -> metrics`` with ``data`` the
data set's ``HeldOut`` (dataloaders/base.py) and ``ctx`` an ``EvalContext``; ``prepare(device)``
loads what it needs before training, ``settings(sampler)`` says how its scores were made (for
metrics.json), and class attributes declare what it can score (``data_kinds``, ``model_outputs``)
and whether it samples with the run's sampler (``uses_sampler``), for training/compat.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class EvalContext:
    """Where and how one evaluation runs. ``out_dir`` is given at the final evaluation: samples and
    pictures are written there. ``source`` names the weights (checkpoint and step) for sample folders."""

    device: torch.device
    autocast: Autocast = contextlib.nullcontext
    out_dir: Path | None = None
    step: int | None = None
    source: str = ""
