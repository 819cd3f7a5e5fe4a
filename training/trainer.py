"""The generic training loop: batch -> loss(model, batch) -> optimizer step.

It knows the contracts only (a model, a ``loss(model, batch) -> LossOutput``, an iterable of
batch dicts) and never a model's or a data set's name.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from losses.base import LossOutput
from training import distributed
from training.callbacks import Callback
from training.ema import EMA
from training.errors import NonFiniteLossError
from training.precision import Precision
from training.progress import Position, Progress
from training.tracking import Tracker

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip", "rollback")
LossFn = Callable[[nn.Module, dict[str, Tensor]], LossOutput]


class Trainer:
    """AdamW-style optimisation with accumulation, clipping, EMA, mixed precision and NaN guard.

    ``step`` counts optimizer steps; ``batch_in_epoch`` counts micro-batches consumed in the
    current epoch, so a run stopped mid-epoch resumes on the next batch.

    Under torchrun the training step calls the model through DDP (or shards it with FSDP2,
    ``strategy=fsdp``); ``model`` stays the unwrapped module the EMA trails, and the state dict
    holds full, unsharded tensors, so a checkpoint resumes in any number of processes. Step
    losses are averaged over ranks before the NaN check, so all ranks stop together.
    ``devices`` is the process count the launcher asked for: checked against the process group.

    Gradient clipping is global (``grad_clip`` over all parameters) unless an optimizer group
    carries its own ``grad_clip`` (None: measured, not clipped): then each group is clipped on its
    own, and the pre/post-clip norms are logged per group under the group's ``name``, e.g. an
    adapter clipped harder than the pretrained weights it sits on. ``callbacks`` (see
    ``training.callbacks``) hook into the loop; one may end it early through ``stop_reason``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: Optimizer,
        lr_schedule: LRScheduler,
        precision: Precision,
        device: torch.device,
        tracker: Tracker,
        *,
        ema_decay: float = 0.999,
        grad_accum: int = 1,
        grad_clip: float | None = 1.0,
        nan_policy: str = "stop",
        max_consecutive_skips: int = 20,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
        log_every: int = 50,
        progress_seconds: float = 30.0,
        compile: bool = False,
        compile_mode: str = "default",
        strategy: str = "ddp",
        devices: int = 1,
        callbacks: list[Callback] | None = None,
    ):
        _check_settings(nan_policy, grad_accum, log_every, max_consecutive_skips, rollback_lr_factor, max_rollbacks,
                        ema_decay, devices)  # fmt: skip
        if not isinstance(progress_seconds, (int, float)) or progress_seconds <= 0:
            raise ValueError(f"trainer.progress_seconds must be a number > 0, got {progress_seconds!r}")
        self.model = model
        self.ema = EMA(model, ema_decay)
        fsdp = strategy == "fsdp" and distributed.active()
        # under FSDP the EMA is sharded like the model, and rank 0 evaluates a full replica
        self._replica = copy.deepcopy(self.ema.module) if fsdp and distributed.rank() == 0 else None
        names = {id(p): n for n, p in model.named_parameters()}
        wrapped = distributed.wrap_for_training(model, strategy, device)
        if fsdp:  # FSDP2 replaced the parameters by sharded ones: the optimizer (still empty) follows
            current = dict(model.named_parameters())
            for group in optimizer.param_groups:
                group["params"] = [current[names[id(p)]] for p in group["params"]]
            distributed.wrap_for_training(self.ema.module, strategy, device)
        self.train_model: nn.Module = torch.compile(wrapped, mode=compile_mode) if compile else wrapped  # type: ignore[assignment]
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.lr_schedule = lr_schedule
        self.precision = precision
        self.device = device
        self.scaler = precision.grad_scaler_for(device)
        self.tracker = tracker
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.nan_policy = nan_policy
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.max_rollbacks = max_rollbacks
        self.rollback_lr_factor = rollback_lr_factor
        self.rollbacks = 0
        self.log_every = log_every
        self.progress_seconds = float(progress_seconds)  # a progress line at least this often, off a terminal
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_batches = 0
        self.checked_step = 0  # the last step whose loss was read back and found finite
        self._unread: list[LossOutput] = []  # step losses and metrics not yet read back from the device
        self.losses: list[float] = []  # one per optimizer step run in this process
        self.read_loss = math.nan  # the mean loss of the last window read back, for the progress display
        self.train_seconds = 0.0
        self.train_steps = 0
        self.step_rates: list[float] = []  # steps/s of each logging window, for steady-state speed
        self.callbacks = list(callbacks or [])
        self.stop_reason: str | None = None  # set by a callback to end training after the current step
        self.epochs, self.total_steps = 0, 0  # what fit() runs to
        self.clip_groups = [
            (g.get("name", f"group{i}"), g["params"], g.get("grad_clip", grad_clip))
            for i, g in enumerate(optimizer.param_groups)
        ]
        self.per_group_clip = any("grad_clip" in g for g in optimizer.param_groups)

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full tensors; under FSDP a collective (every rank calls it), complete on rank 0."""
        return {
            "model": distributed.model_state(self.model),
            "ema": distributed.model_state(self.ema.module),
            "optimizer": distributed.optimizer_state(self.model, self.optimizer),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_batches": self.skipped_batches,
            "rollbacks": self.rollbacks,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", []), strict=False):
            cb.load_state_dict(cb_state)  # first: a callback names a mismatch better than the optimizer does
        distributed.load_model_state(self.model, state["model"])
        distributed.load_model_state(self.ema.module, state["ema"])
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.skipped_batches = state["skipped_batches"]
        self.rollbacks = state.get("rollbacks", 0)  # written before rollbacks: none happened
        self.checked_step = self.step  # what is known finite is this state's own past

    def roll_back(self, state: dict[str, Any], error: NonFiniteLossError) -> None:
        """``nan_policy=rollback``: continue from ``state`` (the last good checkpoint) with the learning
        rate lowered by ``rollback_lr_factor``; after ``max_rollbacks`` the NaN ends the run."""
        match = re.match(r"loss is \S+ at step \d+ \(epoch \d+", str(error))  # without the advice that follows
        if self.max_rollbacks == 0 or match is None:
            raise error
        head = f"{match[0]})"
        if self.rollbacks >= self.max_rollbacks:
            raise NonFiniteLossError(
                f"{head} again after {self.rollbacks} rollback(s) (trainer.max_rollbacks="
                f"{self.max_rollbacks}, each lowering the learning rate by {self.rollback_lr_factor}); the last good "
                "checkpoint is kept: lower optimizer.lr or check the data"
            ) from None
        rollbacks = self.rollbacks + 1
        self.load_state_dict(state)
        self.rollbacks = rollbacks
        factor = self.rollback_lr_factor ** (rollbacks - state.get("rollbacks", 0))  # the state's own are in it
        self.lr_schedule.base_lrs = [lr * factor for lr in self.lr_schedule.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        self._unread.clear()
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("%s: rolled back to step %d, learning rate x%g (rollback %d of %d)",
                    head, self.step, factor, rollbacks, self.max_rollbacks)  # fmt: skip

    def known_finite_step(self) -> int:
        """The last step whose loss is known to be finite, reading the unread losses back (a device sync):
        a checkpoint at step S is good once this passes S."""
        if self._unread and bool(torch.isfinite(torch.stack([o.loss for o in self._unread])).all()):
            return self.step
        return self.checked_step

    def eval_module(self, use_ema: bool) -> nn.Module | None:
        """The unwrapped module to evaluate (EMA or raw weights) on rank 0, None on other ranks.
        Under FSDP a collective: the full weights are gathered into a replica on rank 0."""
        source = self.ema.module if use_ema else self.model
        if distributed.is_sharded(source):
            state = distributed.model_state(source)
            if self._replica is not None:
                self._replica.load_state_dict(state)
            return self._replica
        return source if distributed.rank() == 0 else None

    # --- one optimizer step ------------------------------------------------------------------
    def _micro_step(self, batch: dict[str, Tensor], sync: bool) -> LossOutput | None:
        """Forward and backward one micro-batch; returns its detached output, None if skipped.

        Nothing here reads a value back from the device (a CUDA stall): non-finite losses are
        found when a window of losses is read at the next log point, except under
        ``nan_policy=skip``, which must decide before the backward pass and so checks every batch.
        ``sync=False`` (all micro-batches of an accumulation group but the last) skips the
        gradient all-reduce of multi-process runs.
        """
        with distributed.gradient_sync(self.train_model, sync), self.precision.autocast_context(self.device):
            out = self.loss_fn(self.train_model, batch)
            # the skip decision is shared: a rank that skipped its backward would hang the others
            if self.nan_policy == "skip" and not torch.isfinite(distributed.mean_across_ranks(out.loss)):
                self.skipped_batches += 1
                self.consecutive_skips += 1
                if self.consecutive_skips >= self.max_consecutive_skips:
                    raise NonFiniteLossError(
                        f"the loss was non-finite for {self.consecutive_skips} batches in a row at step "
                        f"{self.step + 1} (nan_policy=skip, trainer.max_consecutive_skips="
                        f"{self.max_consecutive_skips}): the weights are no longer usable; lower the learning rate "
                        "or use nan_policy=rollback"
                    )
                log.warning("loss is %s at step %d: batch skipped (nan_policy=skip)", out.loss.item(), self.step + 1)
                return None
            self.consecutive_skips = 0
            loss = out.loss if self.grad_accum == 1 else out.loss / self.grad_accum
            self.scaler.scale(loss).backward()
        return LossOutput(out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()})

    def _optimizer_step(self, measure_norm: bool) -> dict[str, Tensor]:
        """Unscale, clip, step, update the EMA; returns the pre-clip gradient norms that were computed
        (always when clipping, else only if ``measure_norm``): ``{"": global}``, or one per group
        under per-group clipping."""
        self.scaler.unscale_(self.optimizer)
        norms: dict[str, Tensor] = {}
        if self.per_group_clip:
            for name, params, max_norm in self.clip_groups:
                if max_norm:
                    norms[name] = torch.nn.utils.clip_grad_norm_(params, max_norm)
                elif measure_norm:
                    norms[name] = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        elif self.grad_clip:
            norms[""] = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        elif measure_norm:
            norms[""] = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.ema.update(self.model, self.step)
        return norms

    def _norm_metrics(self, norms: dict[str, Tensor]) -> dict[str, float]:
        """Pre- and post-clip gradient norms for the log: global, or per group plus their total."""
        if not self.per_group_clip:
            pre = float(norms[""]) if "" in norms else math.nan
            post = min(pre, self.grad_clip) if self.grad_clip else pre
            return {"train/grad_norm_pre_clip": pre, "train/grad_norm_post_clip": post}
        metrics: dict[str, float] = {}
        for name, _, max_norm in self.clip_groups:
            pre = float(norms[name]) if name in norms else math.nan
            metrics[f"train/grad_norm_pre_clip/{name}"] = pre
            metrics[f"train/grad_norm_post_clip/{name}"] = min(pre, max_norm) if max_norm else pre
        for kind in ("pre", "post"):
            parts = [v for k, v in metrics.items() if k.startswith(f"train/grad_norm_{kind}_clip/")]
            metrics[f"train/grad_norm_{kind}_clip"] = math.sqrt(sum(v * v for v in parts))
        return metrics

    def _flush(self, pending: list[LossOutput]) -> tuple[list[float], dict[str, float]]:
        """Read a window of step losses and loss metrics back from the device; stop at the first
        non-finite loss, naming the loss terms (metrics) that were non-finite at that step.
        Returns the losses and the window means of the metrics."""
        if not pending:
            return [], {}
        values = distributed.mean_across_ranks(torch.stack([out.loss for out in pending])).tolist()
        first = self.step - len(values) + 1
        for i, value in enumerate(values):
            if not math.isfinite(value):
                bad = [k for k, v in pending[i].metrics.items() if not torch.isfinite(v).all()]
                terms = f"; non-finite terms: {', '.join(bad)}" if bad else ""
                raise NonFiniteLossError(
                    f"loss is {value} at step {first + i} (epoch {self.epoch}{terms}); training stopped and the "
                    "last good checkpoint kept: lower the learning rate, check the data, or set "
                    "nan_policy=rollback (or skip)"
                )
        keys = pending[0].metrics.keys()
        means = {k: distributed.mean_across_ranks(torch.stack([out.metrics[k] for out in pending]).mean()).item()
                 for k in keys}  # fmt: skip
        self.losses.extend(values)
        self.read_loss = sum(values) / len(values)
        self.checked_step = self.step
        pending.clear()
        return values, means

    def _log(
        self, norms: dict[str, Tensor], hook_metrics: dict[str, float], window: tuple[float, int]
    ) -> dict[str, float]:
        """A log point: read the window's losses back (the device catches up first, so the rate of the
        window ``(start time, steps)`` counts its work), add the callbacks' metrics, send them to the tracker."""
        values, loss_metrics = self._flush(self._unread)
        steps_per_sec = window[1] / (time.perf_counter() - window[0])
        metrics = {
            "train/loss": sum(values) / len(values),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            **self._norm_metrics(norms),
            "train/steps_per_sec": steps_per_sec,
            "train/skipped_batches": float(self.skipped_batches),
            "epoch": float(self.epoch),
            **{f"train/{k}": v for k, v in loss_metrics.items()},
            **hook_metrics,
        }
        if self.device.type == "cuda":
            metrics["gpu/max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.step_rates.append(steps_per_sec)
        for cb in self.callbacks:
            metrics.update(cb.on_log(self, values, metrics))
        self.tracker.log(metrics, step=self.step)
        return metrics

    # --- the loop ----------------------------------------------------------------------------
    def check_losses(self) -> None:
        """Read the unread step losses back (a device sync), raising at a non-finite one: callbacks
        call it before they evaluate or save the weights, so nothing past a NaN is scored or kept."""
        self._flush(self._unread)

    def recent_loss(self) -> float:
        """For the progress display: the mean loss of the steps not yet read back (this rank's own; a
        device sync, no collective, nothing marked checked), else that of the last window read."""
        if self._unread:
            return torch.stack([out.loss for out in self._unread]).float().mean().item()
        return self.read_loss

    def fit(self, loader: Iterable[dict[str, Tensor]], epochs: int, max_steps: int | None) -> None:
        """Train until ``epochs`` are done, ``max_steps`` optimizer steps are reached or a callback
        sets ``stop_reason``; evaluation and checkpoints are callbacks (``training.callbacks``)."""
        steps_per_epoch = len(loader) // self.grad_accum  # type: ignore[arg-type]
        if steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(loader)} batches, fewer than trainer.grad_accum={self.grad_accum}"  # type: ignore[arg-type]
            )
        total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
        self.epochs, self.total_steps = epochs, total
        self.model.train()
        progress = Progress(total=total, epochs=epochs, steps_per_epoch=steps_per_epoch, start_step=self.step,
                            log_every=self.log_every, every_seconds=self.progress_seconds,
                            enabled=distributed.rank() == 0)  # fmt: skip
        pending = self._unread
        window_start, window_steps = time.perf_counter(), 0
        while self.epoch < epochs and self.step < total and self.stop_reason is None:
            loader.set_epoch(self.epoch)  # type: ignore[attr-defined]
            batches = itertools.islice(iter(loader), self.batch_in_epoch, steps_per_epoch * self.grad_accum)
            t0, steps_before = time.perf_counter(), self.step
            group: list[LossOutput] = []
            stopped = False  # by max_steps, not by the end of the epoch's batches
            for batch in batches:
                self.batch_in_epoch += 1
                out = self._micro_step(batch, sync=self.batch_in_epoch % self.grad_accum == 0)
                if out is not None:
                    group.append(out)
                if self.batch_in_epoch % self.grad_accum:
                    continue
                if not group:  # every micro-batch of the group was skipped
                    continue
                log_now = (self.step + 1) % self.log_every == 0 or self.step + 1 == total
                norms = self._optimizer_step(measure_norm=log_now)
                self.step += 1
                window_steps += 1
                pending.append(group[0] if len(group) == 1 else _mean_output(group))
                group = []
                hook_metrics = {k: v for cb in self.callbacks for k, v in cb.on_step_end(self).items()}
                if log_now:
                    self._log(norms, hook_metrics, (window_start, window_steps))
                    window_start, window_steps = time.perf_counter(), 0
                elif hook_metrics:
                    self.tracker.log(hook_metrics, step=self.step)
                hooks_start, checked = time.perf_counter(), self.checked_step
                for cb in self.callbacks:
                    cb.after_step(self)
                if self.checked_step != checked:  # a callback evaluated or saved: its time is not training time
                    window_start, window_steps = time.perf_counter(), 0
                else:
                    window_start += time.perf_counter() - hooks_start
                at = Position(self.step, self.epoch, self.batch_in_epoch // self.grad_accum,
                              self.optimizer.param_groups[0]["lr"])  # fmt: skip
                progress.update(at, self.recent_loss)
                if self.step >= total or self.stop_reason is not None:
                    stopped = True
                    break
            self._flush(pending)
            self.train_seconds += time.perf_counter() - t0
            self.train_steps += self.step - steps_before
            # a streamed data set whose len() is an estimate (WebDataset) may end an epoch early
            if not stopped or self.batch_in_epoch >= steps_per_epoch * self.grad_accum:
                if self.batch_in_epoch < steps_per_epoch * self.grad_accum:
                    log.info("epoch %d ended after %d of ~%d batches", self.epoch + 1, self.batch_in_epoch,
                             steps_per_epoch * self.grad_accum)  # fmt: skip
                self.epoch += 1
                self.batch_in_epoch = 0
                for cb in self.callbacks:
                    cb.on_epoch_end(self)
                window_start, window_steps = time.perf_counter(), 0  # evaluation time is not training time
        if self.stop_reason is not None:
            log.info("training stopped at step %d: %s", self.step, self.stop_reason)
        progress.close()


def _mean_output(outputs: list[LossOutput]) -> LossOutput:
    """The mean loss and metrics of the micro-batches of one accumulation group."""
    metrics = {k: torch.stack([o.metrics[k] for o in outputs]).mean() for k in outputs[0].metrics}
    return LossOutput(torch.stack([o.loss for o in outputs]).mean(), metrics)


def _check_settings(
    nan_policy: str,
    grad_accum: int,
    log_every: int,
    max_consecutive_skips: int,
    rollback_lr_factor: float,
    max_rollbacks: int,
    ema_decay: float,
    devices: int,
) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}")
    for name, value, low in (("grad_accum", grad_accum, 1), ("log_every", log_every, 1),
                             ("max_consecutive_skips", max_consecutive_skips, 1)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"trainer.{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(rollback_lr_factor, (int, float)) or not 0 < rollback_lr_factor <= 1:
        raise ValueError(f"trainer.rollback_lr_factor must be in (0, 1], got {rollback_lr_factor!r}")
    if not isinstance(max_rollbacks, int) or max_rollbacks < 0:
        raise ValueError(f"trainer.max_rollbacks must be an integer >= 0, got {max_rollbacks!r}")
    if not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
        raise ValueError(f"trainer.ema_decay must be in [0, 1) (e.g. 0.999), got {ema_decay!r}")
    world = distributed.world_size()
    if devices > 1 and devices != world:
        raise ValueError(
            f"trainer.devices={devices} but this run has {world} process(es); start it with launcher.py "
            f"(which relaunches itself under torchrun) or torchrun --nproc_per_node={devices}"
        )
