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

LEAF_TYPES = (str, int, float, bool, type(None))


@functools.cache
def _config_targets(config_dir: Path = CONFIG_DIR) -> tuple[tuple[str, str, str], ...]:
    """(the file's folder, where in the file, target) for every ``_target_`` of every YAML under ``config_dir``."""
    return tuple(
        (path.parent.name, where, str(target))
        for path in sorted(config_dir.rglob("*.yaml"))
        for where, target in _targets(yaml.safe_load(path.read_text()))
    )


@functools.cache
def allowed_targets(config_dir: Path = CONFIG_DIR) -> frozenset[str]:
    """Every ``_target_`` named by a YAML file under ``config_dir``, at any depth."""
    return frozenset(target for _, _, target in _config_targets(config_dir))


@functools.cache
def allowed_places(config_dir: Path = CONFIG_DIR) -> dict[str, frozenset[str]]:
    """target -> the keys of the nodes a group's files build it at (``dataloaders/webdataset.yaml``'s
    node is keyed ``dataloaders``, ``dataloaders/tokenizer/glide.yaml``'s ``tokenizer``, an experiment's
    ``model:`` node ``model``): a data set's class cannot be planted inside a model node. Targets the
    files use only inside another node (a coupling, a sampler function) are not listed."""
    places: dict[str, set[str]] = {}
    for folder, where, target in _config_targets(config_dir):
        if where == "_target_" or "." not in where:
            places.setdefault(target, set()).add(folder if where == "_target_" else where)
    return {t: frozenset(keys) for t, keys in places.items()}


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


def _leaves(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(where, value) for every value below ``node`` that is not a dict or a list."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{where}[{i}]")
    else:
        yield where, node


def unsafe_reason(
    config: dict[str, Any], sampling: dict[str, Any] | None = None, trusted: Sequence[str] = ()
) -> str | None:
    """Why building from this stored config could run code this checkout does not configure; None if safe.
    ``trusted``: further targets the user allows by name (``trusted_targets=[mypkg.MyExtractor]``)."""
    allowed, places = allowed_targets(), allowed_places()
    nodes = {"config": config, "sampling": {"solver": (sampling or {}).get("solver")}}
    for root, node in nodes.items():
        for where, target in _targets(node):
            key = where.rsplit(".", 1)[-1].split("[")[0]
            if isinstance(target, str) and target in trusted:
                continue
            if not isinstance(target, str) or target not in allowed:
                return f"its {root}.{where} names _target_ {target!r}, which no config under configs/ builds"
            if target in places and key not in places[target]:
                at = "/".join(sorted(places[target]))
                return f"its {root}.{where} names _target_ {target!r}, which configs/ builds only as a {at} node"
    for root, node in nodes.items():
        for where, value in _leaves(node, root):
            if where == "config.overrides" or where.startswith("config.overrides["):
                continue  # the command line as typed: kept for the record, never resolved or built
            if not isinstance(value, LEAF_TYPES):
                return f"its {where} is not a plain value (a {type(value).__name__}); a saved config holds plain values"
            if isinstance(value, str) and "${" in value:
                return f"its {where} holds an interpolation ({value!r}); a saved config holds resolved values"
            if isinstance(value, str) and value.lstrip().startswith("pipe:"):
                return f"its {where} is a shell command ({value!r}); data read from a file may not run commands"
    return None


def check_file_config(
    config: dict[str, Any], sampling: dict[str, Any] | None, path: Path, what: str, trusted: Sequence[str] = ()
) -> None:
    if reason := unsafe_reason(config, sampling, trusted):
        raise UserError(
            f"{what} {path} is unsafe and was not loaded: {reason}; only what configs/ builds is rebuilt from a "
            "file (an eval-only run may allow a class of your own: trusted_targets=[pkg.Class])"
        )


def build_from_file(node: dict[str, Any]) -> Any:
    """Instantiate a node of a stored config: the one way loaders build from a file, and only from a
    state ``load_checkpoint`` returned, which checked every node of it with ``check_file_config``."""
    return instantiate(OmegaConf.create(node))
