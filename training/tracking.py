"""Experiment tracking with trackio (local SQLite under ``TRACKIO_DIR``)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """Does nothing: what a run with ``trackio.enabled=false`` logs to."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class TrackioTracker(Tracker):
    """One trackio run named after the run; resumes the same trackio run on ``resume=true``.

    ``overwrite`` first deletes earlier trackio runs of that name (trackio would otherwise keep
    them beside the new one, and a dashboard would show two runs called the same).
    """

    def __init__(
        self,
        project: str,
        run_name: str,
        config: dict[str, Any],
        resume: bool,
        system_metrics: bool,
        overwrite: bool = False,
    ):
        import trackio  # imported here: it loads a web stack that runs without tracking never need
        from trackio.sqlite_storage import SQLiteStorage

        self._trackio = trackio
        if overwrite and SQLiteStorage.get_project_db_path(project).exists():
            for record in SQLiteStorage.get_run_records(project):
                if record["name"] == run_name:
                    SQLiteStorage.delete_run(project, run_name, run_id=record.get("id"))
        trackio.init(
            project=project,
            name=run_name,
            config=config,
            resume="allow" if resume else "never",
            auto_log_cpu=system_metrics,
            auto_log_gpu=system_metrics,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._trackio.log(metrics, step=step)

    def finish(self) -> None:
        self._trackio.finish()


def make_tracker(
    enabled: bool,
    project: str,
    run_name: str,
    config: dict[str, Any],
    resume: bool,
    system_metrics: bool = False,
    overwrite: bool = False,
) -> Tracker:
    if not enabled:
        return Tracker()
    return TrackioTracker(project, run_name, config, resume, system_metrics, overwrite)
