"""The config tree as data: every option's node as its YAML defines it, and the class it builds.

Nothing is instantiated: the classes are imported to read the kinds they declare (training/compat.py).
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("model", "loss", "solver", "dataloaders", "eval")

# ``hydra.run.dir`` ends in the start time and the process id: two runs started in the same second get two folders
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)


def target_class(node: Any) -> Any:
    """The class a config node's ``_target_`` builds (a factory function: its return annotation)."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        return None
    return _class_of(str(node["_target_"]))


@functools.cache
def _class_of(target: str) -> Any:
    obj = get_object(target)
    return typing.get_type_hints(obj).get("return", obj) if inspect.isfunction(obj) else obj


def declared(obj: Any, name: str, default: Any = ()) -> Any:
    value = getattr(obj, name, default)
    return default if isinstance(value, property) else value


def _yaml_target(group_dir: Path, option: str) -> dict[str, Any]:
    """An option's node from its file, following ``defaults`` to a same-group parent (fm_ot -> fm) and
    to its own subgroups (a data set's ``tokenizer: glide``)."""
    node = yaml.safe_load((group_dir / f"{option}.yaml").read_text()) or {}
    for entry in node.pop("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_" and (group_dir / f"{entry}.yaml").is_file():
            node = {**_yaml_target(group_dir, entry), **node}
        elif isinstance(entry, dict):
            for key, choice in entry.items():
                if (group_dir / key / f"{choice}.yaml").is_file():
                    node = {key: _yaml_target(group_dir / key, str(choice)), **node}
    return node


@functools.cache
def option_nodes(group: str, config_dir: Path = CONFIG_DIR) -> dict[str, dict[str, Any]]:
    """option -> its node as the files define it, for every YAML of a group (``dataloaders/tokenizer`` too)."""
    return {p.stem: _yaml_target(p.parent, p.stem) for p in sorted((config_dir / group).glob("*.yaml"))}


@functools.cache
def declared_options(config_dir: Path = CONFIG_DIR) -> dict[str, dict[str, Any]]:
    """group -> {option: its node's class} for every YAML of the checked groups."""
    return {group: {o: target_class(n) for o, n in option_nodes(group, config_dir).items()} for group in GROUPS}
