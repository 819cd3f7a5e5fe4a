"""``train(cfg)``: build the run once (training/run.py), drive the trainer to the end, write outputs.

Everything around the optimizer step is a callback on the trainer's hook list (training/callbacks/):
periodic evaluation, checkpoints, stop signals, an adapter's training recipe.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dataloaders.base import DataError
from training import distributed
from training.checkpoint import load_checkpoint
from training.errors import NonFiniteLossError, RunInterrupted, UserError, user_errors
from training.eval_only import evaluate
from training.outputs import require_run_name, write_json
from training.precision import resolve_device
from training.run import Run, build_run
from training.run_lock import RunLock
from training.seeding import set_rng_state
from training.settings import check_run_settings

log = logging.getLogger(__name__)


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
    run = build_run(cfg, run_name, ctx)
    trainer = run.trainer
    try:
        with run.control:
            fit(run)
            run.writer.settle(trainer)  # the trained weights are safe before the final evaluation
        if run.control.received is not None:
            raise RunInterrupted(
                f"interrupted by {run.control.received} at step {trainer.step}: {run.last_path} holds it; resume "
                f"with: python launcher.py run_name={run_name} resume=true",
                run.control.received,
            )
        metrics = final_metrics(run)
    except BaseException as e:
        if (error := failed(run, e)) is e:
            raise
        raise error from None
    run.tracker.finish()
    if ctx.is_main:
        write_json(Path(cfg.paths.run_dir) / "metrics.json", {**metrics, **run.scoring.settings()})
    ended(run, "completed" + (f" ({trainer.stop_reason})" if trainer.stop_reason else ""), metrics)  # early stopping
    objects = {"model": trainer.model, "ema": trainer.ema, "trainer": trainer, "data": run.data,
               "solver": run.scoring.sampler, "run_dir": Path(cfg.paths.run_dir),
               "checkpoint": run.last_path}  # fmt: skip
    return metrics, objects


def fit(run: Run) -> None:
    """Train to the end; under ``nan_policy=rollback`` a NaN reloads the last good checkpoint (at a
    lower learning rate) and training goes on from there."""
    cfg, trainer = run.cfg, run.trainer
    while True:
        try:
            with user_errors(kinds=(DataError,)):
                trainer.fit(run.loader, cfg.epochs, cfg.max_steps)
            return
        except NonFiniteLossError as e:
            run.writer.discard()
            if cfg.nan_policy != "rollback" or not run.last_path.exists():
                raise
            good = load_checkpoint(run.last_path, "last good checkpoint", builds=False)
            trainer.roll_back(good, e)
            set_rng_state(good["rng"])
            distributed.seed_rank(cfg.seed, run.ctx.rank, trainer.step)  # rank 0's stream was restored


def final_metrics(run: Run) -> dict[str, float]:
    """The final evaluation (rank 0; written to the run folder), training statistics, and the final
    checkpoint that carries them."""
    cfg, trainer = run.cfg, run.trainer
    eval_model = trainer.eval_module(cfg.eval_use_ema)
    metrics: dict[str, float] = {}
    if eval_model is not None:
        source = f"{run.last_path.resolve()}@step{trainer.step}{'' if cfg.eval_use_ema else ':raw'}"
        metrics = run.scoring(eval_model, trainer.step, Path(cfg.paths.run_dir), source)
    metrics = distributed.broadcast_object(metrics)  # the others wait here for rank 0's evaluation
    for callback in trainer.callbacks:  # checkpoint.keep_best judges the final scores too
        callback.on_evaluation(trainer, metrics, final=True)
    metrics["train/final_loss"] = trainer.losses[-1] if trainer.losses else float("nan")
    metrics["train/steps"] = float(trainer.step)
    metrics["train/ms_per_step"] = 1000 * trainer.train_seconds / max(1, trainer.train_steps)
    if len(trainer.step_rates) > 1:  # the first window holds warm-up (and torch.compile) time
        metrics["train/ms_per_step_steady"] = 1000 / statistics.median(trainer.step_rates[1:])
    metrics["params"] = float(sum(p.numel() for p in trainer.model.parameters()))
    if trainer.device.type == "cuda":
        metrics["gpu/max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    run.writer.write(trainer, run.last_path, metrics, final=True)
    run.tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.step)
    return metrics


def failed(run: Run, error: BaseException) -> BaseException:
    """Record a run that did not complete (experiment log, tracker) and return what to raise: a NaN
    names the last good checkpoint, a second Ctrl-C says what was kept."""
    latest, step = run.writer.metrics, run.trainer.step
    if isinstance(error, (NonFiniteLossError, KeyboardInterrupt)):
        run.writer.discard()  # the pending checkpoints hold the weights that failed, or a step cut short
    kept = run.last_path if run.last_path.exists() else None
    if isinstance(error, NonFiniteLossError):
        status, error = f"failed: {error}", NonFiniteLossError(f"{error} (last good checkpoint: {kept or 'none yet'})")
    elif isinstance(error, RunInterrupted):
        status = f"interrupted at step {step} ({run.control.received})"
    elif isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: no checkpoint of this step
        how = "a second Ctrl-C" if run.control.received else "Ctrl-C outside a training step"
        resume = f"resume with: python launcher.py run_name={run.name} resume=true"
        status, error = (
            f"interrupted at step {step} (stopped at once)",
            RunInterrupted(
                f"stopped at once at step {step} by {how}; "
                + (f"{kept} holds the last checkpoint written; {resume}" if kept else "no checkpoint was written yet"),
                "SIGINT",
            ),
        )
    else:
        status = f"failed: {type(error).__name__}: {error}"
    ended(run, status, latest)
    run.tracker.finish()
    return error


def ended(run: Run, status: str, metrics: dict[str, float]) -> None:
    """Tell the callbacks how the run ended (the experiment log closes its entry): ``completed`` with the
    final metrics, or ``failed: ...`` / ``interrupted at step N (...)`` with the latest scores."""
    for callback in run.trainer.callbacks:
        callback.on_train_end(run.trainer, status, metrics)
