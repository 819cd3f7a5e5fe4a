"""Training the GLIDE CLIP adapter without harming the pretrained model: phases, checks, rollback, files.

``adapter_training=clip`` plugs this into the generic trainer (``training.callbacks``):

- **Phases** (``phase``), each a strictly separate set of trained parameters; everything else is
  frozen (``requires_grad=False``, no optimizer state, bit-for-bit unchanged):
  ``adapter_only`` the token MLP; ``adapter_gates`` + the gates and CLIP K/V projections;
  ``full`` + GLIDE itself (its text encoder too unless ``freeze_glide_text_encoder``). The adapter
  and GLIDE are two AdamW groups (the adapter with betas (0.9, 0.98), GLIDE at a lower rate), each
  clipped to its own norm (``adapter_grad_clip``, ``main_grad_clip``).
- **Early stopping** every ``early_stop_every`` steps: the loss of the model *without* CLIP on a
  fixed held-out batch (fixed timesteps and noise) is compared with its value at the start; when it
  is more than ``early_stop_threshold`` (relative) worse for ``patience`` checks in a row, training
  stops and the trained weights of the best check (lowest loss with CLIP among the checks that
  kept the baseline) are restored, in the model and its EMA. The count and the best are a ``Plateau``,
  the bookkeeping of every model's ``early_stopping`` (training/callbacks/early_stopping.py).
- **Dry runs** every ``dry_run_interval`` steps: the CLIP path computed with its gates at exactly 0
  must give the baseline's output bit for bit; the largest difference is logged.
- **Rollback**: at each log point, a step loss above ``spike_factor`` x the median of the last
  ``spike_window`` step losses restores the trained weights and optimizer state of the previous
  log point; otherwise the current state becomes the last good one. Snapshots live in CPU memory.
- **Files**: beside every checkpoint, ``<name>.adapter.safetensors`` (raw weights) and
  ``<name>.adapter_ema.safetensors`` (EMA), each with its JSON description (``save_adapter``).
- Logged: effective gates (mean/min/max), per-group gradient norms and their ratio, the KL term
  (from the loss), baseline and adapted validation losses, dry-run difference, rollbacks.
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapters.glide_clip import GlideClipUNet
from evaluation.contract import eval_mode
from losses.clip_adapter_kl import without_clip
from losses.diffusion import DiffusionLoss
from training.callbacks.base import Callback
from training.callbacks.early_stopping import Plateau

log = logging.getLogger(__name__)

PHASES = ("adapter_only", "adapter_gates", "full")


class ClipAdapterTraining(Callback):
    """The adapter's side of the training loop; see the module docstring for what each option does."""

    def __init__(
        self,
        phase: str = "adapter_only",
        adapter_lr: float = 1e-4,
        adapter_betas: Sequence[float] = (0.9, 0.98),
        adapter_weight_decay: float = 0.0,
        main_lr: float = 1e-5,
        adapter_grad_clip: float | None = 1.0,
        main_grad_clip: float | None = 1.0,
        freeze_glide_text_encoder: bool = True,
        early_stop_every: int = 500,
        early_stop_threshold: float = 0.1,
        patience: int = 3,
        dry_run_interval: int = 1000,
        spike_factor: float = 3.0,
        spike_window: int = 20,
        save_adapter: bool = True,
        seed: int = 0,
    ):
        if phase not in PHASES:
            raise ValueError(f"unknown adapter_training.phase {phase!r}; valid: {', '.join(PHASES)}")
        if early_stop_threshold < 0 or patience < 1:
            raise ValueError("adapter_training.early_stop_threshold must be >= 0 and adapter_training.patience >= 1")
        self.phase = phase
        self.adapter_lr, self.adapter_betas, self.adapter_weight_decay = (
            adapter_lr,
            tuple(adapter_betas),
            adapter_weight_decay,
        )
        self.main_lr = main_lr
        self.adapter_grad_clip, self.main_grad_clip = adapter_grad_clip, main_grad_clip
        self.freeze_glide_text_encoder = freeze_glide_text_encoder
        self.early_stop_every, self.early_stop_threshold, self.patience = (
            early_stop_every,
            early_stop_threshold,
            patience,
        )
        self.dry_run_interval = dry_run_interval
        self.spike_factor, self.spike_window = spike_factor, spike_window
        self.save_adapter = save_adapter
        self.seed = seed
        # state that travels in the checkpoint
        self.reference: float | None = None  # the baseline loss at the start of training
        # the best check's loss with CLIP (among those that kept the baseline), and the checks in a row that did not
        self.plateau = Plateau("min", patience=patience)
        self.best_state: dict[str, Tensor] | None = None
        self.rollbacks = 0
        self.history: list[float] = []
        # set up in on_train_start
        self.trained: list[tuple[str, nn.Parameter]] = []
        self.last_good: tuple[dict[str, Tensor], dict[str, Any]] | None = None
        self.val: tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]] | None = None

    # --- optimizer groups ------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """This phase's groups; every other parameter is frozen."""
        if not isinstance(model, GlideClipUNet):
            raise ValueError(
                f"adapter_training=clip trains the CLIP adapter of model=glide_base_clip, not {type(model).__name__}"
            )
        sets = model.parameter_sets()
        adapter = sets["adapter_mlp"] + (sets["clip_attention"] if self.phase != "adapter_only" else [])
        main: list[tuple[str, nn.Parameter]] = []
        if self.phase == "full":
            main = sets["glide_unet"] + ([] if self.freeze_glide_text_encoder else sets["glide_text_encoder"])
        self.trained = adapter + main
        trained = {id(p) for _, p in self.trained}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        groups = [
            {
                "params": [p for _, p in adapter],
                "lr": self.adapter_lr,
                "betas": self.adapter_betas,
                "weight_decay": self.adapter_weight_decay,
                "grad_clip": self.adapter_grad_clip,
                "name": "adapter",
            }
        ]
        if main:
            groups.append({"params": [p for _, p in main], "lr": self.main_lr, "grad_clip": self.main_grad_clip,
                           "name": "main"})  # fmt: skip
        trained_m = sum(p.numel() for _, p in self.trained) / 1e6
        total_m = sum(p.numel() for p in model.parameters()) / 1e6
        log.info("adapter phase %s: training %.3fM of %.3fM parameters (adapter %d tensors, GLIDE %d tensors)",
                 self.phase, trained_m, total_m, len(adapter), len(main))  # fmt: skip
        return groups

    # --- hooks -----------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, data: Any) -> None:
        if not isinstance(trainer.loss_fn, DiffusionLoss):
            raise ValueError("adapter_training=clip needs a diffusion loss (loss=clip_adapter_kl)")
        if data.clip_cache is None:
            raise ValueError(
                "adapter_training=clip needs CLIP embeddings in every batch: configure dataloaders.clip_cache "
                "(the glide_clip_phase* experiments do; see scripts/precompute_clip.py)"
            )
        if self.early_stop_every or self.dry_run_interval:
            self.val = self._validation_batch(trainer, data)
        if self.early_stop_every and self.reference is None:
            self.reference, adapted = self._val_losses(trainer)
            self.plateau.record(adapted, trainer.step)
            self.best_state = self._weights()
            log.info("adapter early stopping: baseline loss %.5g at the start (threshold +%.0f%%, patience %d)",
                     self.reference, 100 * self.early_stop_threshold, self.patience)  # fmt: skip

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        model: GlideClipUNet = trainer.model
        model.clip_adapter.step += 1
        trainer.ema.module.clip_adapter.step.copy_(model.clip_adapter.step)  # the EMA's gates warm up in step
        metrics: dict[str, float] = {}
        if self.dry_run_interval and trainer.step % self.dry_run_interval == 0:
            metrics.update(self._dry_run(trainer))
        if self.early_stop_every and trainer.step % self.early_stop_every == 0:
            metrics.update(self._check_baseline(trainer))
        return metrics

    def on_log(self, trainer: Any, losses: list[float], metrics: dict[str, float]) -> dict[str, float]:
        gates = trainer.model.effective_gates().detach().float()
        out = {"adapter/gate_mean": gates.mean().item(), "adapter/gate_min": gates.min().item(),
               "adapter/gate_max": gates.max().item(), "adapter/rollbacks": float(self.rollbacks)}  # fmt: skip
        adapter_norm = metrics.get("train/grad_norm_pre_clip/adapter")
        main_norm = metrics.get("train/grad_norm_pre_clip/main")
        if adapter_norm is not None and main_norm:
            out["adapter/grad_norm_ratio"] = adapter_norm / main_norm
        if self.spike_factor > 0:
            self._rollback_or_keep(trainer, losses)
        return out

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        if not self.save_adapter:
            return
        extra = {"phase": self.phase, "step": trainer.step}
        trainer.model.save_adapter(path.with_name(f"{path.stem}.adapter.safetensors"), {**extra, "weights": "raw"})
        trainer.ema.module.save_adapter(path.with_name(f"{path.stem}.adapter_ema.safetensors"),
                                        {**extra, "weights": "ema"})  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "reference": self.reference,
            "best_loss": self.plateau.best,
            "best_step": self.plateau.best_step,
            "best_state": self.best_state,
            "bad_checks": self.plateau.misses,
            "rollbacks": self.rollbacks,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["phase"] != self.phase:
            raise ValueError(
                f"this run trained adapter_training.phase={state['phase']}, not {self.phase}; start the next phase "
                "as a new run from this one's adapter file (experiment=glide_clip_phase2/3)"
            )
        self.reference, self.best_state, self.rollbacks = state["reference"], state["best_state"], state["rollbacks"]
        self.plateau.load_state_dict(
            {"best": state["best_loss"], "best_step": state["best_step"], "misses": state["bad_checks"]}
        )
        self.history = list(state["history"])

    # --- checks ----------------------------------------------------------------------------
    def _validation_batch(self, trainer: Any, data: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The held-out pairs at fixed timesteps and noise: (x_start, x_t, t, noise, cond)."""
        batch = data.eval_batch(trainer.device)
        if len(batch["x1"]) == 0 or "clip" not in batch["cond"]:
            raise ValueError(
                "the adapter's early stopping and dry runs need held-out pairs with CLIP embeddings: set "
                "dataloaders.num_eval > 0 and dataloaders.clip_cache, or adapter_training.early_stop_every=0 "
                "adapter_training.dry_run_interval=0"
            )
        loss: DiffusionLoss = trainer.loss_fn
        x_start = batch["x1"].float()
        g = torch.Generator().manual_seed(self.seed)
        t = torch.randint(0, len(loss.schedule), (len(x_start),), generator=g).to(x_start.device)
        noise = torch.randn(x_start.shape, generator=g).to(x_start.device)
        return x_start, loss.schedule.q_sample(x_start, t, noise), t, noise, batch["cond"]

    def _predict(self, trainer: Any, cond: dict[str, Tensor], gate_scale: float | None = None) -> Tensor:
        assert self.val is not None
        _, x_t, t, _, _ = self.val
        model: GlideClipUNet = trainer.model
        # eval mode: no dropout, the checks compare numbers
        with eval_mode(model), torch.no_grad(), trainer.precision.autocast_context(trainer.device):
            if gate_scale is None:
                return model(x_t, t.float(), None, cond).float()
            return model.denoise(x_t, t.float(), cond, gate_scale=gate_scale).float()

    def _val_losses(self, trainer: Any) -> tuple[float, float]:
        """(baseline loss without CLIP, loss with CLIP) on the validation batch."""
        assert self.val is not None
        x_start, x_t, t, noise, cond = self.val
        loss: DiffusionLoss = trainer.loss_fn
        base = loss.objective(self._predict(trainer, without_clip(cond)), x_start, x_t, t, noise).loss.item()
        adapted = loss.objective(self._predict(trainer, cond), x_start, x_t, t, noise).loss.item()
        return base, adapted

    def _dry_run(self, trainer: Any) -> dict[str, float]:
        assert self.val is not None
        cond = self.val[4]
        diff = (self._predict(trainer, cond, gate_scale=0.0) - self._predict(trainer, without_clip(cond))).abs()
        worst = diff.max().item()
        if worst != 0:
            log.warning("adapter dry run at step %d: the CLIP path at gate 0 changed the output by up to %.3g; "
                        "the adapter leaks into the base model", trainer.step, worst)  # fmt: skip
        return {"adapter/dry_run_max_diff": worst}

    def _check_baseline(self, trainer: Any) -> dict[str, float]:
        assert self.reference is not None
        base, adapted = self._val_losses(trainer)
        degradation = (base - self.reference) / self.reference
        kept = degradation <= self.early_stop_threshold
        self.plateau.count(kept)
        if kept and self.plateau.improves(adapted):
            self.plateau.record(adapted, trainer.step)
            self.best_state = self._weights()
        if self.plateau.exhausted:
            assert self.best_state is not None
            self._load_weights(trainer, self.best_state, ema=True)
            trainer.stop_reason = (
                f"early stopping: the loss without CLIP is {100 * degradation:.1f}% above its start "
                f"({base:.5g} vs {self.reference:.5g}; threshold {100 * self.early_stop_threshold:.0f}%) for "
                f"{self.patience} checks; restored the trained weights of step {self.plateau.best_step}"
            )
        return {"adapter/baseline_loss": base, "adapter/val_loss": adapted, "adapter/baseline_degradation": degradation,
                "adapter/bad_checks": float(self.plateau.misses)}  # fmt: skip

    # --- snapshots ---------------------------------------------------------------------------
    def _weights(self) -> dict[str, Tensor]:
        """A CPU copy of the trained parameters."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.trained}

    def _load_weights(self, trainer: Any, weights: dict[str, Tensor], ema: bool) -> None:
        with torch.no_grad():
            for name, p in self.trained:
                p.copy_(weights[name])
            if ema:
                ema_params = dict(trainer.ema.module.named_parameters())
                for name, _ in self.trained:
                    ema_params[name].copy_(weights[name])

    def _rollback_or_keep(self, trainer: Any, losses: list[float]) -> None:
        ready = len(self.history) >= min(self.spike_window, 5)
        if ready and max(losses) > self.spike_factor * statistics.median(self.history):
            if self.last_good is not None:
                weights, optimizer_state = self.last_good
                self._load_weights(trainer, weights, ema=False)
                trainer.optimizer.load_state_dict(optimizer_state)
            self.rollbacks += 1
            log.warning("loss spike at step %d (%.4g > %.1f x median %.4g): rolled back to the last good adapter state",
                        trainer.step, max(losses), self.spike_factor, statistics.median(self.history))  # fmt: skip
            return
        self.history = (self.history + list(losses))[-self.spike_window :]
        self.last_good = (self._weights(), _to_cpu(trainer.optimizer.state_dict()))


def _to_cpu(state: Any) -> Any:
    """A deep CPU copy of an optimizer state dict."""
    if isinstance(state, Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return copy.deepcopy(state)
