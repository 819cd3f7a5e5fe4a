"""The end of a multirun: one row per job in ``summary.md`` and ``summary.csv`` in the sweep directory.

``SweepSummary`` is a Hydra callback, registered in configs/hydra/default.yaml. Every job directory
holds ``.hydra/`` (its number and overrides), ``metrics.json`` when the run completed and
``failed.txt`` (the one-line error, written by launcher.py) when it failed. The callback reads them
from disk, so it sees the same thing whichever launcher ran the jobs (in this process, joblib
workers, SLURM nodes), and ends the process with status 1 when any job failed.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

FAILED_FILE = "failed.txt"
METRICS_FILE = "metrics.json"
SUMMARY_COLUMNS = ("job", "run_name", "status", "overrides", "error")


def job_run_name(run_name: str, num: int) -> str:
    """A sweep job's run_name: jobs must not share a checkpoint folder or trackio run."""
    return f"{run_name}_{num}"


def maximizes(direction: Any) -> bool:
    """Whether a sweeper's ``direction`` (``maximize``, or Optuna's ``Direction.maximize``) maximises."""
    return str(direction).endswith("maximize")


def record_failure(run_dir: Path, message: str) -> None:
    """Mark a job as failed; its first line is what the summary shows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).write_text(message.strip() + "\n", encoding="utf-8")


@dataclass
class JobResult:
    num: int
    run_name: str
    overrides: list[str]
    status: str  # completed | failed | no metrics (returned without metrics.json, e.g. backend=modal)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def read_job(job_dir: Path) -> JobResult:
    hydra_cfg = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra
    task = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    num = int(hydra_cfg.job.num)
    run_name = job_run_name(str(task.run_name), num) if not OmegaConf.is_missing(task, "run_name") else "?"
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    metrics_path, failed_path = job_dir / METRICS_FILE, job_dir / FAILED_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if failed_path.exists():
        error = (failed_path.read_text(encoding="utf-8").splitlines() or [""])[0]
        return JobResult(num, run_name, overrides, "failed", error, metrics)
    return JobResult(num, run_name, overrides, "completed" if metrics else "no metrics", metrics=metrics)


def collect(sweep_dir: Path) -> list[JobResult]:
    """Every job under ``sweep_dir`` (any ``hydra.sweep.subdir`` pattern), by job number."""
    jobs = [read_job(p.parent.parent) for p in sweep_dir.glob("**/.hydra/hydra.yaml")]
    return sorted(jobs, key=lambda j: j.num)


def metric_columns(jobs: list[JobResult], optimized_metric: str | None) -> list[str]:
    keys = {k for j in jobs for k in j.metrics if k.startswith("eval/")}
    columns = sorted(keys) + ["train/final_loss"]
    return columns + [optimized_metric] if optimized_metric and optimized_metric not in columns else columns


def varying_overrides(jobs: list[JobResult]) -> dict[int, list[str]]:
    """Each job's overrides that not every job shares: what the sweep changed (all of them for one job)."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()
    return {j.num: [o for o in j.overrides if o not in common] for j in jobs}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def best_job(jobs: list[JobResult], metric: str, maximize: bool) -> JobResult | None:
    scored = [j for j in jobs if j.status == "completed" and isinstance(j.metrics.get(metric), (int, float))]
    pick = max if maximize else min
    return pick(scored, key=lambda j: j.metrics[metric]) if scored else None


def shown_columns(jobs: list[JobResult], columns: list[str], keep: set[str]) -> list[str]:
    """The markdown's metric columns: settings every completed job shares (eval/seed ...) are left to the CSV."""
    done = [j for j in jobs if j.status == "completed"]
    if len(done) < 2:
        return columns
    return [c for c in columns if c in keep or len({repr(j.metrics.get(c)) for j in done}) > 1]


def write_summary(
    jobs: list[JobResult], sweep_dir: Path, optimized_metric: str | None = None, maximize: bool = False
) -> tuple[Path, Path]:
    """``summary.csv`` (every column) and ``summary.md`` (a table, the best job, the failures)."""
    columns = metric_columns(jobs, optimized_metric)
    changed = varying_overrides(jobs)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*SUMMARY_COLUMNS, *columns])
        for j in jobs:
            writer.writerow(
                [j.num, j.run_name, j.status, " ".join(changed[j.num]), j.error, *map(j.metrics.get, columns)]
            )

    metric = optimized_metric or next((c for c in columns if c.startswith("eval/energy_distance@")), None)
    shown = shown_columns(jobs, columns, {"train/final_loss", *([metric] if metric else [])})
    header = ["job", "run_name", "status", "overrides", *shown]
    counts = Counter(j.status for j in jobs)
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        ", ".join(f"{n} {status}" for status, n in counts.items()) + f" of {len(jobs)} jobs.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for j in jobs:
        cells = [str(j.num), j.run_name, j.status, " ".join(changed[j.num])] + [_cell(j.metrics.get(c)) for c in shown]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    best = best_job(jobs, metric, maximize) if metric else None
    if best is not None and metric is not None:
        lines += [
            "",
            f"Best {metric} ({'highest' if maximize else 'lowest'}): job {best.num} ({best.run_name}), "
            f"{_cell(best.metrics[metric])}, with {' '.join(changed[best.num]) or 'no overrides'}.",
        ]
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        lines += ["", "## Failures", ""] + [f"- job {j.num} ({j.run_name}): {j.error}" for j in failed]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md_path, csv_path


class SweepSummary(Callback):
    """Writes the sweep's summary at the end of a multirun; exits 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect(sweep_dir)
        if not jobs:
            return
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default="minimize")
        md_path, csv_path = write_summary(
            jobs, sweep_dir, config.get("optimized_metric"), maximize=maximizes(direction)
        )
        failed = [j for j in jobs if j.status == "failed"]
        print(f"sweep summary: {md_path} and {csv_path.name} ({len(jobs)} jobs, {len(failed)} failed)")
        if failed:
            for j in failed:
                print(f"error: job {j.num} ({j.run_name}) failed: {j.error}", file=sys.stderr)
            sys.exit(1)
