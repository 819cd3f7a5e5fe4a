"""Every combination of the config tree's options, checked against the declared kinds, and the
README's table of what goes together (``python scripts/compat_table.py``)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from training.compat import Spec, problem
from training.config_tree import CONFIG_DIR, GROUPS, declared, declared_options, option_nodes


class DataVariant(NamedTuple):
    """A data option with the settings that change what it serves: its tokenizer, a CLIP cache, the
    low-resolution copies an upsampler needs."""

    name: str
    tokenizer: str | None = None
    clip: bool = False
    low_res: bool = False

    def label(self) -> str:
        extra = [f"{self.tokenizer} tokens"] * (self.tokenizer is not None) + ["CLIP cache"] * self.clip
        extra += ["low_res"] * self.low_res
        return self.name + (f" ({', '.join(extra)})" if extra else "")


def data_variants(config_dir: Path = CONFIG_DIR) -> list[DataVariant]:
    """Each captioned data set once per tokenizer, with and without a CLIP cache; others once."""
    tokenizers = sorted(option_nodes("dataloaders/tokenizer", config_dir))
    out = []
    for name, cls in declared_options(config_dir)["dataloaders"].items():
        if declared(cls, "kind", "") == "captioned":
            out += [DataVariant(name, t, c, low) for t in tokenizers for c in (False, True) for low in (False, True)]
        else:
            out.append(DataVariant(name))
    return out


def spec_for(names: Mapping[str, str], data: DataVariant | None = None, config_dir: Path = CONFIG_DIR) -> Spec:
    """The spec of a combination of options as the files define them (``solver: "null"`` for none),
    with the data variant's tokenizer and CLIP cache."""
    node: dict[str, Any] = {g: None if names[g] == "null" else option_nodes(g, config_dir)[names[g]] for g in GROUPS}
    if data is not None and (data.tokenizer is not None or data.clip or data.low_res):
        node["dataloaders"] = dict(node["dataloaders"], low_res_size=64 if data.low_res else None)
        if data.tokenizer is not None:
            node["dataloaders"]["tokenizer"] = option_nodes("dataloaders/tokenizer", config_dir)[data.tokenizer]
        if data.clip:
            node["dataloaders"]["clip_cache"] = {"_target_": "dataloaders.clip_cache.ClipCache"}
    return Spec.from_config(node, names)


Combination = tuple[dict[str, str], DataVariant, "str | None"]  # (options, data variant, problem or None)


@functools.cache
def combinations(config_dir: Path = CONFIG_DIR) -> list[Combination]:
    """Every combination of the config tree's model, loss, solver (and null), data (per variant) and
    eval options, with its problem (None: the combination is valid)."""
    options = declared_options(config_dir)
    out: list[Combination] = []
    for model, loss, solver, ev in itertools.product(
        options["model"], options["loss"], [*options["solver"], "null"], options["eval"]
    ):
        for data in data_variants(config_dir):
            names = {"model": model, "loss": loss, "solver": solver, "dataloaders": data.name, "eval": ev}
            out.append((names, data, problem(spec_for(names, data, config_dir), options)))
    return out


def compat_table(config_dir: Path = CONFIG_DIR) -> str:
    """A markdown table of what goes together, from the declared kinds: one row per set of models and
    data sets that take the same losses, solvers and evaluators (in some variant of the data: its
    tokenizer, CLIP cache or low-res copies)."""
    signatures: dict[tuple[str, str], set[tuple[str, str, str]]] = {}
    for names, data, reason in combinations(config_dir):
        if reason is None:
            fits = signatures.setdefault((names["model"], data.name), set())
            fits.add((names["loss"], names["solver"], names["eval"]))
    by_model: dict[str, dict[tuple[str, str], list[str]]] = {}
    for (model, data_name), fits in signatures.items():
        losses: dict[str, set[str]] = {}
        for loss, solver, _ in fits:
            losses.setdefault(loss, set()).add(solver)
        trains = "; ".join(
            f"{loss} → {', '.join(sorted(s)).replace('null', 'its own pipeline (~solver)')}"
            for loss, s in sorted(losses.items())
        )
        evals = ", ".join(sorted({e for _, _, e in fits}))
        by_model.setdefault(model, {}).setdefault((trains, evals), []).append(data_name)
    rows: dict[tuple[str, str, str], list[str]] = {}
    for model, groups in by_model.items():
        for (trains, evals), datas in groups.items():
            rows.setdefault((", ".join(sorted(datas)), trains, evals), []).append(model)
    lines = ["| model | dataloaders | loss → solver | eval |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {', '.join(models)} | {data} | {trains} | {evals} |" for (data, trains, evals), models in rows.items()
    ]
    return "\n".join(lines)
