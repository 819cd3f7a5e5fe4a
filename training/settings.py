"""The run's own settings (not a group's), checked before any work: a bad value is one line that
names the key and what it takes, and nothing is written for the refused run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.errors import UserError
from training.trainer import NAN_POLICIES


def _int(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(low: float, high: float, high_open: bool = True) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return low <= v < high if high_open else low <= v <= high

    return ok


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
    "trainer.ema_decay": (_number(0.0, 1.0), "a number in [0, 1), e.g. 0.999"),
    "trainer.max_consecutive_skips": (_int(1), "an integer >= 1"),
    "trainer.max_rollbacks": (_int(0), "an integer >= 0"),
    "trainer.rollback_lr_factor": (lambda v: _number(0.0, 1.0, high_open=False)(v) and v > 0, "a number in (0, 1]"),
    "checkpoint.every_epochs": (_int(1), "an integer >= 1"),
    "checkpoint.every_steps": (_int(0), "an integer >= 0 (0: off)"),
    "checkpoint.every_minutes": (_number(0.0, float("inf")), "a number of minutes >= 0 (0: off)"),
    "checkpoint.archive_every_epochs": (_int(0), "an integer >= 0 (0: never)"),
}


def check_run_settings(cfg: DictConfig) -> None:
    for key, (accepts, takes) in SETTINGS.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        if not accepts(value):
            raise UserError(f"{key}={value!r} is not valid: {key} takes {takes}")
