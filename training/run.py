"""A training run assembled from its config: every object built once, here, and handed to the trainer
with its hook list. Below this module nothing reads a DictConfig.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from training import compat, distributed
from training.callbacks import Callback
from training.callbacks.best_checkpoint import BestCheckpoint
from training.callbacks.checkpointing import CheckpointWriter
from training.callbacks.early_stopping import EarlyStopping
from training.callbacks.evaluation import PeriodicEval, Scoring, run_label
from training.callbacks.experiment_log import ExperimentLog
from training.callbacks.loss_plot import LossPlot
from training.callbacks.stopping import RunControl
from training.checkpoint import config_differences, load_checkpoint, remove_stale_temps
from training.errors import UserError, user_errors
from training.optim import optimizer_groups
from training.outputs import new_entry
from training.precision import Precision
from training.run_lock import LOCK_FILE
from training.seeding import rng_state, seed_everything, set_rng_state
from training.tracking import Tracker, make_tracker
from training.trainer import Trainer

log = logging.getLogger(__name__)

RESUME_SECTIONS = ("model", "loss")


def build(cfg: DictConfig, group: str) -> Any:
    """Instantiate ``cfg[group]``; a value its class rejects becomes a one-line ``UserError``."""
    try:
        return instantiate(cfg[group])
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise UserError(
            f"{group} config is invalid: {str(cause).splitlines()[0]}; check the {group}.* overrides"
        ) from e


@dataclass
class Run:
    """What one training run is made of; ``train`` drives it, the tests and scripts read it."""

    cfg: DictConfig
    name: str
    ctx: distributed.Dist
    data: Any
    loader: Any
    trainer: Trainer
    scoring: Scoring
    tracker: Tracker
    writer: CheckpointWriter
    control: RunControl
    resolved: dict[str, Any]

    @property
    def last_path(self) -> Path:
        return self.writer.last


def build_run(cfg: DictConfig, run_name: str, ctx: distributed.Dist) -> Run:
    """Check the composition, build every object (a resumed run loads its state into them) and the hook
    list: the adapter's recipe first (its state's place in checkpoints), then evaluation, checkpoints,
    stop signals. An overwritten run is deleted only once data, model, loss and optimizer were built."""
    started = datetime.now()  # the experiment log's start time
    device = ctx.device
    precision: Precision = build(cfg, "precision")
    precision.check(device)
    precision.apply()
    seed_everything(cfg.seed, cfg.deterministic)
    compat.check(compat.Spec.from_config(cfg, compat.choices_of(cfg)))
    resolved = resolved_config(cfg)
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    state = resume_state(cfg, run_name, ckpt_dir / "last.pt", resolved)

    data, model, loss_fn = build(cfg, "dataloaders"), build(cfg, "model").to(device), build(cfg, "loss")
    with user_errors():
        loss_fn.check(device)
    if cfg.trainer.get("strategy") == "fsdp" and not loss_fn.fixed_model_calls:
        raise UserError(
            "trainer.strategy=fsdp needs a loss that calls the model equally often on every rank; "
            "for loss=meanflow set loss.full_batch_jvp=true (or use trainer.strategy=ddp)"
        )
    solver = build(cfg, "solver") if cfg.get("solver") else None
    autocast = partial(precision.autocast_context, device)
    scoring = Scoring(build(cfg, "eval"), solver, data.eval_inputs(), device, autocast,
                      run_label(run_name, cfg.choices))  # fmt: skip
    if ctx.is_main:  # rank 0 evaluates
        scoring.prepare()
    distributed.per_rank_batch(data.batch_size, ctx.world_size)
    with user_errors("dataloaders config is invalid: "):
        loader = data.train_loader(device, cfg.seed)
    adapter: list[Callback] = [build(cfg, "adapter_training")] if cfg.get("adapter_training") else []
    with user_errors():
        groups = optimizer_groups(model, OmegaConf.to_container(cfg.param_groups), adapter)  # type: ignore[arg-type]
        optimizer = build(cfg, "optimizer")(params=groups)
    steps_per_epoch = len(loader) // cfg.trainer.grad_accum
    lr_schedule = build(cfg, "lr_schedule")(optimizer=optimizer, total_steps=cfg.epochs * steps_per_epoch)

    start_folder(ckpt_dir, fresh=not cfg.resume, is_main=ctx.is_main)
    tracker = make_tracker(cfg.trackio.enabled and ctx.is_main, cfg.trackio.project, run_name, resolved,
                           resume=bool(cfg.resume), system_metrics=cfg.trackio.system_metrics,
                           overwrite=bool(cfg.overwrite))  # fmt: skip
    latest: dict[str, float] = {}  # the last evaluation's scores: logged, and kept in every checkpoint
    sampling = sampling_record(resolved, loss_fn)
    writer = CheckpointWriter(ckpt_dir, lambda: {"rng": rng_state(), "config": resolved, "sampling": sampling},
                              latest, ctx.is_main, every_steps=cfg.checkpoint.every_steps,
                              every_epochs=cfg.checkpoint.every_epochs,
                              archive_every_epochs=cfg.checkpoint.archive_every_epochs)  # fmt: skip
    control = RunControl(writer, float(cfg.checkpoint.every_minutes))
    periodic = PeriodicEval(scoring, tracker, latest, cfg.eval_use_ema)
    best = BestCheckpoint(writer, cfg.checkpoint.keep_best, cfg.checkpoint.best_mode)
    stopper = EarlyStopping(**cfg.early_stopping)  # both act on the evaluations' scores and the log points
    journal = ExperimentLog(new_entry(cfg, run_name, device, started, ctx.world_size), ckpt_dir, ctx.is_main)
    plot = LossPlot(Path(cfg.paths.run_dir) / "loss.png", scoring.label)  # redrawn at every checkpoint
    trainer: Trainer = build(cfg, "trainer")(
        model=model, loss_fn=loss_fn, optimizer=optimizer, lr_schedule=lr_schedule, precision=precision,
        device=device, tracker=tracker, callbacks=[*adapter, periodic, writer, control, best, stopper, plot, journal],
    )  # fmt: skip
    if state is not None:
        with user_errors("resume refused: "):
            trainer.load_state_dict(state)
        set_rng_state(state["rng"])
        log.info("resumed %s at step %d (epoch %d)", writer.last, trainer.step, trainer.epoch)
    distributed.seed_rank(cfg.seed, ctx.rank, trainer.step)  # ranks > 0 draw their own noise and times
    with user_errors():
        for callback in trainer.callbacks:
            callback.on_train_start(trainer, data)
    log.info("model: %s, %.3fM parameters; %d steps/epoch on %s, precision %s", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, steps_per_epoch, device, precision.name)  # fmt: skip
    if cfg.nan_policy == "rollback" and state is None:
        writer.write(trainer, writer.last)  # step 0: what the first NaN rolls back to, once step 1's loss is finite
    return Run(cfg, run_name, ctx, data, loader, trainer, scoring, tracker, writer, control, resolved)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except InterpolationResolutionError as e:
        raise UserError(
            f"the config does not fit together ({str(e).splitlines()[0]}); "
            "an image model needs image data (dataloaders=digits|cifar10|folder|celeba|imagenet|imagenet_latents)"
        ) from e


def resume_state(cfg: DictConfig, run_name: str, last_path: Path, resolved: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint a ``resume=true`` run continues from (None for a new run), refused when the
    model or loss differ; a new run over an existing one needs ``overwrite=true``."""
    if not cfg.resume:
        if last_path.exists() and not cfg.overwrite:
            raise UserError(
                f"run '{run_name}' already has a checkpoint at {last_path}; pass resume=true to continue it, "
                "overwrite=true to start over, or choose another run_name"
            )
        return None
    if not last_path.exists():
        raise UserError(
            f"resume=true but no checkpoint at {last_path}; "
            "check run_name and model, or drop resume=true to start the run"
        )
    state = load_checkpoint(last_path, "resume checkpoint", builds=False)
    if diffs := config_differences(state["config"], resolved, RESUME_SECTIONS):
        raise UserError(
            f"resume refused: {last_path} was trained with a different model/loss ({'; '.join(diffs)}); "
            "use the original settings or a new run_name"
        )
    return state


def start_folder(ckpt_dir: Path, fresh: bool, is_main: bool) -> None:
    """Empty the run's checkpoint folder of an earlier run (``overwrite=true``, only once everything was
    built) and of temp files a kill left; the lock file stays, it is held."""
    if is_main and fresh and (ckpt_dir / "last.pt").exists():
        for stale in [*ckpt_dir.iterdir()]:
            if stale.name != LOCK_FILE:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if is_main:
        remove_stale_temps(ckpt_dir)
    distributed.barrier()


def sampling_record(resolved: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
    """How this run's checkpoints sample: the solver node (name and settings), what the loss trains,
    and whether the model learned the null condition that guidance needs."""
    return {
        "solver": resolved.get("solver"),
        "trains": type(loss_fn).trains,
        "guidable": loss_fn.cond_dropout > 0,
    }
