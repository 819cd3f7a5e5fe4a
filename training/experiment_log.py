"""EXPERIMENT_LOG.md: one entry per run, written when it starts (command, commit, machine, the ``note=``
and ``expect=`` of the command line), rewritten in place as results come in, and closed with its status
(``completed``, ``failed: ...``, ``interrupted at step N``), results, checkpoints and pictures.

Each entry sits between two HTML comments that carry its id (invisible in rendered markdown), so a run
rewrites its own entry and nothing else: earlier entries and hand-written text are never altered. Every
write holds an exclusive lock on a sidecar file (``.EXPERIMENT_LOG.md.lock``) around read, modify and
an atomic replace, so the jobs of a parallel sweep never lose an entry. A run killed outright
(SIGKILL, a lost node) cannot close its entry: it stays ``running``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = (
    "# Experiment log\n\nOne entry per launcher run, written when it starts, updated at every evaluation and "
    "closed with its status and results (training/experiment_log.py).\n"
)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
UNLOCKABLE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # file systems without flock (some NFS mounts)


def git_commit(log_path: Path, repo: Path = PROJECT_ROOT) -> str:
    """The short commit of ``repo``, with ``-dirty`` when a tracked file other than the experiment log
    itself has uncommitted changes (the log is rewritten by every run); ``unknown`` outside git."""
    exclude: list[str] = []
    with contextlib.suppress(ValueError):  # a log outside the repository changes nothing in it
        exclude = [f":(exclude){log_path.resolve().relative_to(repo.resolve())}"]
    try:
        sha = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class Entry:
    """One run's entry; ``render`` is its whole text, rewritten at each update."""

    path: Path  # the log file
    run_name: str
    started: datetime
    command: str
    commit: str
    machine: str
    note: str | None = None
    expect: str | None = None
    run_dir: Path | None = None
    evaluates: Path | None = None  # an eval-only run's checkpoint
    status: str = "running"
    step: int | None = None  # where the run stood at the last update, or ended
    metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation's, then the results
    scores_step: int | None = None  # the step of ``metrics`` while running
    checkpoints: list[Path] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)  # file names in run_dir, listed when closed
    duration_s: float | None = None  # set when closed
    uid: str = ""

    def __post_init__(self) -> None:
        self.uid = self.uid or f"{self.run_name}/{self.started:%Y%m%d-%H%M%S}/{os.getpid()}"

    def render(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        ended = f", ended at step {self.step}" if self.step is not None else ""
        lines = [
            f"<!-- run {self.uid} -->",
            f"## {self.started:%Y-%m-%d %H:%M:%S} · {self.run_name} · {(self.status.splitlines() or ['?'])[0]}",
            f"- command: `{self.command}`",
            f"- commit: `{self.commit}`",
            f"- machine: {self.machine}",
            *(f"- {key}: {_one_line(text)}" for key, text in (("note", self.note), ("expect", self.expect)) if text),
            *([f"- eval of: `{self.evaluates}`"] if self.evaluates is not None else []),
            f"- last update: {datetime.now():%Y-%m-%d %H:%M:%S}{at}"
            if self.duration_s is None
            else f"- duration: {self.duration_s:.1f} s{ended}",
            f"- checkpoints: {', '.join(f'`{p}`' for p in self.checkpoints) or 'none'}",
        ]
        if self.run_dir is not None:
            pictures = f" (pictures: {', '.join(self.pictures)})" if self.pictures else ""
            lines.append(f"- run folder: `{self.run_dir}`{pictures}")
        if self.metrics:
            title = "results" if self.duration_s is not None else f"latest scores (step {self.scores_step})"
            lines += ["", f"{title}:", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.6g} |" for k, v in sorted(self.metrics.items())]
        lines.append(f"<!-- /run {self.uid} -->")
        return "\n".join(lines) + "\n"

    def close(self, status: str, metrics: dict[str, float], step: int | None) -> None:
        """Write the run's end: its status, results (the latest scores, if it ended early) and duration."""
        self.status, self.step = status, step
        self.metrics = dict(metrics) or self.metrics
        self.duration_s = (datetime.now() - self.started).total_seconds()
        if self.run_dir is not None and self.run_dir.is_dir():
            self.pictures = sorted(p.name for p in self.run_dir.iterdir() if p.suffix in (".png", ".gif"))
        write(self)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def write(entry: Entry) -> None:
    """Put the entry in the log: in place of its earlier text (found by its id) or appended."""
    path = entry.path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        text = path.read_text(encoding="utf-8") if path.exists() else HEADER
        text = replace_block(text, entry.uid, entry.render())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def replace_block(text: str, uid: str, block: str) -> str:
    """``text`` with the entry ``uid`` replaced by ``block``; appended when it is not there whole."""
    begin, end = f"<!-- run {uid} -->", f"<!-- /run {uid} -->\n"
    start = text.rfind(begin)
    stop = text.find(end, start) if start >= 0 else -1
    if stop < 0:
        return text + ("" if text.endswith("\n") else "\n") + "\n" + block
    return text[:start] + block + text[stop + len(end) :]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside the log, held for the block (released on close)."""
    with path.with_name(f".{path.name}.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in UNLOCKABLE:
                raise
            log.warning("%s cannot be locked on this file system (%s): writing without a lock", path, e)
        yield
