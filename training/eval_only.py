"""Eval-only runs (``eval_checkpoint=PATH``): rebuild the model from the checkpoint's own config and
score it with the sampler and evaluator it was trained with, or the ones the command line picks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from training import compat, config_tree
from training.callbacks.evaluation import Scoring, run_label
from training.checkpoint import load_checkpoint
from training.errors import UserError
from training.experiment_log import Entry, write
from training.inference import load_data, model_from_state
from training.outputs import new_entry, require_run_name, write_json
from training.precision import Precision, resolve_device
from training.run import build
from training.tracking import make_tracker


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Eval-only run: rebuild the model from the checkpoint's own config and score its EMA weights.

    Creates no training run in trackio: metrics go to the run directory's metrics.json, the
    experiment log and, with trackio enabled, a trackio run ``eval/<run_name>`` at the checkpoint's step.
    """
    run_name = require_run_name(cfg)
    started = datetime.now()
    path = Path(cfg.eval_checkpoint)
    device = resolve_device(cfg.device)
    precision: Precision = build(cfg, "precision")
    precision.check(device)
    precision.apply()
    state = load_checkpoint(path, "eval_checkpoint", trusted=list(cfg.trusted_targets))
    saved = state["config"]
    from_checkpoint = eval_config(cfg, state)
    eval_node = _against_checkpoint(cfg, saved, "eval") if from_checkpoint is None else from_checkpoint
    solver_node = sampler_config(cfg, state, path)
    if solver_node is not None and not _overridden_choices(cfg).get("solver") and not compat.uses_sampler(eval_node):
        solver_node = None  # written before pipeline models dropped the solver: the pipeline samples it
    names = {**{g: str(v) for g, v in (saved.get("choices") or {}).items()}, **_overridden_choices(cfg)}
    run_cfg = {**saved, "solver": solver_node, "eval": OmegaConf.to_container(eval_node, resolve=True)}
    compat.check(compat.Spec.from_config(run_cfg, _named(names, run_cfg)))
    model = model_from_state(state, path, cfg.eval_use_ema, device)
    solver = build(OmegaConf.create({"solver": solver_node}), "solver") if solver_node else None
    evaluator = build(OmegaConf.create({"eval": eval_node}), "eval")
    scoring = Scoring(evaluator, solver, load_data(state, path).eval_inputs(), device,
                      partial(precision.autocast_context, device), run_label(run_name, names))  # fmt: skip
    scoring.prepare()
    run_dir = Path(cfg.paths.run_dir)
    source = f"{path.resolve()}@step{state['step']}{'' if cfg.eval_use_ema else ':raw'}"
    entry = new_entry(cfg, run_name, device, started)
    entry.evaluates, entry.step = path, int(state["step"])
    metrics = logged_scoring(entry, lambda: scoring(model, entry.step, run_dir, source))
    metrics["checkpoint_step"] = float(state["step"])
    write_json(run_dir / "metrics.json", {**metrics, **scoring.settings(), "checkpoint": str(path)})
    if cfg.trackio.enabled:
        tracker = make_tracker(
            True,
            cfg.trackio.project,
            f"eval/{run_name}",
            {"checkpoint": str(path), **scoring.settings()},
            resume=False,
            overwrite=bool(cfg.overwrite),
        )
        tracker.log(metrics, step=int(state["step"]))
        tracker.finish()
    entry.close("completed", metrics, entry.step)
    return metrics, {"model": model, "solver": solver, "run_dir": run_dir}


def logged_scoring(entry: Entry, score: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Score with the run's experiment log entry open: written first, closed as failed or interrupted
    if scoring does not finish (the caller closes it when the run completes)."""
    write(entry)
    try:
        return score()
    except KeyboardInterrupt:
        entry.close("interrupted (Ctrl-C)", {}, entry.step)
        raise
    except Exception as e:
        entry.close(f"failed: {type(e).__name__}: {e}", {}, entry.step)
        raise


def _against_checkpoint(cfg: DictConfig, saved: dict[str, Any], group: str) -> DictConfig:
    """The command line's ``group`` node resolved against the checkpoint's config (its data set, its
    model) and this run's paths, not against the launcher's defaults."""
    stored = {k: v for k, v in saved.items() if k not in ("overrides", "run_name")}  # this run's name, not the file's
    node = OmegaConf.create({**stored, "run_name": str(cfg.run_name),
                             "paths": OmegaConf.to_container(cfg.paths, resolve=True)})  # fmt: skip
    node[group] = OmegaConf.to_container(cfg[group], resolve=False)
    try:
        resolved = OmegaConf.to_container(node[group], resolve=True)
    except InterpolationResolutionError as e:
        raise UserError(
            f"{group}={compat.choices_of(cfg)[group]} does not fit the checkpoint's config "
            f"({str(e).splitlines()[0]}); pick another {group} or leave it to the checkpoint"
        ) from e
    return OmegaConf.create(resolved)  # type: ignore[arg-type, return-value]


def _overridden_choices(cfg: DictConfig) -> dict[str, str]:
    """The groups the command line chose (``solver=heun``), which replace the checkpoint's."""
    overrides = [str(o) for o in cfg.get("overrides") or []]
    chosen = {o.split("=")[0].lstrip("+~") for o in overrides if "=" in o}
    if "experiment" in chosen:  # an experiment chooses groups too
        chosen |= set(config_tree.GROUPS)
    return {g: str(v) for g, v in compat.choices_of(cfg).items() if g in chosen}


def _named(names: dict[str, str], run_cfg: dict[str, Any]) -> dict[str, str]:
    """Option names for messages; a checkpoint older than ``choices`` is named by its classes."""
    return {
        g: names.get(g) or (str(run_cfg[g]["_target_"]).rsplit(".", 1)[-1] if run_cfg.get(g) else "null")
        for g in config_tree.GROUPS
    }


def sampler_config(cfg: DictConfig, state: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The sampler of an eval-only run: the checkpoint's own (what it was trained and evaluated with),
    with the command line's ``solver.*=...`` on top, unless it picks one (``solver=...`` or ``experiment=...``).

    The checkpoint's node is data, not code: its ``_target_`` must be one a local solver config names."""
    overrides = [str(o).lstrip("+~") for o in cfg.get("overrides") or []]
    if any(o.split("=")[0] in ("solver", "experiment") for o in overrides):
        return OmegaConf.to_container(cfg.solver, resolve=True) if cfg.get("solver") else None  # type: ignore[return-value]
    saved = state.get("sampling", {}).get("solver", state["config"].get("solver"))
    if saved is None:
        return None
    allowed = {str(n.get("_target_")) for n in config_tree.option_nodes("solver").values()}
    target = saved.get("_target_") if isinstance(saved, dict) else saved
    if target not in allowed:
        raise UserError(f"checkpoint {path} names an unknown sampler ({target!r}); pass solver=<option> to choose one")
    node = OmegaConf.create(saved)
    for o in OverridesParser.create().parse_overrides([str(o) for o in cfg.get("overrides") or []]):
        if o.key_or_group.startswith("solver."):
            OmegaConf.update(node, o.key_or_group.removeprefix("solver."), o.value(), merge=True)
    return OmegaConf.to_container(node)  # type: ignore[return-value]


def eval_config(cfg: DictConfig, state: dict[str, Any]) -> DictConfig | None:
    """The evaluator config of an eval-only run: the checkpoint's own, so an image model is scored
    as it was during training, with the command line's ``eval.*`` overrides on top. Choosing
    ``eval=...`` or ``experiment=...`` on the command line uses the composed config (None) instead."""
    overrides = [str(o) for o in cfg.get("overrides") or []]
    if any(o.split("=")[0].lstrip("+~") in ("eval", "experiment") for o in overrides) or "eval" not in state["config"]:
        return None
    node = OmegaConf.create(state["config"]["eval"])
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.key_or_group.startswith("eval."):
            continue
        key = o.key_or_group.removeprefix("eval.")
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            parent_node = OmegaConf.select(node, parent) if parent else node
            if parent_node is not None and leaf in parent_node:
                del parent_node[leaf]
        else:
            OmegaConf.update(node, key, o.value(), merge=True)
    return node
