"""``checkpoint.keep_best=METRIC``: ``best.pt`` beside ``last.pt``, the checkpoint that scored best on
METRIC so far, rewritten whenever it improves.

An ``eval/`` score is judged at each evaluation during training and at the final one; a ``train/`` value
(``train/loss``: the mean of the log window) at each log point. Lower is better unless
``checkpoint.best_mode`` says otherwise (``auto``: scores such as ``clip_score`` are maximised, see
``training.callbacks.early_stopping.direction``). ``best.pt`` is written by the run's checkpoint writer,
as ``last.pt`` is: through a temp file and an atomic rename, and only once its weights produced a finite
loss (a NaN discards it; the previous ``best.pt`` stays). It is a full checkpoint (resumable, and
``eval_checkpoint=.../best.pt`` scores it); what it was chosen by: ``config.checkpoint.keep_best`` names
the metric, ``metrics[METRIC]`` is its value and ``step`` its step; the log says so at each write.
"""

from __future__ import annotations

import logging
from typing import Any

from training.callbacks.checkpointing import CheckpointWriter
from training.callbacks.early_stopping import MetricCallback, Plateau, direction

log = logging.getLogger(__name__)

BEST_NAME = "best.pt"


class BestCheckpoint(MetricCallback):
    """Writes ``best.pt`` with ``writer`` whenever ``metric`` improves (None: never)."""

    def __init__(self, writer: CheckpointWriter, metric: str | None = None, mode: str = "auto"):
        super().__init__(metric, "checkpoint.keep_best", Plateau(direction(metric, mode)))
        self.writer = writer
        self.path = writer.last.with_name(BEST_NAME)
        self.due: dict[str, float] | None = None  # a log point's improvement, written in after_step

    def check(self, trainer: Any, value: float, metrics: dict[str, float], final: bool) -> None:
        if not self.plateau.improves(value):
            return
        p = self.plateau
        was = "" if p.best_step is None else f" (was {p.best:.5g} at step {p.best_step})"
        p.record(value, trainer.step)
        log.info("best %s=%.5g at step %d%s: writing %s", self.metric, value, trainer.step, was, self.path)
        # the latest evaluation's scores (as last.pt keeps them) and what this one was chosen by
        scores = {**self.writer.metrics, **(metrics if self.at_evaluation else {str(self.metric): value})}
        if self.at_evaluation:  # within the evaluation's after_step / on_epoch_end, or after training
            self.writer.write(trainer, self.path, scores, final=final)
        else:
            self.due = scores

    def after_step(self, trainer: Any) -> None:
        if self.due is not None:
            scores, self.due = self.due, None
            trainer.check_losses()
            self.writer.write(trainer, self.path, scores)
