"""The callback contract: training-time machinery that belongs to one kind of model (an adapter's
phases, checks and files) hooks into the generic loop here instead of adding branches to it.

The trainer calls, in order: ``param_groups`` once before the optimizer is built, ``on_train_start``
before the first step, ``on_step_end`` after every optimizer step (after the EMA update),
``on_log`` at every log point with the step losses just read back, and ``on_checkpoint`` after
every checkpoint it writes. Metrics a hook returns are logged at that step. A callback stops
training by setting ``trainer.stop_reason``. Its ``state_dict`` travels in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


class Callback:
    """No-op hooks; subclasses override what they need."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Optimizer groups (torch's format; ``name`` and ``grad_clip`` keys are the trainer's, see
        ``Trainer``), or None to leave the groups to the ``param_groups`` rules."""
        return None

    def on_train_start(self, trainer: Any, data: Any) -> None:
        pass

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        return {}

    def on_log(self, trainer: Any, losses: list[float], metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
