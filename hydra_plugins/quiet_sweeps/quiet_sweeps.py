"""A sweep starts without noise: loading Optuna's sweeper (``hparams_search=...``) imports alembic,
which announces each of its plugins at INFO level (``[HYDRA] setup plugin alembic.autogenerate...``,
seven lines) before the first job. ``QuietSweeps`` (registered in configs/hydra/default.yaml) raises
those loggers to WARNING when the sweep starts, after Hydra set up its logging and before it loads
the sweeper, unless ``hydra.verbose`` is set (``true``, or names the logger: ``hydra.verbose=alembic``).
"""

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

QUIET_LOGGERS = ("alembic",)


class QuietSweeps(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.hydra.verbose:
            for name in QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
