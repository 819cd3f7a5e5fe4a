"""Training progress on rank 0: a tqdm bar that moves every optimizer step when the run is attached to
a terminal; elsewhere (a pipe, nohup, SLURM, a Modal log) one log line

    step N/T (epoch e/E) loss L lr LR R it/s ETA 00:12 epoch, 03:45 run

every ``log_every`` steps and at least every ``every_seconds`` (unless a step, or an evaluation within
one, takes longer).

The loss shown is the mean over the steps since the trainer last read the losses back (its log
points, and before evaluations and checkpoints), or that window's mean right after a read. It is
never read back every step (a CUDA stall): a line (at most every ``log_every`` steps or
``every_seconds``) or the bar's loss (at most once per ``BAR_READ_SECONDS``) reads it, one device
sync each time. Under torchrun that read is rank 0's own batches (no collective), while the log
points show the mean over all ranks.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger(__name__)

BAR_READ_SECONDS = 1.0


@dataclass(frozen=True)
class Position:
    """Where the run stands after an optimizer step."""

    step: int
    epoch: int  # completed epochs: the step belongs to epoch ``epoch + 1``
    step_in_epoch: int
    lr: float


def attached_to_terminal() -> bool:
    """A bar only when both streams are a terminal: ``> file`` leaves stderr on the terminal, but
    the file (and launcher.log) should get the progress lines."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """Shows where a training run stands; ``enabled=False`` (ranks > 0) shows nothing."""

    def __init__(
        self,
        *,
        total: int,
        epochs: int,
        steps_per_epoch: int,
        start_step: int,
        log_every: int,
        every_seconds: float,
        enabled: bool,
        terminal: bool | None = None,
    ):
        terminal = attached_to_terminal() if terminal is None else terminal
        self.total, self.epochs, self.steps_per_epoch = total, epochs, steps_per_epoch
        self.log_every, self.every_seconds = log_every, every_seconds
        self.lines = enabled and not terminal
        self.bar = (
            tqdm(total=total, initial=min(start_step, total), desc="train", unit="step", dynamic_ncols=True)
            if enabled and terminal
            else None
        )
        self.start, self.start_step = time.monotonic(), start_step
        self.last_line, self.last_line_step = self.start, start_step
        self.last_read = -float("inf")
        self.loss = float("nan")

    def update(self, at: Position, read_loss: Callable[[], float]) -> None:
        """After each optimizer step; ``read_loss`` reads the recent loss back (a device sync)."""
        now = time.monotonic()
        if self.bar is not None:
            if now - self.last_read >= BAR_READ_SECONDS or at.step % self.log_every == 0 or at.step == self.total:
                self.loss, self.last_read = read_loss(), now
            epoch_eta = tqdm.format_interval(self._eta(at.step, self._epoch_left(at), now))
            self.bar.set_postfix_str(
                f"loss={self.loss:.4f}, lr={at.lr:.2e}, epoch {at.epoch + 1}/{self.epochs} ETA {epoch_eta}",
                refresh=False,
            )
            self.bar.update(at.step - self.bar.n)
        elif self.lines and (at.step % self.log_every == 0 or at.step == self.total or self._due(at.step, now)):
            self.loss = read_loss()
            rate = (at.step - self.last_line_step) / max(now - self.last_line, 1e-9)
            log.info(
                "step %d/%d (epoch %d/%d) loss %.4f lr %.2e %.3g it/s ETA %s epoch, %s run",
                at.step, self.total, at.epoch + 1, self.epochs, self.loss, at.lr, rate,
                tqdm.format_interval(self._eta(at.step, self._epoch_left(at), now)),
                tqdm.format_interval(self._eta(at.step, self.total - at.step, now)),
            )  # fmt: skip
            self.last_line, self.last_line_step = now, at.step

    def _due(self, step: int, now: float) -> bool:
        """A line now if waiting for the next step could leave more than ``every_seconds`` between two:
        lines come at step ends, and a step may take up to twice the average (a checkpoint, the next
        epoch's first batch) before a 30 s gap becomes 33 s."""
        step_s = (now - self.start) / max(1, step - self.start_step)
        return now - self.last_line + 2 * step_s >= self.every_seconds

    def _epoch_left(self, at: Position) -> int:
        return max(0, min(self.steps_per_epoch - at.step_in_epoch, self.total - at.step))

    def _eta(self, step: int, steps_left: int, now: float) -> float:
        """Seconds for ``steps_left`` more steps at this process's average rate so far (evaluations and
        checkpoints included: they recur)."""
        done = step - self.start_step
        return steps_left * (now - self.start) / done if done > 0 else 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
