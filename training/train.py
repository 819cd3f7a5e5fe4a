"""``train(cfg)`` and ``evaluate(cfg)``: turn the config into objects once, run, write outputs.

Below this module nothing reads a DictConfig.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import statistics
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from dataloaders.base import DataError
from evaluation.context import EvalContext
from evaluation.errors import EvaluationError
from training import compat, config_tree, distributed
from training.callbacks import Callback
from training.checkpoint import config_differences, load_checkpoint, remove_stale_temps
from training.checkpointing import CheckpointWriter
from training.errors import NonFiniteLossError, RunInterrupted, UserError
from training.experiment_log import append_entry
from training.inference import load_data, model_from_state
from training.optim import optimizer_groups
from training.precision import Precision, resolve_device
from training.run_lock import LOCK_FILE, RunLock
from training.seeding import rng_state, seed_everything, set_rng_state
from training.settings import check_run_settings
from training.stopping import RunControl
from training.tracking import Tracker, make_tracker
from training.trainer import Trainer

log = logging.getLogger(__name__)

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESUME_SECTIONS = ("model", "loss")


def require_run_name(cfg: DictConfig) -> str:
    name = cfg.get("run_name") if not OmegaConf.is_missing(cfg, "run_name") else None
    if not name:
        raise UserError(
            "run_name is required: add run_name=<name> (it names the checkpoint folder, trackio run and log entry)"
        )
    if problem := run_name_problem(str(name)):
        raise UserError(problem)
    return str(name)


def run_name_problem(name: str) -> str | None:
    if not RUN_NAME.match(name) or name in (".", ".."):
        return f"run_name={name!r} may hold only letters, digits, '_', '.' and '-' (it becomes a folder name)"
    return None


def build(cfg: DictConfig, group: str) -> Any:
    """Instantiate ``cfg[group]``; a value its class rejects becomes a one-line ``UserError``."""
    try:
        return instantiate(cfg[group])
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise UserError(
            f"{group} config is invalid: {str(cause).splitlines()[0]}; check the {group}.* overrides"
        ) from e


def run_eval(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call an evaluator (or its ``prepare``); bad evaluation input becomes a one-line ``UserError``."""
    try:
        return fn(*args, **kwargs)
    except EvaluationError as e:
        raise UserError(str(e)) from e


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _finish(
    ctx: distributed.Dist,
    cfg: DictConfig,
    run_name: str,
    status: str,
    metrics: dict[str, float],
    checkpoint: Path | None,
    started: datetime,
    t0: float,
) -> None:
    if not ctx.is_main:  # one entry per run, however many processes
        return
    append_entry(
        Path(cfg.paths.experiment_log),
        run_name=run_name,
        status=status,
        overrides=list(cfg.get("overrides") or [f"run_name={run_name}"]),
        metrics=metrics,
        checkpoint=checkpoint,
        duration_s=time.perf_counter() - t0,
        started=started,
    )


def _check_resume(state: dict[str, Any], resolved: dict[str, Any], path: Path) -> None:
    diffs = config_differences(state["config"], resolved, RESUME_SECTIONS)
    if diffs:
        raise UserError(
            f"resume refused: {path} was trained with a different model/loss ({'; '.join(diffs)}); "
            "use the original settings or a new run_name"
        )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train one run; returns its final metrics and the objects built (for tests and scripts).

    Under torchrun every process calls this: it joins the process group, trains its shard of each
    global batch, and leaves the group at the end. Rank 0 alone logs to trackio, evaluates, writes
    checkpoints, metrics.json and the EXPERIMENT_LOG entry; every rank returns rank 0's metrics.
    """
    if cfg.get("eval_checkpoint"):
        return evaluate(cfg)
    run_name = require_run_name(cfg)
    check_run_settings(cfg)
    ctx = distributed.setup(resolve_device(cfg.device))
    lock = RunLock(Path(cfg.paths.ckpt_dir), run_name)
    try:
        refused = None
        if ctx.is_main:  # one writer per run: rank 0 writes every file of it
            try:
                lock.acquire()
            except UserError as e:
                refused = str(e)
        if refused := distributed.broadcast_object(refused):  # every rank stops before touching the folder
            raise UserError(refused)
        return _train(cfg, run_name, ctx)
    finally:
        lock.release()  # a refused run leaves no checkpoint folder behind
        distributed.teardown(ctx)


def _train(cfg: DictConfig, run_name: str, ctx: distributed.Dist) -> tuple[dict[str, float], dict[str, Any]]:
    started, t0 = datetime.now(), time.perf_counter()
    device = ctx.device
    precision: Precision = build(cfg, "precision")
    precision.check(device)
    precision.apply()
    seed_everything(cfg.seed, cfg.deterministic)

    compat.check(compat.Spec.from_config(cfg, compat.choices_of(cfg)))
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    last_path = ckpt_dir / "last.pt"
    try:
        resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except InterpolationResolutionError as e:
        raise UserError(
            f"the config does not fit together ({str(e).splitlines()[0]}); "
            "an image model needs image data (dataloaders=digits|cifar10|folder|celeba|imagenet|imagenet_latents)"
        ) from e
    state = None
    if cfg.resume:
        if not last_path.exists():
            raise UserError(
                f"resume=true but no checkpoint at {last_path}; "
                "check run_name and model, or drop resume=true to start the run"
            )
        state = load_checkpoint(last_path, "resume checkpoint", builds=False)
        _check_resume(state, resolved, last_path)
    elif last_path.exists():
        if not cfg.overwrite:
            raise UserError(
                f"run '{run_name}' already has a checkpoint at {last_path}; pass resume=true to continue it, "
                "overwrite=true to start over, or choose another run_name"
            )

    data = build(cfg, "dataloaders")
    model = build(cfg, "model").to(device)
    loss_fn = build(cfg, "loss")
    try:
        loss_fn.check(device)
    except ValueError as e:
        raise UserError(str(e)) from e
    if cfg.trainer.get("strategy") == "fsdp" and not loss_fn.fixed_model_calls:
        raise UserError(
            "trainer.strategy=fsdp needs a loss that calls the model equally often on every rank; "
            "for loss=meanflow set loss.full_batch_jvp=true (or use trainer.strategy=ddp)"
        )
    solver = build(cfg, "solver") if cfg.get("solver") else None
    evaluator = build(cfg, "eval")
    if ctx.is_main:  # rank 0 evaluates
        run_eval(evaluator.prepare, device)  # a missing FID reference or Inception fails now, not after training
    distributed.per_rank_batch(data.batch_size, ctx.world_size)
    try:
        loader = data.train_loader(device, cfg.seed)
    except ValueError as e:
        raise UserError(f"dataloaders config is invalid: {e}") from e
    steps_per_epoch = len(loader) // cfg.trainer.grad_accum
    callbacks: list[Callback] = [build(cfg, "adapter")] if cfg.get("adapter") else []
    try:
        groups = optimizer_groups(model, OmegaConf.to_container(cfg.param_groups), callbacks)  # type: ignore[arg-type]
        optimizer = build(cfg, "optimizer")(params=groups)
    except ValueError as e:
        raise UserError(str(e)) from e
    lr_schedule = build(cfg, "lr_schedule")(optimizer=optimizer, total_steps=cfg.epochs * steps_per_epoch)
    if last_path.exists() and not cfg.resume and ctx.is_main:  # overwrite=true, and everything above was built
        for stale in [*ckpt_dir.iterdir()]:  # start the run over (the lock file stays: it is held)
            if stale.name != LOCK_FILE:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if ctx.is_main:
        remove_stale_temps(ckpt_dir)
    distributed.barrier()
    tracker: Tracker = make_tracker(
        cfg.trackio.enabled and ctx.is_main,
        cfg.trackio.project,
        run_name,
        resolved,
        resume=bool(cfg.resume),
        system_metrics=cfg.trackio.system_metrics,
        overwrite=bool(cfg.overwrite),
    )
    trainer: Trainer = build(cfg, "trainer")(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        precision=precision,
        device=device,
        tracker=tracker,
        callbacks=callbacks,
    )
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except ValueError as e:
            raise UserError(f"resume refused: {e}") from e
        set_rng_state(state["rng"])
        log.info("resumed %s at step %d (epoch %d)", last_path, trainer.step, trainer.epoch)
    distributed.seed_rank(cfg.seed, ctx.rank, trainer.step)  # ranks > 0 draw their own noise and times
    try:
        for callback in callbacks:
            callback.on_train_start(trainer, data)
    except ValueError as e:
        raise UserError(str(e)) from e

    run_dir = Path(cfg.paths.run_dir)
    held_out = data.eval_inputs()
    autocast = partial(precision.autocast_context, device)
    sampling = sampling_record(resolved, loss_fn)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s, %.3fM parameters; %d steps/epoch on %s, precision %s",
        type(model).__name__,
        n_params / 1e6,
        steps_per_epoch,
        device,
        precision.name,
    )

    writer = CheckpointWriter(lambda: {"rng": rng_state(), "config": resolved, "sampling": sampling},
                              ctx.is_main, list(callbacks))  # fmt: skip
    latest: dict[str, float] = {}
    control = RunControl(lambda: writer.write(trainer, last_path, latest), float(cfg.checkpoint.every_minutes))
    writer.on_write = control.saved
    trainer.callbacks += [writer, control]

    def checkpoint(path: Path, metrics: dict[str, float], final: bool = False) -> None:
        writer.write(trainer, path, metrics, final)

    if cfg.nan_policy == "rollback" and state is None:
        checkpoint(last_path, {})  # step 0: what the first NaN rolls back to, once step 1's loss is finite

    def periodic_eval() -> None:
        eval_model = trainer.eval_module(cfg.eval_use_ema)  # rank 0's; None on the others
        if eval_model is not None:
            latest.update(
                run_eval(evaluator, eval_model, solver, held_out, EvalContext(device, autocast, step=trainer.step))
            )
            tracker.log(latest, step=trainer.step)
        distributed.barrier()

    def on_step_end(step: int) -> None:
        if evaluator.every_steps and step % evaluator.every_steps == 0:
            periodic_eval()
            log.info("step %d: %s", step, _brief(latest))
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            checkpoint(last_path, latest)

    def on_epoch_end(epoch: int) -> None:
        if epoch < cfg.epochs and evaluator.every_epochs and epoch % evaluator.every_epochs == 0:
            periodic_eval()
            log.info("epoch %d: %s", epoch, _brief(latest))
        if epoch % cfg.checkpoint.every_epochs == 0:
            checkpoint(last_path, latest)
        if cfg.checkpoint.archive_every_epochs and epoch % cfg.checkpoint.archive_every_epochs == 0:
            checkpoint(ckpt_dir / "archive" / f"epoch_{epoch:04d}.pt", latest)

    try:
        hook_steps = [n for n in (evaluator.every_steps, cfg.checkpoint.every_steps) if n]
        with control:
            while True:
                try:
                    trainer.fit(loader, cfg.epochs, cfg.max_steps, on_epoch_end, on_step_end, math.gcd(*hook_steps))
                    break
                except DataError as e:
                    raise UserError(str(e)) from e
                except NonFiniteLossError as e:
                    writer.discard()
                    if cfg.nan_policy != "rollback" or not last_path.exists():
                        raise
                    good = load_checkpoint(last_path, "last good checkpoint", builds=False)
                    trainer.roll_back(good, e)
                    set_rng_state(good["rng"])
                    distributed.seed_rank(cfg.seed, ctx.rank, trainer.step)  # rank 0's stream was restored
            writer.settle(trainer, last_path, latest)  # the trained weights are safe before the final evaluation
        if control.received is not None:
            raise RunInterrupted(
                f"interrupted by {control.received} at step {trainer.step}: {last_path} holds it; resume with: "
                f"python launcher.py run_name={run_name} resume=true",
                control.received,
            )
        eval_model = trainer.eval_module(cfg.eval_use_ema)
        metrics: dict[str, float] = {}
        if eval_model is not None:
            source = f"{last_path.resolve()}@step{trainer.step}{'' if cfg.eval_use_ema else ':raw'}"
            metrics = run_eval(
                evaluator, eval_model, solver, held_out, EvalContext(device, autocast, run_dir, trainer.step, source)
            )
        metrics = distributed.broadcast_object(metrics)  # the others wait here for rank 0's evaluation
        metrics["train/final_loss"] = trainer.losses[-1] if trainer.losses else float("nan")
        metrics["train/steps"] = float(trainer.step)
        metrics["train/ms_per_step"] = 1000 * trainer.train_seconds / max(1, trainer.train_steps)
        if len(trainer.step_rates) > 1:  # the first window holds warm-up (and torch.compile) time
            metrics["train/ms_per_step_steady"] = 1000 / statistics.median(trainer.step_rates[1:])
        metrics["params"] = float(n_params)
        if device.type == "cuda":
            metrics["gpu/max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        checkpoint(last_path, metrics, final=True)
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.step)
    except NonFiniteLossError as e:
        writer.discard()
        kept = last_path if last_path.exists() else None
        _finish(ctx, cfg, run_name, f"failed: {e}", latest, kept, started, t0)
        tracker.finish()
        raise NonFiniteLossError(f"{e} (last good checkpoint: {kept or 'none yet'})") from None
    except RunInterrupted as e:
        _finish(ctx, cfg, run_name, f"interrupted at step {trainer.step} ({control.received})", latest, last_path,
                started, t0)  # fmt: skip
        tracker.finish()
        raise e from None
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step
        writer.discard()
        kept = last_path if last_path.exists() else None
        _finish(ctx, cfg, run_name, f"interrupted at step {trainer.step} (stopped at once)", latest, kept, started, t0)
        tracker.finish()
        how = "a second Ctrl-C" if control.received else "Ctrl-C outside a training step"
        raise RunInterrupted(
            f"stopped at once at step {trainer.step} by {how}; "
            + (
                f"{kept} holds the last checkpoint written; resume with: python launcher.py run_name={run_name} "
                "resume=true"
                if kept
                else "no checkpoint was written yet"
            ),
            "SIGINT",
        ) from None
    except BaseException as e:
        _finish(
            ctx,
            cfg,
            run_name,
            f"failed: {type(e).__name__}: {e}",
            latest,
            last_path if last_path.exists() else None,
            started,
            t0,
        )
        tracker.finish()
        raise
    tracker.finish()
    if ctx.is_main:
        _write_json(run_dir / "metrics.json", {**metrics, **evaluator.settings(solver)})
    _finish(ctx, cfg, run_name, "completed", metrics, last_path, started, t0)
    objects = {
        "model": model,
        "ema": trainer.ema,
        "trainer": trainer,
        "data": data,
        "solver": solver,
        "run_dir": run_dir,
        "checkpoint": last_path,
    }
    return metrics, objects


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Eval-only run: rebuild the model from the checkpoint's own config and score its EMA weights.

    Creates no training run in trackio: metrics go to the run directory's metrics.json, the
    experiment log and, with trackio enabled, a trackio run ``eval/<run_name>`` at the checkpoint's step.
    """
    run_name = require_run_name(cfg)
    started, t0 = datetime.now(), time.perf_counter()
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
    data = load_data(state, path)
    solver = build(OmegaConf.create({"solver": solver_node}), "solver") if solver_node else None
    evaluator = build(OmegaConf.create({"eval": eval_node}), "eval")
    run_eval(evaluator.prepare, device)
    run_dir = Path(cfg.paths.run_dir)
    autocast = partial(precision.autocast_context, device)
    source = f"{path.resolve()}@step{state['step']}{'' if cfg.eval_use_ema else ':raw'}"
    metrics = run_eval(
        evaluator, model, solver, data.eval_inputs(), EvalContext(device, autocast, run_dir, source=source)
    )
    metrics["checkpoint_step"] = float(state["step"])
    _write_json(run_dir / "metrics.json", {**metrics, **evaluator.settings(solver), "checkpoint": str(path)})
    if cfg.trackio.enabled:
        tracker = make_tracker(
            True,
            cfg.trackio.project,
            f"eval/{run_name}",
            {"checkpoint": str(path), **evaluator.settings(solver)},
            resume=False,
            overwrite=bool(cfg.overwrite),
        )
        tracker.log(metrics, step=int(state["step"]))
        tracker.finish()
    _finish(distributed.Dist(0, 1, device), cfg, run_name, f"eval of {path}", metrics, path, started, t0)
    return metrics, {"model": model, "solver": solver, "run_dir": run_dir}


def sampling_record(resolved: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
    """How this run's checkpoints sample: the solver node (name and settings), what the loss trains,
    and whether the model learned the null condition that guidance needs."""
    return {
        "solver": resolved.get("solver"),
        "trains": type(loss_fn).trains,
        "guidable": loss_fn.cond_dropout > 0,
    }


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


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if "energy_distance" in k)


def metrics_table(metrics: dict[str, float]) -> str:
    """Scores per NFE budget as a small text table: energy distance, and FID/KID where computed."""
    columns = [("nfe_used", "NFE used", "{:.0f}"), ("energy_distance", "energy distance", "{:.5f}")]
    columns += [(name, name.upper(), "{:.4f}") for name in ("fid", "kid") if any(f"eval/{name}@" in k for k in metrics)]
    keys = list(dict.fromkeys(k.split("@")[1] for k in metrics if k.startswith("eval/") and "@" in k))
    lines = [f"{'budget':>10}" + "".join(f" {label:>16}" for _, label, _ in columns)]
    for key in keys:
        cells = [
            fmt.format(metrics[f"eval/{name}@{key}"]) if f"eval/{name}@{key}" in metrics else "-"
            for name, _, fmt in columns
        ]
        lines.append(f"{key:>10}" + "".join(f" {c:>16}" for c in cells))
    return "\n".join(lines)
