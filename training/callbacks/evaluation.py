"""Periodic evaluation during training: every ``eval.every_steps`` steps and ``eval.every_epochs``
epochs (not after the last epoch: the final evaluation follows it), on rank 0, with the EMA or the
raw weights; the scores go to the tracker and into the next checkpoint."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataloaders.base import HeldOut
from evaluation.contract import Autocast, EvalContext, Evaluator
from evaluation.errors import EvaluationError
from solvers.base import Sampler
from training import distributed
from training.callbacks.base import Callback
from training.errors import user_errors
from training.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scoring:
    """An evaluator with what it scores against: the run's sampler, the held-out data, where it runs.
    Bad evaluation input (a missing reference, an unusable setting) is a one-line ``UserError``."""

    evaluator: Evaluator[Any]
    sampler: Sampler | None
    held_out: HeldOut
    device: torch.device
    autocast: Autocast
    label: str = ""  # the run and its model, for the pictures' titles (``run_label``)

    def __call__(
        self, model: nn.Module, step: int | None = None, out_dir: Path | None = None, source: str = ""
    ) -> dict[str, float]:
        ctx = EvalContext(self.device, self.autocast, out_dir, step, source, self.label)
        at = f" at step {step}" if step is not None else ""
        sampler = f" with {type(self.sampler).__name__}" if self.sampler is not None else ""
        log.info("evaluating%s: %s%s", at, type(self.evaluator).__name__, sampler)  # its own progress, in any log
        start = time.monotonic()
        with user_errors(kinds=(EvaluationError,)):
            metrics = self.evaluator(model, self.sampler, self.held_out, ctx)
        log.info("evaluation%s took %.1f s", at, time.monotonic() - start)
        return metrics

    def prepare(self) -> None:
        """Load what the evaluator needs now: a missing FID reference fails before training, not after."""
        with user_errors(kinds=(EvaluationError,)):
            self.evaluator.prepare(self.device)

    def settings(self) -> dict[str, Any]:
        return self.evaluator.settings(self.sampler)


class PeriodicEval(Callback):
    """Keeps ``latest`` (shared with the checkpoint writer) at the scores of the last evaluation."""

    def __init__(self, scoring: Scoring, tracker: Tracker, latest: dict[str, float], use_ema: bool):
        self.scoring = scoring
        self.tracker = tracker
        self.latest = latest
        self.use_ema = use_ema
        self.every_steps: int = scoring.evaluator.every_steps
        self.every_epochs: int = scoring.evaluator.every_epochs

    def after_step(self, trainer: Any) -> None:
        if self.every_steps and trainer.step % self.every_steps == 0:
            self.evaluate(trainer)
            log.info("step %d: %s", trainer.step, brief(self.latest))

    def on_epoch_end(self, trainer: Any) -> None:
        if trainer.epoch < trainer.epochs and self.every_epochs and trainer.epoch % self.every_epochs == 0:
            self.evaluate(trainer)
            log.info("epoch %d: %s", trainer.epoch, brief(self.latest))

    def evaluate(self, trainer: Any) -> None:
        trainer.check_losses()  # no score for weights past a NaN
        model = trainer.eval_module(self.use_ema)  # rank 0's; None on the others
        if model is not None:
            self.latest.update(self.scoring(model, step=trainer.step))
            self.tracker.log(self.latest, step=trainer.step)
        scores = distributed.broadcast_object(dict(self.latest))  # rank 0's, so every rank's callbacks agree
        for callback in trainer.callbacks:  # keep_best, early stopping
            callback.on_evaluation(trainer, scores, final=False)


def run_label(run_name: str, choices: dict[str, str]) -> str:
    """What the pictures of a run are titled with: ``digits_mf (unet, meanflow)``, the run and the
    model and loss options it was made of."""
    parts = [choices[g] for g in ("model", "loss") if choices.get(g) not in (None, "null")]
    return f"{run_name} ({', '.join(parts)})" if parts else run_name


def brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if "energy_distance" in k)
