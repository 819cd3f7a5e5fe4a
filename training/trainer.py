"""The generic training loop: batch -> loss(model, batch) -> optimizer step.

It knows the contracts only (a model, a ``loss(model, batch) -> LossOutput``, an iterable of
batch dicts) and never a model's or a data set's name.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from losses.base import LossOutput
from training.ema import ema_with_warmup
from training.errors import NonFiniteLossError
from training.precision import Precision
from training.tracking import Tracker

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], LossOutput]


class Trainer:
    """AdamW-style optimisation with accumulation, clipping, EMA, mixed precision and NaN guard.

    ``step`` counts optimizer steps; ``batch_in_epoch`` counts micro-batches consumed in the
    current epoch, so a run stopped mid-epoch resumes on the next batch.
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
        log_every: int = 50,
        compile: bool = False,
        compile_mode: str = "default",
    ):
        if nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
        if grad_accum < 1:
            raise ValueError(f"trainer.grad_accum must be >= 1, got {grad_accum}")
        self.model = model
        self.train_model: nn.Module = torch.compile(model, mode=compile_mode) if compile else model  # type: ignore[assignment]
        self.ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.precision = precision
        self.device = device
        self.scaler = precision.grad_scaler_for(device)
        self.tracker = tracker
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.nan_policy = nan_policy
        self.log_every = log_every
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_batches = 0
        self.losses: list[float] = []  # one per optimizer step run in this process
        self.train_seconds = 0.0
        self.train_steps = 0

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_batches": self.skipped_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.skipped_batches = state["skipped_batches"]

    # --- one optimizer step ------------------------------------------------------------------
    def _micro_step(self, batch: dict[str, Tensor]) -> float | None:
        """Forward and backward one micro-batch; None when its loss was non-finite and skipped."""
        with self.precision.autocast_context(self.device):
            out = self.loss_fn(self.train_model, batch)
        value = out.loss.item()
        if not math.isfinite(value):
            self._non_finite(f"loss is {value}")
            return None
        self.scaler.scale(out.loss / self.grad_accum).backward()
        return value

    def _non_finite(self, what: str) -> None:
        if self.nan_policy == "stop":
            raise NonFiniteLossError(
                f"{what} at step {self.step + 1} (epoch {self.epoch}); training stopped and the last good "
                "checkpoint kept: lower the learning rate, check the data, or set nan_policy=skip"
            )
        self.skipped_batches += 1
        log.warning("%s at step %d: batch skipped (nan_policy=skip)", what, self.step + 1)

    def _optimizer_step(self) -> tuple[float, float] | None:
        """Unscale, clip, step; returns (pre-clip, post-clip) gradient norms, None if skipped."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.grad_clip if self.grad_clip else math.inf
        pre = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(pre) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            self._non_finite(f"gradient norm is {pre}")
            return None
        post = pre * min(1.0, max_norm / (pre + 1e-6)) if math.isfinite(pre) else pre
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.ema.update_parameters(self.model)
        return pre, post

    # --- the loop ----------------------------------------------------------------------------
    def fit(
        self,
        loader: Iterable[dict[str, Tensor]],
        epochs: int,
        max_steps: int | None,
        on_epoch_end: Callable[[int], None],
    ) -> None:
        """Train until ``epochs`` are done or ``max_steps`` optimizer steps are reached.

        ``on_epoch_end(epoch)`` runs after every completed epoch (evaluation, checkpoints).
        """
        steps_per_epoch = len(loader) // self.grad_accum  # type: ignore[arg-type]
        if steps_per_epoch == 0:
            raise ValueError(f"an epoch has {len(loader)} batches, fewer than trainer.grad_accum={self.grad_accum}")  # type: ignore[arg-type]
        total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
        self.model.train()
        bar = tqdm(
            total=total, initial=min(self.step, total), desc="train", unit="step", dynamic_ncols=True, disable=None
        )
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        while self.epoch < epochs and self.step < total:
            loader.set_epoch(self.epoch)  # type: ignore[attr-defined]
            batches = itertools.islice(iter(loader), self.batch_in_epoch, steps_per_epoch * self.grad_accum)
            t0 = time.perf_counter()
            steps_before = self.step
            group_loss, group_n = 0.0, 0
            for batch in batches:
                self.batch_in_epoch += 1
                value = self._micro_step(batch)
                if value is not None:
                    group_loss += value
                    group_n += 1
                if self.batch_in_epoch % self.grad_accum:
                    continue
                norms = self._optimizer_step() if group_n else None
                group_mean = group_loss / max(1, group_n)
                group_loss, group_n = 0.0, 0
                if norms is None:
                    continue
                self.step += 1
                self.losses.append(group_mean)
                window_loss += group_mean
                window_steps += 1
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == total:
                    elapsed = time.perf_counter() - window_start
                    metrics = {
                        "train/loss": window_loss / max(1, window_steps),
                        "train/lr": self.optimizer.param_groups[0]["lr"],
                        "train/grad_norm_pre_clip": norms[0],
                        "train/grad_norm_post_clip": norms[1],
                        "train/steps_per_sec": window_steps / elapsed,
                        "train/skipped_batches": float(self.skipped_batches),
                        "epoch": float(self.epoch),
                    }
                    if self.device.type == "cuda":
                        metrics["gpu/max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                    self.tracker.log(metrics, step=self.step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                if self.step >= total:
                    break
            self.train_seconds += time.perf_counter() - t0
            self.train_steps += self.step - steps_before
            if self.batch_in_epoch >= steps_per_epoch * self.grad_accum:
                self.epoch += 1
                self.batch_in_epoch = 0
                on_epoch_end(self.epoch)
                window_start = time.perf_counter()  # evaluation time is not training time
        bar.close()
