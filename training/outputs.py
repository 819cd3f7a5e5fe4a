"""What every run leaves behind, training or eval-only: a valid run name, metrics.json, the experiment
log entry (as it starts; training/experiment_log.py keeps it), and the score table the launcher prints."""

from __future__ import annotations

import json
import re
import shlex
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from training.errors import UserError
from training.experiment_log import Entry, git_commit

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def new_entry(cfg: DictConfig, run_name: str, device: torch.device, started: datetime, processes: int = 1) -> Entry:
    """The run's experiment log entry as it starts: the command that reproduces it (a sweep job's own
    ``run_name``), the commit, the machine, the ``note=`` and ``expect=`` of the command line."""
    overrides = [str(o) for o in cfg.get("overrides") or []]
    overrides = [f"run_name={run_name}" if o.startswith("run_name=") else o for o in overrides] or [
        f"run_name={run_name}"
    ]
    path = Path(cfg.paths.experiment_log)
    return Entry(
        path,
        run_name,
        started,
        command=" ".join(["python", "launcher.py", *map(shell_word, overrides)]),
        commit=git_commit(path),
        machine=machine(device, processes),
        note=cfg.get("note"),
        expect=cfg.get("expect"),
        run_dir=Path(cfg.paths.run_dir),
    )


def shell_word(arg: str) -> str:
    """``arg`` as a shell reads it back: Hydra's quoted values (``note='two words'``) in double quotes."""
    if "'" in arg and not re.search(r'["$`\\!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def machine(device: torch.device, processes: int = 1) -> str:
    """Where a run ran: host, device (with the GPU's name) and the process count."""
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    each = f", {processes} processes" if processes > 1 else ""
    return f"`{socket.gethostname()}`, {device}{name}{each}, torch {torch.__version__}"


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
