"""What every run leaves behind, training or eval-only: a valid run name, metrics.json, the experiment
log entry, and the score table the launcher prints."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training import distributed
from training.errors import UserError
from training.experiment_log import append_entry

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


def log_entry(
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
