"""Rebuild a trained model (and its data) from a checkpoint alone, for sampling and export scripts.

The checkpoint carries its own resolved config, so no Hydra composition is needed: what was
trained is what gets rebuilt, whatever the current config files say. That config is untrusted
data: ``load_checkpoint`` refuses a file whose config names a ``_target_`` no local config builds,
and ``build_from_file`` is the only way anything is instantiated from it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from torch import Tensor, nn

from training.checkpoint import load_checkpoint
from training.errors import UserError
from training.trusted import build_from_file

log = logging.getLogger(__name__)


def model_weights(state: dict[str, Any], use_ema: bool) -> dict[str, Tensor]:
    """The EMA weights (what evaluation uses by default) or the raw ones."""
    return state["ema"] if use_ema else state["model"]


def _instantiate(state: dict[str, Any], section: str, path: Path) -> Any:
    """Build ``config[section]``; a config this code can no longer build is a bad checkpoint."""
    config = state["config"]
    if not isinstance(config, dict) or section not in config:
        raise UserError(f"checkpoint {path} has no '{section}' section in its config; it is damaged")
    try:
        return build_from_file(config[section])
    except InstantiationException as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"checkpoint {path}: cannot rebuild its {section} ({reason})") from e


def load_model(
    path: Path, use_ema: bool = True, device: torch.device | str = "cpu", what: str = "checkpoint"
) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model in eval mode with EMA (default) or raw weights, and its state."""
    state = load_checkpoint(path, what)
    return model_from_state(state, path, use_ema, device), state


def model_from_state(
    state: dict[str, Any], path: Path, use_ema: bool = True, device: torch.device | str = "cpu"
) -> nn.Module:
    """The model of a checkpoint already in memory (``path`` names it in messages)."""
    model: nn.Module = _instantiate(state, "model", path)
    try:
        model.load_state_dict(model_weights(state, use_ema))
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"checkpoint {path}: weights do not fit the model in its config ({reason})") from e
    log.info(
        "loaded %s weights of %s from %s (step %d)",
        "EMA" if use_ema else "raw",
        type(model).__name__,
        path,
        state["step"],
    )
    return model.to(device).eval()


def load_data(state: dict[str, Any], path: Path) -> Any:
    """The checkpoint's data object (held-out ``eval_set``, ``num_classes``), rebuilt from its config."""
    return _instantiate(state, "dataloaders", path)


def export_lora_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    kohya: bool,
    diffusers: bool = True,
    use_ema: bool = False,
    pretrained: str | None = None,
) -> list[Path]:
    """The LoRA files of a training checkpoint in ``out_dir`` (the model rebuilt from the checkpoint's
    config, ``pretrained`` replacing its SDXL path if given); returns their paths, diffusers' first."""
    from adapters.sdxl import SDXLLoRA  # diffusers: imported by the scripts that export, not by every run

    state = load_checkpoint(checkpoint, "checkpoint")
    if state["config"].get("model", {}).get("_target_") != "adapters.sdxl.SDXLLoRA":
        raise UserError(f"{checkpoint} is not an SDXL LoRA checkpoint (model={state['config'].get('model_name')})")
    if pretrained is not None:
        state["config"]["model"]["pretrained"] = pretrained
    model = model_from_state(state, checkpoint, use_ema=use_ema)
    if not isinstance(model, SDXLLoRA):
        raise UserError(f"{checkpoint} rebuilt a {type(model).__name__}, not an SDXL LoRA model")
    return model.save_lora(out_dir, diffusers=diffusers, kohya=kohya)
