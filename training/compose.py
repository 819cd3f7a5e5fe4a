"""Compose the launcher's config outside the launcher (tests, benchmarks, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_config(overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """``configs/train.yaml`` with ``overrides``, as ``launcher.py`` would hand it to ``train``.

    Registers Hydra's runtime config so ``${hydra:...}`` interpolations (model name, overrides)
    resolve, then drops the ``hydra`` node, which the launcher's task never sees either.
    Set ``paths.run_dir``: outside a Hydra run there is no run directory to default to.
    """
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
