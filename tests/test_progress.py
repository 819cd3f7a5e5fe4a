"""Training progress: off a terminal (pipes, nohup, SLURM, Modal logs) a line every ``log_every`` steps
and at least every ``trainer.progress_seconds``; in a terminal a bar that moves every step without
reading the loss back from the device every step."""

from __future__ import annotations

import logging
import re

import pytest

from training.errors import UserError
from training.progress import Position, Progress
from training.train import train

LINE = re.compile(
    r"^step (\d+)/16 \(epoch (\d)/2\) loss (\d+\.\d{4}) lr \d\.\d\de[-+]\d\d [\d.e+]+ it/s "
    r"ETA (\d\d:)?\d\d:\d\d epoch, (\d\d:)?\d\d:\d\d run$"
)


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    lines = [r.getMessage() for r in caplog.records if r.name == "training.progress"]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return matches  # type: ignore[return-value]


def test_off_a_terminal_a_line_every_log_every_steps(make_cfg, caplog):
    caplog.set_level(logging.INFO, logger="training.progress")
    train(make_cfg("trainer.log_every=4", "trainer.progress_seconds=1e9"))  # 2 epochs of 8 steps
    lines = progress_lines(caplog)
    assert [(int(m[1]), int(m[2])) for m in lines] == [(4, 1), (8, 1), (12, 2), (16, 2)]
    assert all(0 < float(m[3]) < 100 for m in lines)


def test_off_a_terminal_a_line_at_least_every_progress_seconds(make_cfg, caplog):
    """No log point in sight (log_every beyond the run): the time alone brings the lines, each with the
    mean loss of the steps not read back yet (the losses are read at the end of each epoch of 8 steps)."""
    caplog.set_level(logging.INFO, logger="training.progress")
    _, objects = train(make_cfg("trainer.log_every=1000", "trainer.progress_seconds=1e-6"))
    lines = progress_lines(caplog)
    assert [int(m[1]) for m in lines] == list(range(1, 17))
    losses = objects["trainer"].losses
    windows = [losses[8 * ((step - 1) // 8) : step] for step in range(1, 17)]
    assert [float(m[3]) for m in lines] == pytest.approx([sum(w) / len(w) for w in windows], abs=1e-4)


def test_a_terminal_gets_a_bar_that_reads_the_loss_back_only_now_and_then(capsys):
    reads = []

    def read_loss() -> float:
        reads.append(1)
        return 0.25

    progress = Progress(total=40, epochs=2, steps_per_epoch=20, start_step=0, log_every=20, every_seconds=30,
                        enabled=True, terminal=True)  # fmt: skip
    for step in range(1, 41):
        progress.update(Position(step, (step - 1) // 20, (step - 1) % 20 + 1, 1e-3), read_loss)
    progress.close()
    bar = capsys.readouterr().err
    assert "40/40" in bar and "loss=0.2500" in bar and "epoch 2/2 ETA" in bar
    assert len(reads) < 10  # the first step, the log points (20, 40), each second: no device sync per step


def test_ranks_other_than_0_show_nothing(capsys, caplog):
    caplog.set_level(logging.INFO, logger="training.progress")
    for terminal in (True, False):
        progress = Progress(total=4, epochs=1, steps_per_epoch=4, start_step=0, log_every=1, every_seconds=1e-6,
                            enabled=False, terminal=terminal)  # fmt: skip
        for step in range(1, 5):
            progress.update(Position(step, 0, step, 1e-3), lambda: 1.0)
        progress.close()
    assert capsys.readouterr().err == "" and not caplog.records


def test_progress_seconds_must_be_positive(make_cfg):
    with pytest.raises(UserError, match=r"^trainer.progress_seconds=0 is not valid: .* takes a number of seconds > 0"):
        train(make_cfg("trainer.progress_seconds=0"))
