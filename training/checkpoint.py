"""Checkpoint files: written atomically, read with ``weights_only=True``, validated on load."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from training.errors import UserError

FORMAT = "denoising-zoo/1"
REQUIRED_KEYS = (
    "format",
    "model",
    "ema",
    "optimizer",
    "lr_schedule",
    "scaler",
    "step",
    "epoch",
    "batch_in_epoch",
    "skipped_batches",
    "rng",
    "config",
)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk mid-write leaves the previous file at ``path`` untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load and validate a checkpoint; every failure is a one-line ``UserError``."""
    if not path.is_file():
        raise UserError(
            f"{what} {path} does not exist; pass the path of a last.pt or archived .pt under outputs/ckpts/"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(
            f"{what} {path} is truncated or not a torch checkpoint ({type(e).__name__} while reading it); "
            "use another file, e.g. an archived one"
        ) from e
    return check_state(state, path, what)


def check_state(state: Any, path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """``state`` as a validated DenoisingZoo checkpoint, else a one-line ``UserError``."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(
            f"{what} {path} is not a DenoisingZoo checkpoint (no '{FORMAT}' format tag); "
            "pass a file written by launcher.py"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise UserError(f"{what} {path} lacks {', '.join(missing)}; it is damaged: use another checkpoint")
    config = state["config"]
    nodes = {"config": config, "sampling": state.get("sampling", {})}
    if isinstance(config, dict):
        nodes["config.choices"] = config.get("choices", {})
    malformed = [name for name, node in nodes.items() if not isinstance(node, dict)]
    if malformed:
        raise UserError(f"{what} {path} has a malformed {malformed[0]}; it is damaged: use another checkpoint")
    if isinstance(config.get("loss"), dict):
        state["config"]["loss"] = upgrade_loss_config(state["config"]["loss"])
    return state


LEGACY_DROPOUT = ("uncond_p", "class_dropout", "caption_dropout")  # each loss's name before cond_dropout


def upgrade_loss_config(loss: dict[str, Any]) -> dict[str, Any]:
    """A loss config written before ``cond_dropout`` in today's names, so such runs resume and re-score:
    its dropout key becomes ``cond_dropout`` (0 where it had none, as it trained), and MeanFlow's
    ``num_classes`` (now the data's) goes."""
    if "cond_dropout" in loss:
        return loss
    old = [k for k in LEGACY_DROPOUT if k in loss]
    upgraded = {k: v for k, v in loss.items() if k not in (*LEGACY_DROPOUT, "num_classes")}
    return {**upgraded, "cond_dropout": loss[old[0]] if old else 0.0}  # fm had none: it trained without


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """``"model.hidden: 256 -> 128"`` for every key of ``sections`` that differs."""
    a = flatten({s: saved.get(s) for s in sections})
    b = flatten({s: current.get(s) for s in sections})
    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
