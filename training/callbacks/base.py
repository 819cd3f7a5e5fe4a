"""The callback contract: everything that happens around the optimizer step (checkpoints, periodic
evaluation, stop signals, an adapter's phases and files) hooks into the generic loop here instead
of adding branches or closures to it.

The trainer calls, in order: ``param_groups`` once before the optimizer is built (training/run.py),
``on_train_start`` before the first step, then after every optimizer step ``on_step_end`` (after the
EMA update; cheap per-step machinery), ``on_log`` at log points with the step losses just read back,
and ``after_step`` (after the log point: the place for work that reads or saves the weights, which
calls ``trainer.check_losses()`` first so nothing past a NaN is kept); ``on_epoch_end`` after every
completed epoch (the losses checked), ``on_checkpoint`` after every checkpoint written, and
``on_evaluation`` after every evaluation with its scores (the periodic ones, from within ``after_step`` or
``on_epoch_end``, and the final one after training, ``final=True``; rank 0's scores, on every rank, so
every rank decides alike); training/train.py calls ``on_train_end`` once, however the run ended (``status``:
``completed``, ``failed: ...`` or ``interrupted at step N (...)``; ``metrics``: the final ones, or the latest
scores). Metrics a hook returns are logged at that step. A callback ends training by
setting ``trainer.stop_reason``. Its ``state_dict`` travels in the checkpoint.
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

    def after_step(self, trainer: Any) -> None:
        pass

    def on_epoch_end(self, trainer: Any) -> None:
        pass

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        pass

    def on_evaluation(self, trainer: Any, metrics: dict[str, float], final: bool) -> None:
        pass

    def on_train_end(self, trainer: Any, status: str, metrics: dict[str, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
