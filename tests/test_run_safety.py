"""Runs you can trust: one writer per run, stops that keep the current step, NaNs that lose nothing,
failed saves that keep the previous file, and one line for every bad setting, with nothing written.

Stop signals are real: ``helpers.SignalAt`` (an adapter callback) sends them to this process at a
known step, as SLURM or a Modal shutdown would from outside.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_scripts import ROOT
from training.callbacks.stopping import RunControl
from training.checkpoint import load_checkpoint, remove_stale_temps, save_checkpoint
from training.compose import compose_config
from training.errors import NonFiniteLossError, RunInterrupted, UserError
from training.run_lock import RunLock
from training.train import train

CKPT = ("outputs", "ckpts", "mlp")
SIGNAL_AT = ("+adapter_training._target_=helpers.SignalAt", "+adapter_training.step=11")


def last(tmp_path: Path, run: str = "test") -> Path:
    return tmp_path.joinpath(*CKPT, run, "last.pt")


# --- one writer per run --------------------------------------------------------------------------


HOLD = """
import sys, time
from pathlib import Path
from training.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]), "test").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_stale_lock(make_cfg, tmp_path):
    _, objects = train(make_cfg())
    path = objects["checkpoint"]
    before = path.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path.parent)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ((), ("overwrite=true",), ("resume=true", "epochs=3")):
            with pytest.raises(UserError, match=rf"^run 'test' is being written by another process \(pid "
                                                rf"{holder.pid} on .*\); wait for it to finish, stop it"):  # fmt: skip
                train(make_cfg(*extra))
        assert path.read_bytes() == before  # overwrite=true beside a live run deleted nothing
    finally:
        holder.kill()  # kill -9: the kernel drops its lock with it
        holder.wait()
    metrics, _ = train(make_cfg("resume=true", "epochs=3"))
    assert metrics["train/steps"] == 24


def test_the_lock_of_one_process_refuses_another_open_of_it(tmp_path):
    first = RunLock(tmp_path / "run", "r").acquire()
    with pytest.raises(UserError, match=r"is being written by another process \(pid \d+ on "):
        RunLock(tmp_path / "run", "r").acquire()
    first.release()
    RunLock(tmp_path / "run", "r").acquire().release()
    assert not (tmp_path / "run").exists()  # a lock that guarded nothing leaves no folder


def test_two_runs_started_in_the_same_second_get_two_run_folders(tmp_path):
    cmd = [sys.executable, "launcher.py", "run_name=same", "epochs=0", f"paths.root={tmp_path}"]  # refused at once
    runs = [subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.communicate()[1].strip().splitlines()[-1] for p in runs] == [
        "error: epochs=0 is not valid: epochs takes an integer >= 1"
    ] * 2
    folders = sorted((tmp_path / "runs" / "same").iterdir())
    assert len(folders) == 2 and all((f / ".hydra" / "config.yaml").is_file() for f in folders)


# --- stop signals ----------------------------------------------------------------------------------


def test_sigterm_checkpoints_the_current_step_and_the_resumed_run_matches_an_uninterrupted_one(make_cfg, tmp_path):
    common = ("epochs=3", "deterministic=true")
    full = train(make_cfg(*common, "run_name=full"))
    with pytest.raises(RunInterrupted) as e:
        train(make_cfg(*common, "run_name=test", *SIGNAL_AT))
    assert str(e.value) == (
        f"interrupted by SIGTERM at step 11: {last(tmp_path)} holds it; resume with: "
        "python launcher.py run_name=test resume=true"
    )
    assert e.value.exit_code == 143
    assert load_checkpoint(last(tmp_path), builds=False)["step"] == 11
    assert "test · interrupted at step 11 (SIGTERM)" in (tmp_path / "EXPERIMENT_LOG.md").read_text()
    resumed = train(make_cfg(*common, "run_name=test", *SIGNAL_AT, "resume=true"))
    for a, b in zip(full[1]["model"].parameters(), resumed[1]["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full[1]["ema"].module.parameters(), resumed[1]["ema"].module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed[1]["trainer"].losses == full[1]["trainer"].losses[11:]


def test_a_second_ctrl_c_stops_at_once_with_one_line(make_cfg, tmp_path):
    message = (
        r"^stopped at once at step 11 by a second Ctrl-C; .*last.pt holds the last checkpoint written; resume with: "
    )
    with pytest.raises(RunInterrupted, match=message + "python launcher.py run_name=test"):
        train(make_cfg("epochs=3", *SIGNAL_AT, "+adapter_training.signals=[SIGINT,SIGINT]"))
    assert load_checkpoint(last(tmp_path), builds=False)["step"] == 8  # the epoch-1 checkpoint; step 11 was not written
    assert "interrupted at step 11 (stopped at once)" in (tmp_path / "EXPERIMENT_LOG.md").read_text()


def test_the_signal_handler_restores_the_previous_one_and_a_second_sigint_raises():
    before = signal.getsignal(signal.SIGTERM)
    with RunControl(None) as control:
        control._handle(signal.SIGINT, None)
        assert control.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            control._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_launcher_prints_the_resume_line_and_exits_143_on_sigterm(tmp_path):
    done = subprocess.run(
        [sys.executable, "launcher.py", "run_name=cli", "device=cpu", "trackio.enabled=false", "epochs=3",
         "dataloaders.num_train=1024", "dataloaders.batch_size=128", "eval.nfe=[1]", "eval.num_samples=64",
         f"paths.root={tmp_path}/outputs", f"paths.experiment_log={tmp_path}/log.md", *SIGNAL_AT],
        cwd=ROOT, env={"PYTHONPATH": f"{ROOT}/tests", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: interrupted by SIGTERM at step 11: {last(tmp_path, 'cli')} holds it; resume with: "
        "python launcher.py run_name=cli resume=true"
    )


def test_every_minutes_checkpoints_inside_a_long_epoch(make_cfg, tmp_path):
    # a whole run in one epoch, no epoch checkpoint before a Ctrl-C pair ends it at step 11
    with pytest.raises(RunInterrupted):
        train(make_cfg("epochs=1", "dataloaders.num_train=2048", "checkpoint.every_minutes=1e-9", *SIGNAL_AT,
                       "+adapter_training.signals=[SIGINT,SIGINT]"))  # fmt: skip
    assert (
        load_checkpoint(last(tmp_path), builds=False)["step"] == 9
    )  # written at step 9, good once step 10's loss was finite


def test_a_preempted_modal_container_fails_its_call_so_the_retry_resumes(tmp_path, monkeypatch):
    pytest.importorskip("modal")
    from tests.test_modal import SMALL
    from training import modal_backend as mb

    monkeypatch.setattr(mb, "VOLUME_MOUNT", str(tmp_path))
    monkeypatch.setattr(mb, "commit_volume", lambda name: None)  # no Volume here: the folder is it
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    spec = mb.ModalSpec.from_config(compose_config(["run_name=r", "backend=modal"]).backend)
    overrides = mb.container_overrides(["run_name=pre", *SMALL, "max_steps=20", "trackio.enabled=false",
                                        "+adapter_training._target_=helpers.SignalAt",
                                        "+adapter_training.step=3"], spec)  # fmt: skip
    with pytest.raises(RunInterrupted):
        mb.remote_train(overrides)
    result = mb.remote_train(overrides)  # Modal's retry of the call
    assert result.error is None and result.metrics["train/steps"] == 8  # 1024 / 128 = 8 steps in the epoch


# --- NaN ---------------------------------------------------------------------------------------------


def test_rollback_reloads_the_last_good_checkpoint_lowers_the_lr_and_finishes(make_cfg, tmp_path):
    metrics, objects = train(make_cfg("loss._target_=helpers.NaNOnce", "+loss.at=11", "nan_policy=rollback",
                                      "optimizer.lr=1e-3", "epochs=3"))  # fmt: skip
    trainer = objects["trainer"]
    assert trainer.rollbacks == 1 and trainer.step == 24 and metrics["train/steps"] == 24
    assert trainer.lr_schedule.base_lrs == [pytest.approx(0.5e-3)]
    assert all(torch.isfinite(p).all() for p in objects["model"].parameters())
    assert load_checkpoint(last(tmp_path), builds=False)["rollbacks"] == 1  # a resume keeps the lowered LR


def test_a_checkpoint_is_last_pt_only_once_its_weights_gave_a_finite_loss(make_cfg, tmp_path):
    """lr=1e5 diverges within a few steps: what is kept must train on without a NaN."""
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step (\d+)") as e:
        train(make_cfg("optimizer.lr=1e5", "checkpoint.every_steps=1"))
    bad_step = int(str(e.value).split("step ")[1].split()[0])
    kept = load_checkpoint(last(tmp_path), builds=False)["step"]
    assert kept == bad_step - 2  # step bad-1's weights made the inf: their checkpoint never became last.pt
    assert [p.name for p in last(tmp_path).parent.iterdir() if p.name.endswith(".tmp")] == []
    metrics, _ = train(make_cfg("optimizer.lr=1e5", "resume=true", f"max_steps={kept + 1}"))
    assert metrics["train/steps"] == kept + 1  # the kept weights' own step is finite


def test_rollback_gives_up_after_its_limit_in_one_line(make_cfg):
    with pytest.raises(
        NonFiniteLossError,
        match=r"^loss is inf at step \d+ \(epoch \d\) again after 2 rollback\(s\) "
        r"\(trainer.max_rollbacks=2, .*\); the last good checkpoint is kept",
    ):
        train(make_cfg("optimizer.lr=1e6", "nan_policy=rollback", "trainer.max_rollbacks=2"))


def test_skip_has_a_limit_of_consecutive_skips(make_cfg):
    with pytest.raises(
        NonFiniteLossError,
        match=r"^the loss was non-finite for 3 batches in a row at step 13 "
        r"\(nan_policy=skip, trainer.max_consecutive_skips=3\)",
    ):
        train(make_cfg("loss._target_=helpers.NaNAfter", "+loss.after=12", "nan_policy=skip",
                       "trainer.max_consecutive_skips=3"))  # fmt: skip


# --- disk and leftovers ---------------------------------------------------------------------------------


def test_a_save_past_the_file_size_limit_is_one_line_and_keeps_the_previous_file(make_cfg):
    """A real write failure: RLIMIT_FSIZE makes the kernel refuse the bytes (EFBIG), as a full disk would."""
    _, objects = train(make_cfg())
    path = objects["checkpoint"]
    state = load_checkpoint(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, hard))
    try:
        with pytest.raises(UserError) as e:
            save_checkpoint({**state, "step": 999}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"could not write checkpoint {path} (")
    assert f"MiB free in {path.parent}: free some space (the previous checkpoint there is intact) and resume" in message
    assert load_checkpoint(path)["step"] == state["step"]
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_stale_temp_files_of_killed_saves_are_removed_on_resume(make_cfg):
    _, objects = train(make_cfg())
    folder = objects["checkpoint"].parent
    stale = [folder / ".last.pt.4242.tmp", folder / ".last.pt.pending.tmp", folder / "archive" / ".epoch_0003.pt.1.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    train(make_cfg("resume=true", "epochs=3"))
    assert not any(p.exists() for p in stale)
    assert remove_stale_temps(folder) == []


# --- the rest of the catalogue: one line each, before any work, nothing written -------------------------


def invalid(key: str, value: str, takes: str) -> tuple[str, str]:
    return f"{key}={value.strip(chr(39))}", f"{key}={value} is not valid: {key} takes {takes}"


@pytest.mark.parametrize(
    "override, message",
    [
        invalid("dataloaders.batch_size", "0", "an integer >= 1"),
        invalid("dataloaders.batch_size", "-4", "an integer >= 1"),
        invalid("trainer.grad_accum", "0", "an integer >= 1"),
        invalid("epochs", "'abc'", "an integer >= 1"),
        invalid("epochs", "0", "an integer >= 1"),
        invalid("max_steps", "-3", "null or an integer >= 1"),
        invalid("nan_policy", "'ignore'", "stop | skip | rollback"),
        invalid("trainer.ema_decay", "2", "a number in [0, 1), e.g. 0.999"),
        invalid("checkpoint.every_epochs", "0", "an integer >= 1"),
        (
            "dataloaders.batch_size=2048",
            "dataloaders config is invalid: batch_size=2048 exceeds the 1024 training samples; "
            "lower batch_size or raise num_train",
        ),
        (
            "run_name=../../escape",
            "run_name='../../escape' may hold only letters, digits, '_', '.' and '-' (it becomes a folder name)",
        ),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(make_cfg, tmp_path, override, message):
    with pytest.raises(UserError) as e:
        train(make_cfg(override))
    assert str(e.value) == message
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "EXPERIMENT_LOG.md").exists()


def test_an_image_folder_too_small_to_hold_one_out_is_one_line(make_cfg, tmp_path):
    from PIL import Image

    root = tmp_path / "five"
    root.mkdir()
    for i in range(5):
        Image.new("RGB", (12, 10), (40 * i, 0, 0)).save(root / f"{i}.png")
    with pytest.raises(
        UserError, match=r"^dataloaders config is invalid: 4 training images but batch_size=8; lower batch_size"
    ):
        train(make_cfg("model=unet", "dataloaders=folder", f"dataloaders.root={root}", "debug=smoke"))
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_the_chaos_script_loses_nothing(tmp_path):
    done = subprocess.run([sys.executable, "scripts/chaos.py", "--stops", "4", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.strip("| ").split(" | ", 1) for line in done.stdout.splitlines() if line.startswith("| ")]
    table = {k.strip(): v.strip(" |") for k, v in rows}
    assert table["checkpoints unloadable"] == "0"
    assert table["final weights equal to the uninterrupted run"] == "yes"
    assert "is corrupted" in table["corrupted last.pt on resume"]
