"""EXPERIMENT_LOG.md: an entry written when a run starts, rewritten in place at every evaluation, closed
with its status and results; a clean commit when only the log changed; parallel writers lose nothing."""

from __future__ import annotations

import multiprocessing
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from training.callbacks.base import Callback
from training.errors import NonFiniteLossError
from training.experiment_log import Entry, git_commit, write
from training.train import train


class CopyLog(Callback):
    """Copies the experiment log as it is at the start of each step in ``steps``, from inside the run."""

    def __init__(self, log: str, out: str, steps: list[int]):
        self.log, self.out, self.steps = Path(log), Path(out), steps

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        if trainer.step in self.steps:  # the previous step's after_step hooks (evaluation, entry) have run
            shutil.copy(self.log, self.out / f"step{trainer.step}.md")
        return {}


def entries(text: str) -> list[str]:
    return re.findall(r"<!-- run (\S+) -->", text)


def test_an_entry_is_written_at_the_start_updated_at_each_evaluation_and_closed(make_cfg, tmp_path):
    log = tmp_path / "EXPERIMENT_LOG.md"
    _, objects = train(make_cfg(
        "+adapter_training._target_=test_experiment_log.CopyLog", f"+adapter_training.log={log}",
        f"+adapter_training.out={tmp_path}", "+adapter_training.steps=[1,6]", "eval.every_epochs=0",
        "eval.every_steps=5", "checkpoint.every_steps=5", "max_steps=6", "note='first try: lr 1e-3'",
        "expect='energy distance < 1'",
    ))  # fmt: skip
    first, sixth, final = (tmp_path / "step1.md").read_text(), (tmp_path / "step6.md").read_text(), log.read_text()
    assert "test · running" in first and "- note: first try: lr 1e-3" in first
    assert "- expect: energy distance < 1" in first
    assert "- command: `python launcher.py run_name=test " in first and "\"note='first try: lr 1e-3'\"" in first
    assert re.search(r"- commit: `([0-9a-f]+(-dirty)?|unknown)`", first)
    assert "- machine: `" in first and ", cpu, torch " in first
    assert "latest scores" not in first and "- checkpoints: none" in first
    assert "test · running" in sixth and "latest scores (step 5):" in sixth and "| eval/energy_distance@nfe4 |" in sixth
    assert f"- checkpoints: `{objects['checkpoint']}`" in sixth  # written at step 5 (in place once step 6 was finite)
    assert "test · completed" in final and "results:" in final and "| train/steps | 6 |" in final
    assert f"`{objects['checkpoint']}`" in final and "ended at step 6" in final
    pictures = re.search(r"- run folder: `(.+)` \(pictures: (.+)\)", final)
    assert pictures and pictures[1] == str(tmp_path / "run")
    assert {"samples.png", "trajectories.png"} <= set(pictures[2].split(", "))
    assert len(entries(final)) == 1 and final.count("\n## ") == 1  # rewritten in place, never appended twice


def test_a_failed_run_closes_its_entry_and_leaves_earlier_ones_as_they_were(make_cfg, tmp_path):
    log = tmp_path / "EXPERIMENT_LOG.md"
    train(make_cfg("run_name=first", "max_steps=2"))
    before = log.read_text()
    with pytest.raises(NonFiniteLossError):
        train(make_cfg("loss._target_=helpers.NaNAfter", "+loss.after=12", "epochs=3"))
    text = log.read_text()
    assert text.startswith(before)
    assert "## " in text[len(before) :] and "test · failed: loss is nan at step 13" in text[len(before) :]


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)  # fmt: skip


def test_the_commit_is_clean_when_only_the_log_itself_changed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    (repo / "EXPERIMENT_LOG.md").write_text("# Experiment log\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "start")
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    log = repo / "EXPERIMENT_LOG.md"
    log.write_text("# Experiment log\n\nan entry\n")
    (repo / "new_untracked.txt").write_text("not part of the commit\n")
    assert git_commit(log, repo) == sha
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(log, repo) == f"{sha}-dirty"
    assert git_commit(tmp_path / "elsewhere.md", repo) == f"{sha}-dirty"
    assert git_commit(log, tmp_path / "not_a_repo") == "unknown"


def _writer(path: str, name: str, start: Any) -> None:
    entry = Entry(Path(path), name, datetime.now(), "python launcher.py", "abc", "here")
    start.wait()
    write(entry)
    for step in range(1, 6):
        entry.metrics, entry.scores_step, entry.step = {"eval/score": float(step)}, step, step
        write(entry)
    entry.close("completed", {"eval/score": 100.0, "train/steps": 5.0}, 5)


def test_parallel_runs_never_lose_an_entry(tmp_path):
    log = tmp_path / "EXPERIMENT_LOG.md"
    log.write_text("# my notes\n")
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(6)
    jobs = [ctx.Process(target=_writer, args=(str(log), f"job{i}", start)) for i in range(6)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    assert [job.exitcode for job in jobs] == [0] * 6
    text = log.read_text()
    assert text.startswith("# my notes\n")
    assert sorted(uid.split("/")[0] for uid in entries(text)) == [f"job{i}" for i in range(6)]
    assert text.count(" · completed") == 6 and text.count("| eval/score | 100 |") == 6 and "running" not in text
