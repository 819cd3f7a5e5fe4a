"""A config read from a file is data, never code.

A checkpoint carries the resolved config it was trained with, and eval-only runs and the scripts
rebuild its model, data and evaluator from it. ``hydra.utils.instantiate`` calls whatever a
``_target_`` names, so a crafted file could name ``pathlib.Path.write_text``. Here a file's config
may build only what a config file of this checkout builds: every ``_target_`` anywhere in it must be
one that some YAML under ``configs/`` names, and the nodes rebuilt from it hold no interpolations
(a resolved config has none; ``${oc.env:...}`` would read the environment).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from training.config_tree import CONFIG_DIR
from training.errors import UserError

BUILT_FROM_FILE = ("model", "dataloaders", "eval", "solver", "loss")  # the sections a loader may instantiate
LEAF_TYPES = (str, int, float, bool, type(None))


@functools.cache
def allowed_targets(config_dir: Path = CONFIG_DIR) -> frozenset[str]:
    """Every ``_target_`` named by a YAML file under ``config_dir``, at any depth."""
    targets: set[str] = set()
    for path in config_dir.rglob("*.yaml"):
        targets.update(t for _, t in _targets(yaml.safe_load(path.read_text())))
    return frozenset(targets)


def _targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield where or "_target_", value
            else:
                yield from _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def _interpolations(node: Any, where: str) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _interpolations(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _interpolations(value, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        yield where
    elif not isinstance(node, LEAF_TYPES):
        yield f"{where} (a {type(node).__name__})"


def unsafe_reason(
    config: dict[str, Any], sampling: dict[str, Any] | None = None, trusted: Sequence[str] = ()
) -> str | None:
    """Why building from this stored config could run code this checkout does not configure; None if safe.
    ``trusted``: further targets the user allows by name (``trusted_targets=[mypkg.MyExtractor]``)."""
    allowed = allowed_targets() | set(trusted)
    nodes = {"config": config, "sampling": sampling or {}}
    for root, node in nodes.items():
        for where, target in _targets(node):
            if not isinstance(target, str) or target not in allowed:
                return f"its {root}.{where} names _target_ {target!r}, which no config under configs/ builds"
    built: dict[str, Any] = {f"config.{s}": config.get(s) for s in BUILT_FROM_FILE}
    built["sampling.solver"] = (sampling or {}).get("solver")
    for where, value in built.items():
        for bad in _interpolations(value, where):
            return (
                f"its {bad} is not a plain value (an interpolation or an object); a saved config holds resolved values"
            )
    return None


def check_file_config(
    config: dict[str, Any], sampling: dict[str, Any] | None, path: Path, what: str, trusted: Sequence[str] = ()
) -> None:
    if reason := unsafe_reason(config, sampling, trusted):
        raise UserError(
            f"{what} {path} is unsafe and was not loaded: {reason}; "
            "only checkpoints written by this project's launcher are accepted"
        )


def build_from_file(node: dict[str, Any]) -> Any:
    """Instantiate a node of a stored config: the one way loaders build from a file, and only from a
    state ``load_checkpoint`` returned, which checked every node of it with ``check_file_config``."""
    return instantiate(OmegaConf.create(node))
