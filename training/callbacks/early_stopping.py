"""Early stopping for every model, and the bookkeeping it shares with ``checkpoint.keep_best`` and the
CLIP adapter's own early stopping (``Plateau``).

``early_stopping.metric`` names what to watch: an ``eval/`` score is checked at each evaluation during
training (``eval.every_epochs``, ``eval.every_steps``), a ``train/`` value (``train/loss``, the mean of
the log window) at each log point (``trainer.log_every``). When it has not improved by more than
``min_delta`` for ``patience`` checks in a row the callback sets ``trainer.stop_reason``: the run then
ends as a completed one (final evaluation, ``last.pt``, log entry) with a log line saying why.

Direction (``mode``): ``min`` or ``max``; ``auto`` maximises scores whose name says higher is better
(``clip_score``, ``accuracy``, ``inception_score``) and minimises everything else (losses, FID, KID,
energy distance).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from training.callbacks.base import Callback
from training.errors import UserError

log = logging.getLogger(__name__)

MODES = ("auto", "min", "max")
HIGHER_IS_BETTER = ("clip_score", "accuracy", "inception_score")
SOURCES = ("eval/", "train/")  # checked at evaluations, at log points


def direction(metric: str | None, mode: str) -> str:
    """``min`` or ``max``: ``mode`` itself, or for ``auto`` what the metric's name says."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {' | '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "max" if metric is not None and any(s in metric for s in HIGHER_IS_BETTER) else "min"


class Plateau:
    """A metric's best value so far and how many checks in a row missed: a value improves when it beats
    the best by more than ``min_delta`` (lower for ``min``, higher for ``max``; NaN never does);
    ``exhausted`` once ``patience`` checks in a row failed."""

    def __init__(self, mode: str = "min", min_delta: float = 0.0, patience: int = 1):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        if not min_delta >= 0 or patience < 1:
            raise ValueError(f"min_delta must be >= 0 and patience >= 1, got {min_delta!r} and {patience!r}")
        self.mode, self.min_delta, self.patience = mode, float(min_delta), int(patience)
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None
        self.misses = 0

    def improves(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def record(self, value: float, step: int) -> None:
        """Make ``value`` (at ``step``) the best."""
        self.best, self.best_step = float(value), int(step)

    def count(self, ok: bool) -> bool:
        """One check: a good one resets the count of misses, a failed one adds to it; returns ``exhausted``."""
        self.misses = 0 if ok else self.misses + 1
        return self.exhausted

    def check(self, value: float, step: int) -> bool:
        """One check of ``value``: recorded and counted as good when it improves; returns whether it did."""
        improved = self.improves(value)
        if improved:
            self.record(value, step)
        self.count(improved)
        return improved

    @property
    def exhausted(self) -> bool:
        return self.misses >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "best": self.best, "best_step": self.best_step, "misses": self.misses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's record (untrusted): its types are checked, a malformed one is a ``ValueError``."""
        best, step, misses = state.get("best"), state.get("best_step"), state.get("misses")
        if not (
            isinstance(best, (int, float))
            and not isinstance(best, bool)
            and (step is None or (isinstance(step, int) and not isinstance(step, bool)))
            and isinstance(misses, int)
            and not isinstance(misses, bool)
            and misses >= 0
        ):
            raise ValueError(f"the checkpoint's early-stopping record is malformed ({state!r}); use another checkpoint")
        self.best, self.best_step, self.misses = float(best), step, misses


class MetricCallback(Callback):
    """A callback that acts on one metric (``metric`` None: it does nothing), with ``plateau`` keeping its
    best: an ``eval/`` score at each evaluation (``on_evaluation``), any other (``train/``) at each log
    point (``on_log``). ``option`` names the setting in messages. A metric the run does not produce is a
    one-line ``UserError`` at its first check, naming the metrics there are."""

    def __init__(self, metric: str | None, option: str, plateau: Plateau):
        self.metric, self.option, self.plateau = metric, option, plateau
        self.at_evaluation = metric is not None and metric.startswith("eval/")

    def on_evaluation(self, trainer: Any, metrics: dict[str, float], final: bool) -> None:
        if self.at_evaluation:
            self.check(trainer, self.value(metrics, "evaluation"), metrics, final)

    def on_log(self, trainer: Any, losses: list[float], metrics: dict[str, float]) -> dict[str, float]:
        if self.metric is not None and not self.at_evaluation:
            self.check(trainer, self.value(metrics, "log point"), metrics, False)
        return {}

    def check(self, trainer: Any, value: float, metrics: dict[str, float], final: bool) -> None:
        """One value of the metric, at ``trainer.step``; ``final``: the evaluation after training."""
        raise NotImplementedError

    def value(self, metrics: dict[str, float], where: str) -> float:
        assert self.metric is not None
        if self.metric not in metrics:
            prefix = self.metric.split("/")[0] + "/"
            names = sorted(k for k in metrics if k.startswith(prefix))
            raise UserError(
                f"{self.option}={self.metric} is not among the metrics of this run's {where}: "
                f"{', '.join(names) or 'none'}; pick one of them"
            )
        return float(metrics[self.metric])

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, **self.plateau.state_dict()} if self.metric is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from the checkpoint's record when it watched the same metric the same way; a record of
        another metric or direction (or none: an older checkpoint) starts the watch afresh."""
        if self.metric is None or not state:
            return
        if state.get("metric") != self.metric or state.get("mode") != self.plateau.mode:
            log.info("%s=%s (%s): the checkpoint watched %s (%s); starting afresh", self.option, self.metric,
                     self.plateau.mode, state.get("metric"), state.get("mode"))  # fmt: skip
            return
        self.plateau.load_state_dict(state)


class EarlyStopping(MetricCallback):
    """Ends training once ``metric`` has not improved by more than ``min_delta`` for ``patience`` checks
    in a row (see the module docstring)."""

    def __init__(self, metric: str | None = None, patience: int = 3, min_delta: float = 0.0, mode: str = "auto"):
        super().__init__(metric, "early_stopping.metric", Plateau(direction(metric, mode), min_delta, patience))

    def check(self, trainer: Any, value: float, metrics: dict[str, float], final: bool) -> None:
        if final:  # training is over
            return
        p = self.plateau
        if p.check(value, trainer.step):
            return
        log.info("early stopping: %s=%.5g at step %d, no better than %.5g (step %s) by more than %g: %d of %d",
                 self.metric, value, trainer.step, p.best, p.best_step, p.min_delta, p.misses, p.patience)  # fmt: skip
        if p.exhausted:
            trainer.stop_reason = (
                f"early stopping: {self.metric} has not improved on {p.best:.5g} (step {p.best_step}) by more "
                f"than {p.min_delta:g} for {p.patience} check{'s' if p.patience > 1 else ''} in a row "
                "(early_stopping.patience)"
            )
