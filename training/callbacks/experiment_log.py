"""The run's EXPERIMENT_LOG entry as a callback (rank 0): written when training starts, rewritten after
each evaluation (its scores) and checkpoint, closed with the run's status and results (``on_train_end``).
The entry's format and its locking: training/experiment_log.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.callbacks.base import Callback
from training.experiment_log import Entry, write


class ExperimentLog(Callback):
    """Keeps ``entry`` current; ``ckpt_dir`` is the run's checkpoint folder. At most one write per step:
    an evaluation or a checkpoint marks the entry changed, ``after_step`` and ``on_epoch_end`` write it."""

    def __init__(self, entry: Entry, ckpt_dir: Path, is_main: bool):
        self.entry = entry
        self.ckpt_dir = ckpt_dir
        self.is_main = is_main
        self.written: set[Path] = set()  # checkpoints written, some still pending their next step's loss
        self._changed = False

    def on_train_start(self, trainer: Any, data: Any) -> None:
        if self.is_main:
            self.entry.step = trainer.step
            self.entry.checkpoints = self.checkpoints()  # a resumed run's
            write(self.entry)

    def on_evaluation(self, trainer: Any, metrics: dict[str, float], final: bool) -> None:
        if not final:  # the final scores come with the results, at the end
            self.entry.metrics, self.entry.scores_step = dict(metrics), trainer.step
            self._changed = True

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        self.written.add(path)
        self._changed = True

    def after_step(self, trainer: Any) -> None:
        self._update(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        self._update(trainer)

    def on_train_end(self, trainer: Any, status: str, metrics: dict[str, float]) -> None:
        if self.is_main:
            self.entry.checkpoints = self.checkpoints(on_disk_only=True)  # a NaN discards the pending ones
            self.entry.close(status, metrics, trainer.step)

    def _update(self, trainer: Any) -> None:
        if self.is_main and self._changed:
            self.entry.step, self.entry.checkpoints = trainer.step, self.checkpoints()
            write(self.entry)
        self._changed = False

    def checkpoints(self, on_disk_only: bool = False) -> list[Path]:
        """The run's checkpoints: ``last.pt`` and any other kept beside it (with those written but still
        pending unless ``on_disk_only``), and the archive folder."""
        kept = set(self.ckpt_dir.glob("*.pt")) if self.ckpt_dir.is_dir() else set()
        if not on_disk_only:
            kept |= {p for p in self.written if p.parent == self.ckpt_dir}
        archive = self.ckpt_dir / "archive"
        return [*sorted(kept), *([archive] if archive.is_dir() and any(archive.iterdir()) else [])]
