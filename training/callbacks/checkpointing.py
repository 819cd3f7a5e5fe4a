"""The run's checkpoint writer: a checkpoint becomes ``last.pt`` (or its archive name) only once its
own weights have produced a finite loss, so the file a NaN leaves behind is one training can go on
from (``nan_policy=rollback`` reloads it).

A checkpoint is first written under a pending name (``.last.pt.pending.tmp``, removed at start if a
kill left it) and renamed into place after the next optimizer step's loss is known to be finite.
The final checkpoint and one written on a stop signal have no next step: they go straight into
place when every weight is finite.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training import distributed
from training.callbacks.base import Callback
from training.checkpoint import FORMAT, fsync_dir, save_checkpoint
from training.errors import NonFiniteLossError

log = logging.getLogger(__name__)


def pending_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.pending.tmp")


class CheckpointWriter(Callback):
    """Writes ``last.pt`` every ``every_steps`` steps and ``every_epochs`` epochs, and an archive copy
    every ``archive_every_epochs`` epochs, each with ``metrics`` (the latest evaluation's scores, a dict
    the periodic evaluation keeps current) and ``extra`` (RNG state, config, sampling record)."""

    def __init__(
        self,
        ckpt_dir: Path,
        extra: Callable[[], dict[str, Any]],
        metrics: dict[str, float],
        is_main: bool,
        *,
        every_steps: int = 0,
        every_epochs: int = 1,
        archive_every_epochs: int = 0,
    ):
        self.last = ckpt_dir / "last.pt"
        self.archive = ckpt_dir / "archive"
        self.extra = extra
        self.metrics = metrics
        self.is_main = is_main
        self.every_steps, self.every_epochs, self.archive_every_epochs = every_steps, every_epochs, archive_every_epochs
        self.pending: dict[Path, tuple[Path, int]] = {}  # pending file -> (its final path, its step)
        self.last_write = time.monotonic()  # for checkpoint.every_minutes (RunControl)

    def on_train_start(self, trainer: Any, data: Any) -> None:
        self.last_write = time.monotonic()  # checkpoint.every_minutes counts from the first step

    def after_step(self, trainer: Any) -> None:
        if self.every_steps and trainer.step % self.every_steps == 0:
            trainer.check_losses()
            self.write(trainer, self.last)

    def on_epoch_end(self, trainer: Any) -> None:
        if trainer.epoch % self.every_epochs == 0:
            self.write(trainer, self.last)
        if self.archive_every_epochs and trainer.epoch % self.archive_every_epochs == 0:
            self.write(trainer, self.archive / f"epoch_{trainer.epoch:04d}.pt")

    def write(self, trainer: Any, path: Path, metrics: dict[str, float] | None = None, final: bool = False) -> None:
        """Checkpoint the trainer at ``path`` (a collective under FSDP: every rank calls it)."""
        state = trainer.state_dict()
        if self.is_main:
            # the gathered state, not the live parameters: under FSDP those are shards, checked by a collective
            finite = final and all(
                bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point()
            )
            if final and not finite:  # the last update made inf weights: keep the last good checkpoint
                raise NonFiniteLossError(
                    f"the weights after step {trainer.step} are not finite; training stopped and the last good "
                    "checkpoint kept: lower the learning rate or set nan_policy=rollback"
                )
            target = path if finite else pending_name(path)
            scores = self.metrics if metrics is None else metrics
            save_checkpoint({"format": FORMAT, **state, **self.extra(), "metrics": scores}, target, shown=path)
            if finite:  # the loop ended with every loss checked: what is pending is good, this step too
                self.pending.pop(pending_name(path), None)
                pending_name(path).unlink(missing_ok=True)
                self.promote(trainer.step + 1)
            else:
                self.pending[target] = (path, trainer.step)
            for callback in trainer.callbacks:  # adapters write their files beside it
                callback.on_checkpoint(trainer, path)
        self.last_write = time.monotonic()
        distributed.barrier()

    def settle(self, trainer: Any) -> None:
        """Put the trained weights in place at ``last.pt`` before anything else can fail: the checkpoint
        pending at this very step (an epoch's end usually wrote one) is renamed into place if every
        weight is finite, which costs no second save; otherwise a final checkpoint is written."""
        if not distributed.is_sharded(trainer.model):  # the live weights are whole: check them here
            pending = self.pending.get(pending_name(self.last))
            finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
            if pending is not None and pending[1] == trainer.step and finite and distributed.world_size() == 1:
                self.promote(trainer.step + 1)
                return
        self.write(trainer, self.last, final=True)

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        if self.pending and trainer.known_finite_step() > min(step for _, step in self.pending.values()):
            self.promote(trainer.known_finite_step())
        return {}

    def promote(self, good_through: int) -> None:
        for tmp, (final, step) in list(self.pending.items()):
            if good_through > step:
                os.replace(tmp, final)
                fsync_dir(final.parent)
                del self.pending[tmp]
                log.debug("checkpoint of step %d is good: %s", step, final)

    def discard(self) -> None:
        """A NaN came first: the pending checkpoints hold weights that produced it."""
        for tmp in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()
