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
        targets.update(str(t) for _, t in _targets(yaml.safe_load(path.read_text())))
    return frozenset(targets)


@functools.cache
def allowed_places(config_dir: Path = CONFIG_DIR) -> dict[str, frozenset[str]]:
    """target -> the keys of the nodes a group's files build it at (``dataloaders/webdataset.yaml``'s
    node is keyed ``dataloaders``, ``dataloaders/tokenizer/glide.yaml``'s ``tokenizer``, an experiment's
    ``model:`` node ``model``): a data set's class cannot be planted inside a model node. Targets the
    files use only inside another node (a coupling, a sampler function) are not listed."""
    places: dict[str, set[str]] = {}
    for path in config_dir.rglob("*.yaml"):
        own = path.parent.name
        for where, target in _targets(yaml.safe_load(path.read_text())):
            if where == "_target_" or "." not in where:
                places.setdefault(str(target), set()).add(own if where == "_target_" else where)
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


def _strings(node: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


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
    for where, value in _strings(config, "config"):
        if where != "config.overrides" and not where.startswith("config.overrides["):
            if "${" in value:
                return f"its {where} holds an interpolation ({value!r}); a saved config holds resolved values"
            if value.lstrip().startswith("pipe:"):
                return f"its {where} is a shell command ({value!r}); data read from a file may not run commands"
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
            f"{what} {path} is unsafe and was not loaded: {reason}; only what configs/ builds is rebuilt from a "
            "file (an eval-only run may allow a class of your own: trusted_targets=[pkg.Class])"
        )


def build_from_file(node: dict[str, Any]) -> Any:
    """Instantiate a node of a stored config: the one way loaders build from a file, and only from a
    state ``load_checkpoint`` returned, which checked every node of it with ``check_file_config``."""
    return instantiate(OmegaConf.create(node))
