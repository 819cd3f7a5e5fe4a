"""``loss.png`` in the run folder: the training loss of every step (faint) with a smoothed curve (an
exponential moving average, run forwards and backwards), and under it each evaluation's scores (a
marker per evaluation), against the step. Redrawn at every checkpoint (so at the end, and when a run
is stopped), on rank 0, with matplotlib's Agg canvas: a fraction of a second. The history travels in
the checkpoint, so a resumed run's picture covers the whole run."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from scipy.signal import filtfilt
from torch import Tensor

from evaluation.pictures import save_figure
from training.callbacks.base import Callback

MAX_POINTS = 50_000  # losses kept; beyond, neighbours are averaged in pairs (the early steps get coarser)
PLOT_POINTS = 4_000  # raw losses drawn; more are averaged into this many bins
SKIPPED = ("eval/nfe_used",)  # not scores

log = logging.getLogger(__name__)


class LossPlot(Callback):
    """Keeps the step losses (read from ``trainer.losses`` as they are read back from the device) and
    the evaluations' scores (``on_evaluation``); draws ``path`` at every checkpoint, titled ``title``."""

    def __init__(self, path: Path, title: str = ""):
        self.path = path
        self.title = title
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.seen = 0  # entries of trainer.losses already collected

    def on_log(self, trainer: Any, losses: list[float], metrics: dict[str, float]) -> dict[str, float]:
        self.collect(trainer)
        return {}

    def after_step(self, trainer: Any) -> None:
        self.collect(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        self.collect(trainer)

    def on_evaluation(self, trainer: Any, metrics: dict[str, float], final: bool) -> None:
        scores = {k: float(v) for k, v in metrics.items() if k.startswith("eval/") and not k.startswith(SKIPPED)}
        scores = {k: v for k, v in scores.items() if math.isfinite(v)}
        if self.evals and self.evals[-1][0] == trainer.step:  # the final evaluation at a periodic one's step
            self.evals.pop()
        if scores:
            self.evals.append((trainer.step, scores))

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        self.collect(trainer)
        save_figure(self.figure(), self.path)

    def collect(self, trainer: Any) -> None:
        """Take the losses read back since the last call: they are the last entries of ``trainer.losses``
        and belong to the steps up to ``trainer.checked_step`` (after a rollback, only those past what is
        already kept)."""
        fresh = len(trainer.losses) - self.seen
        last = self.steps[-1] if self.steps else 0
        count = min(fresh, trainer.checked_step - last)
        if count > 0:
            self.steps += range(trainer.checked_step - count + 1, trainer.checked_step + 1)
            self.losses += trainer.losses[-count:]
        self.seen = len(trainer.losses)
        if len(self.losses) > MAX_POINTS:
            self.steps, self.losses = self.steps[1::2], _pair_means(self.losses)

    def figure(self) -> Figure:
        """The loss (raw and smoothed) above the evaluations' scores, sharing the step axis."""
        rows = 2 if self.evals else 1
        fig = Figure(figsize=(7.5, 3.2 + 2.4 * (rows - 1) + 0.25 * bool(self.title)), dpi=110)
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, 1, sharex=True, squeeze=False, height_ratios=[3, 2][:rows])[:, 0]
        steps, losses = np.asarray(self.steps), np.asarray(self.losses, dtype=np.float64)
        ax = axes[0]
        if len(losses):
            span = min(200, max(2, len(losses) // 50))
            x, raw = _binned(steps, losses, PLOT_POINTS)
            ax.plot(x, raw, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
            xs, smooth = _binned(steps, _smoothed(losses, span), PLOT_POINTS)
            per_point = max(1.0, (steps[-1] - steps[0]) / max(1, len(steps) - 1))  # > 1 once thinned out
            ax.plot(xs, smooth, color="tab:blue", lw=1.6, label=f"smoothed (~{span * per_point:.0f} steps)")
            _readable_y(ax, losses)
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
        if self.evals:
            self._draw_scores(axes[1])
        axes[-1].set_xlabel("step")
        if self.title:
            fig.suptitle(self.title, fontsize=10)
        fig.tight_layout()
        return fig

    def _draw_scores(self, ax: Any) -> None:
        keys = list(dict.fromkeys(k for _, scores in self.evals for k in scores))
        for key in keys:
            points = [(step, scores[key]) for step, scores in self.evals if key in scores]
            ax.plot(*zip(*points, strict=True), marker="o", ms=4, lw=1, label=key.removeprefix("eval/"))
        _readable_y(ax, np.array([v for _, s in self.evals for v in s.values()]))
        ax.set_ylabel("evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=2 if len(keys) > 4 else 1, loc="best")

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "evals": [{"step": step, "scores": scores} for step, scores in self.evals],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The history of the run so far. A checkpoint from before this callback has none, and one that
        does not have the shape written here (it is untrusted) is dropped with a warning: the picture
        then starts at the resumed step, a picture is no reason to refuse a resume."""
        if "losses" not in state:
            return
        if not _well_formed(state):
            log.warning("the checkpoint's loss history is malformed; loss.png starts afresh at the resumed step")
            return
        self.steps, self.losses = state["steps"].tolist(), state["losses"].tolist()
        self.evals = [(e["step"], {str(k): float(v) for k, v in e["scores"].items()}) for e in state["evals"]]


def _well_formed(state: dict[str, Any]) -> bool:
    """Whether ``state`` has the shape ``LossPlot.state_dict`` writes."""
    steps, losses, evals = state.get("steps"), state.get("losses"), state.get("evals")
    if not (isinstance(steps, Tensor) and isinstance(losses, Tensor) and isinstance(evals, list)):
        return False
    return (
        steps.ndim == 1
        and steps.shape == losses.shape
        and all(
            isinstance(e, dict)
            and isinstance(e.get("step"), int)
            and isinstance(e.get("scores"), dict)
            and all(isinstance(v, (int, float)) for v in e["scores"].values())
            for e in evals
        )
    )


def _smoothed(values: np.ndarray, span: int) -> np.ndarray:
    """An exponential moving average over about ``span`` steps, run forwards and backwards so the curve
    does not lag behind a loss that falls fast (too few values to filter are drawn as they are)."""
    beta = 1 - 1 / span
    return filtfilt([1 - beta], [1, -beta], values) if len(values) > 12 else values


def _binned(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``bins`` points: means of consecutive groups (drawing a million is slow and unreadable)."""
    if len(y) <= bins:
        return x, y
    groups = np.array_split(np.arange(len(y)), bins)
    return np.array([x[g[-1]] for g in groups]), np.array([y[g].mean() for g in groups])


def _pair_means(values: list[float]) -> list[float]:
    a = np.asarray(values[: len(values) // 2 * 2], dtype=np.float64).reshape(-1, 2).mean(axis=1)
    return a.tolist()


def _readable_y(ax: Any, values: np.ndarray) -> None:
    """Log scale for positive values spanning more than a factor of 20 (a loss that falls fast stays
    readable), its ticks labelled as plain numbers at 1 (and, over up to 3 decades, 2 and 5) times a
    power of ten; else a linear scale without an offset (a loss near 1 reads 0.99997, not
    1e-7+9.9999e-1)."""
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        few_decades = finite.max() / finite.min() < 1e3  # over more, 2x and 5x labels would overlap
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: _plain(v) if few_decades and f"{v:.0e}"[0] in "25" else "")
        )
    else:
        ax.ticklabel_format(axis="y", useOffset=False)


def _plain(value: float, _: Any = None) -> str:
    return f"{value:.3g}"
