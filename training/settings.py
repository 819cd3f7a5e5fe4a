"""The run's own settings (not a group's), checked before any work: a bad value is one line that
names the key and what it takes, and nothing is written for the refused run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.callbacks.early_stopping import MODES, SOURCES
from training.errors import UserError
from training.precision import resolve_device
from training.trainer import NAN_POLICIES


def _int(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(low: float, high: float, high_open: bool = True) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return low <= v < high if high_open else low <= v <= high

    return ok


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _metric(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.startswith(SOURCES) and v not in SOURCES)


METRIC = "null or a metric: eval/<score> (checked at each evaluation) or train/<value> (at each log point), " \
    "e.g. eval/energy_distance@nfe2 or train/loss"  # fmt: skip

# key -> (accepts, what it takes); keys a config lacks (another trainer, no batch size) are not checked
SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (_int(1), "an integer >= 1"),
    "max_steps": (lambda v: v is None or _int(1)(v), "null or an integer >= 1"),
    "seed": (_int(0), "an integer >= 0"),
    "nan_policy": (lambda v: v in NAN_POLICIES, " | ".join(NAN_POLICIES)),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "overwrite": (lambda v: isinstance(v, bool), "true or false"),
    "dataloaders.batch_size": (_int(1), "an integer >= 1"),
    "trainer.grad_accum": (_int(1), "an integer >= 1"),
    "trainer.log_every": (_int(1), "an integer >= 1"),
    "trainer.progress_seconds": (_positive, "a number of seconds > 0, e.g. 30"),
    "trainer.ema_decay": (_number(0.0, 1.0), "a number in [0, 1), e.g. 0.999"),
    "trainer.max_consecutive_skips": (_int(1), "an integer >= 1"),
    "trainer.max_rollbacks": (_int(0), "an integer >= 0"),
    "trainer.rollback_lr_factor": (lambda v: _number(0.0, 1.0, high_open=False)(v) and v > 0, "a number in (0, 1]"),
    "checkpoint.every_epochs": (_int(1), "an integer >= 1"),
    "checkpoint.every_steps": (_int(0), "an integer >= 0 (0: off)"),
    "checkpoint.every_minutes": (_number(0.0, float("inf")), "a number of minutes >= 0 (0: off)"),
    "checkpoint.archive_every_epochs": (_int(0), "an integer >= 0 (0: never)"),
    "checkpoint.keep_best": (_metric, METRIC),
    "checkpoint.best_mode": (lambda v: v in MODES, " | ".join(MODES)),
    "early_stopping.metric": (_metric, METRIC),
    "early_stopping.patience": (_int(1), "an integer >= 1"),
    "early_stopping.min_delta": (_number(0.0, float("inf")), "a number >= 0"),
    "early_stopping.mode": (lambda v: v in MODES, " | ".join(MODES)),
}


def check_run_settings(cfg: DictConfig) -> None:
    for key, (accepts, takes) in SETTINGS.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        if not accepts(value):
            raise UserError(f"{key}={value!r} is not valid: {key} takes {takes}")
    check_metric_schedule(cfg)
    check_device_settings(cfg)


def check_metric_schedule(cfg: DictConfig) -> None:
    """An eval/ metric is watched at the evaluations during training: a run evaluating only at its end has none."""
    for key in ("checkpoint.keep_best", "early_stopping.metric"):
        metric = OmegaConf.select(cfg, key, default=None)
        every = [OmegaConf.select(cfg, f"eval.{k}", default=0) for k in ("every_epochs", "every_steps")]
        if isinstance(metric, str) and metric.startswith("eval/") and not any(every):
            raise UserError(
                f"{key}={metric} is checked at the evaluations during training, but this run evaluates only at the "
                "end (eval.every_epochs=0, eval.every_steps=0): set eval.every_epochs=N or eval.every_steps=N"
            )


def check_device_settings(cfg: DictConfig) -> None:
    """What needs CUDA, refused on other devices (MPS, CPU) in one line; the precision presets check
    themselves (``Precision.check``), as does ``loss.use_cuda_graph``."""
    device = resolve_device(OmegaConf.select(cfg, "device", default=None))
    if cfg.get("compile") and cfg.get("compile_mode") == "reduce-overhead" and device.type != "cuda":
        raise UserError(
            f"compile_mode=reduce-overhead replays CUDA graphs, which need CUDA (device is {device.type}); "
            "use compile_mode=default"
        )
