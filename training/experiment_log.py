"""EXPERIMENT_LOG.md: one appended entry per launcher run; earlier entries are never rewritten."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

HEADER = "# Experiment log\n\nOne entry per launcher run, appended automatically (training/experiment_log.py).\n"


def git_commit() -> str:
    """Short commit hash, with ``-dirty`` when the tree has uncommitted changes; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def append_entry(
    path: Path,
    *,
    run_name: str,
    status: str,
    overrides: list[str],
    metrics: dict[str, float],
    checkpoint: Path | None,
    duration_s: float,
    started: datetime,
) -> None:
    lines = [
        f"\n## {started:%Y-%m-%d %H:%M:%S} · {run_name} · {status}\n",
        f"- commit: `{git_commit()}`",
        f"- command: `python launcher.py {' '.join(overrides)}`",
        f"- checkpoint: `{checkpoint}`" if checkpoint else "- checkpoint: none",
        f"- duration: {duration_s:.1f} s",
    ]
    if metrics:
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # exclusive create: of parallel sweep jobs, exactly one writes the header
        with path.open("x", encoding="utf-8") as f:
            f.write(HEADER)
    except FileExistsError:
        pass
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
