"""Preemption-safe stops: SIGINT and SIGTERM (Ctrl-C, SLURM preemption, a Modal shutdown) end
the run after the current optimizer step, with a checkpoint at that step; a second Ctrl-C stops
at once. Under torchrun every rank takes part in one all-reduce per step, so all stop at the same
step even when the signal reached them between different steps.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from training import distributed
from training.callbacks.base import Callback
from training.callbacks.checkpointing import CheckpointWriter

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunControl(Callback):
    """Watches for stop signals and, with ``every_minutes``, has ``writer`` write ``last.pt`` when that
    much time has passed since its last write; both decisions are shared by all ranks at the same step."""

    def __init__(self, writer: CheckpointWriter | None, every_minutes: float = 0.0):
        self.writer = writer
        self.every_s = 60.0 * every_minutes if writer is not None else 0.0
        self.received: str | None = None  # the signal's name, once one arrived (on any rank)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> RunControl:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and writing last.pt (Ctrl-C again to stop at once)",
                    self.received)  # fmt: skip

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        due = (
            self.writer is not None
            and bool(self.every_s)
            and distributed.rank() == 0
            and time.monotonic() - self.writer.last_write >= self.every_s
        )
        stop, due = distributed.any_across_ranks([self.received is not None, due])
        if stop:
            self.received = self.received or "a signal on another rank"
            trainer.stop_reason = f"interrupted by {self.received}"
        elif due and self.writer is not None:
            self.writer.write(trainer, self.writer.last)
        return {}
