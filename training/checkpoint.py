"""Checkpoint files: written atomically with a digest of their contents, read with
``weights_only=True``, verified and validated on load; the config inside is checked as untrusted
data (``training.trusted``) before anything is built from it."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.fingerprint import tensor_digest
from training.errors import UserError
from training.trusted import check_file_config
from training.upgrade import rename_targets, upgrade_config

log = logging.getLogger(__name__)

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


TMP_GLOB = ".*.tmp"  # what save_checkpoint writes before its rename


def save_checkpoint(state: dict[str, Any], path: Path, shown: Path | None = None) -> None:
    """Write ``state`` plus its digest to a temp file in the same folder, fsync it, rename it over
    ``path`` and fsync the folder, so the rename itself survives a power cut.

    A crash or a full disk mid-write leaves the previous file at ``path`` untouched; a failed write
    is one ``UserError`` naming the folder and its free space (and ``shown``, the name the file will
    have, rather than a pending one).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {**{k: v for k, v in state.items() if k != "digest"}, "digest": tensor_digest(_digested(state))}
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(path.parent).free / 2**20
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"could not write checkpoint {shown or path} ({reason}); {free:.0f} MiB free in {path.parent}: "
            "free some space (the previous checkpoint there is intact) and resume"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files of saves that a kill interrupted (the caller holds the run's lock, so
    no save is in flight); returns what it removed."""
    stale = [p for p in (*folder.glob(TMP_GLOB), *folder.glob(f"archive/{TMP_GLOB}")) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temp file(s) of interrupted saves in %s", len(stale), folder)
    return stale


def _digested(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "digest"}


def verifies(path: Path) -> bool:
    """Whether ``path`` loads and its contents match its digest."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file simply does not verify
        return False
    return isinstance(state, dict) and state.get("digest") == tensor_digest(_digested(state))


def last_verified(path: Path) -> Path | None:
    """The newest other checkpoint of ``path``'s run (``last.pt``, ``archive/*.pt``) that verifies."""
    run = path.parent.parent if path.parent.name == "archive" else path.parent
    candidates = [
        p for p in (run / "last.pt", *run.glob("archive/*.pt")) if p.is_file() and p.resolve() != path.resolve()
    ]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if verifies(candidate):
            return candidate
    return None


def load_checkpoint(
    path: Path, what: str = "checkpoint", builds: bool = True, trusted: Sequence[str] = ()
) -> dict[str, Any]:
    """Load, verify and validate a checkpoint; every failure is a one-line ``UserError``. ``builds``:
    the caller may build from the file's config, so it is checked as untrusted (resume and rollback
    only compare it with the run's own config and pass False); ``trusted``: targets the user allows
    beyond the local configs' (``trusted_targets``)."""
    if not path.is_file():
        raise UserError(
            f"{what} {path} does not exist; pass the path of a last.pt or archived .pt under outputs/ckpts/"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
            raise UserError(
                f"{what} {path} is unsafe and was not loaded: it holds a pickled Python object ({found[1]}), "
                "which could run code; only checkpoints written by this project's launcher are accepted"
            ) from None
        raise UserError(
            f"{what} {path} is truncated or not a torch checkpoint (UnpicklingError while reading it); "
            "use another file, e.g. an archived one"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(
            f"{what} {path} is truncated or not a torch checkpoint ({type(e).__name__} while reading it); "
            "use another file, e.g. an archived one"
        ) from e
    return check_state(state, path, what, builds, trusted)


def check_state(
    state: Any, path: Path, what: str = "checkpoint", builds: bool = True, trusted: Sequence[str] = ()
) -> dict[str, Any]:
    """``state`` as a validated DenoisingZoo checkpoint, else a one-line ``UserError``."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(
            f"{what} {path} is not a DenoisingZoo checkpoint (no '{FORMAT}' format tag); "
            "pass a file written by launcher.py"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise UserError(f"{what} {path} lacks {', '.join(missing)}; it is damaged: use another checkpoint")
    if "digest" not in state:
        log.warning("%s %s has no integrity digest (written before digests): it cannot be verified", what, path)
    elif state["digest"] != tensor_digest(_digested(state)):
        good = last_verified(Path(path))
        fallback = (
            f"the last checkpoint that verifies is {good} (copy it over {Path(path).name} to go on from it)"
            if good
            else "no other checkpoint of this run verifies"
        )
        raise UserError(f"{what} {path} is corrupted: its contents do not match the digest written with it; {fallback}")
    config = state["config"]
    nodes = {"config": config, "sampling": state.get("sampling", {})}
    if isinstance(config, dict):
        nodes["config.choices"] = config.get("choices", {})
    malformed = [name for name, node in nodes.items() if not isinstance(node, dict)]
    if malformed:
        raise UserError(f"{what} {path} has a malformed {malformed[0]}; it is damaged: use another checkpoint")
    try:
        state["config"] = config = upgrade_config(config)
    except ValueError as e:
        raise UserError(f"{what} {path} has a malformed config ({e}); it is damaged: use another checkpoint") from None
    if isinstance(state.get("sampling", {}).get("solver"), dict):
        state["sampling"]["solver"] = rename_targets(state["sampling"]["solver"])
    if builds:
        check_file_config(config, state.get("sampling"), Path(path), what, trusted)
    return state


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
