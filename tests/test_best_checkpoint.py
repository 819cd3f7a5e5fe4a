"""checkpoint.keep_best (best.pt beside last.pt) and every model's early stopping, on tiny moons runs through
train(cfg): which checkpoint becomes best.pt, what it holds, that eval_checkpoint scores it, that a NaN never
replaces it, when a run stops early and that the count survives a resume; and Plateau, their shared bookkeeping.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from training.callbacks.early_stopping import Plateau, direction
from training.checkpoint import load_checkpoint
from training.errors import NonFiniteLossError, UserError
from training.train import train

ED4 = "eval/energy_distance@nfe4"


# --- Plateau ---------------------------------------------------------------------------------------


def test_plateau_counts_checks_in_a_row_that_do_not_beat_the_best_by_min_delta():
    p = Plateau("min", min_delta=0.1, patience=2)
    assert p.check(1.0, 10) and (p.best, p.best_step, p.misses) == (1.0, 10, 0)
    assert not p.check(0.95, 20) and p.misses == 1  # better, but not by more than min_delta
    assert p.check(0.8, 30) and p.misses == 0  # an improvement resets the count
    assert not p.check(math.nan, 40) and not p.check(0.75, 50) and p.exhausted
    up = Plateau("max")
    assert up.check(0.2, 1) and not up.check(0.1, 2) and up.check(0.3, 3) and up.best == 0.3
    restored = Plateau("min", 0.1, 2)
    restored.load_state_dict(p.state_dict())
    assert (restored.best, restored.best_step, restored.misses) == (0.8, 30, 2)
    with pytest.raises(ValueError, match="malformed"):
        restored.load_state_dict({"best": "0.1", "best_step": 3, "misses": 0})


def test_direction_maximises_scores_and_minimises_the_rest():
    assert direction("eval/clip_score@cfg3", "auto") == "max"
    assert direction("eval/fid@nfe10", "auto") == direction("train/loss", "auto") == "min"
    assert direction("eval/fid@nfe10", "max") == "max"


# --- keep_best -------------------------------------------------------------------------------------


def test_best_pt_holds_the_best_evaluation_and_eval_checkpoint_scores_it(make_cfg, recorder, tmp_path, caplog):
    caplog.set_level(logging.INFO, "training.callbacks.best_checkpoint")
    metrics, objects = train(make_cfg("epochs=3", "optimizer.lr=3e-2", f"checkpoint.keep_best={ED4}"))
    scored = recorder.values(ED4)
    assert [s for s, _ in scored] == [8, 16, 24]  # two evaluations during training, then the final one
    step, value = min(scored, key=lambda sv: sv[1])
    best_path = objects["checkpoint"].with_name("best.pt")
    best = load_checkpoint(best_path, "test")
    assert best["step"] == step and best["metrics"][ED4] == value
    assert best["config"]["checkpoint"]["keep_best"] == ED4
    assert f"best {ED4}={value:.5g} at step {step}" in caplog.text
    rescored, _ = train(make_cfg(f"eval_checkpoint={best_path}", "run_name=ev", f"paths.run_dir={tmp_path}/ev"))
    assert rescored[ED4] == value  # the same weights, sampled with the same seed


def test_best_pt_by_train_loss_is_chosen_at_log_points(make_cfg, recorder):
    _, objects = train(make_cfg("checkpoint.keep_best=train/loss", "trainer.log_every=2", "eval.every_epochs=0"))
    logged = recorder.values("train/loss")
    assert [s for s, _ in logged] == list(range(2, 17, 2))
    step, value = min(logged, key=lambda sv: sv[1])
    best = load_checkpoint(objects["checkpoint"].with_name("best.pt"), "test")
    assert best["step"] == step and best["metrics"]["train/loss"] == value


def test_a_nan_never_replaces_best_pt(make_cfg):
    """keep_best=train/loss at every step: the loss turns NaN at step 13; the best.pt of step 12 was still
    waiting for step 13's loss, so it is discarded and the one before stays, whole."""
    cfg = make_cfg("loss._target_=helpers.NaNAfter", "+loss.after=12", "checkpoint.keep_best=train/loss",
                   "trainer.log_every=1")  # fmt: skip
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    folder = Path(cfg.paths.ckpt_dir)
    best = load_checkpoint(folder / "best.pt", "test", builds=False)  # its loss is a test helper's
    assert best["step"] < 12 and math.isfinite(best["metrics"]["train/loss"])
    assert not list(folder.glob(".*.tmp"))


# --- early stopping --------------------------------------------------------------------------------


def test_early_stopping_ends_the_run_as_completed_with_the_reason(make_cfg, caplog):
    """train/loss checked every 2 steps; with min_delta=100 only the first check improves: patience 2 stops at
    step 6, before the first evaluation, so the final evaluation alone chooses best.pt."""
    caplog.set_level(logging.INFO, "training.trainer")
    metrics, objects = train(make_cfg("epochs=5", "trainer.log_every=2", "early_stopping.metric=train/loss",
                                      "early_stopping.min_delta=100", "early_stopping.patience=2",
                                      f"checkpoint.keep_best={ED4}"))  # fmt: skip
    trainer = objects["trainer"]
    assert trainer.step == 6 and metrics["train/steps"] == 6.0
    assert trainer.stop_reason.startswith("early stopping: train/loss has not improved on")
    assert "training stopped at step 6: early stopping: train/loss" in caplog.text
    assert load_checkpoint(objects["checkpoint"], "test")["step"] == 6  # completed: scored and saved
    best = load_checkpoint(objects["checkpoint"].with_name("best.pt"), "test")
    assert best["step"] == 6 and best["metrics"][ED4] == metrics[ED4]


def test_early_stopping_on_an_evaluation_survives_a_resume(make_cfg):
    """Evaluations at the end of epochs 1-5 (8 steps each); min_delta=10: only the first improves. The run
    stops at step 16 (max_steps) with one miss; the resumed run stops at its third miss, step 32."""
    common = ["epochs=6", f"early_stopping.metric={ED4}", "early_stopping.min_delta=10", "early_stopping.patience=3",
              "deterministic=true"]  # fmt: skip
    _, first = train(make_cfg(*common, "max_steps=16"))
    assert first["trainer"].stop_reason is None
    _, resumed = train(make_cfg(*common, "resume=true"))
    assert resumed["trainer"].step == 32 and resumed["trainer"].stop_reason.startswith(f"early stopping: {ED4}")


# --- refused settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpoint.keep_best=loss"], "checkpoint.keep_best='loss' is not valid: checkpoint.keep_best takes null or"),
        (["early_stopping.patience=0"], "early_stopping.patience=0 is not valid: early_stopping.patience takes an"),
        (["checkpoint.best_mode=up"], "checkpoint.best_mode='up' is not valid: checkpoint.best_mode takes auto | min"),
        (
            [f"early_stopping.metric={ED4}", "eval.every_epochs=0"],
            f"early_stopping.metric={ED4} is checked at the evaluations during training, but this run evaluates only",
        ),
    ],
)
def test_a_bad_setting_is_refused_before_any_work(make_cfg, tmp_path, overrides, message):
    with pytest.raises(UserError, match="^" + message.replace("|", r"\|").replace("(", r"\(")):
        train(make_cfg(*overrides))
    assert not (tmp_path / "outputs").exists()


def test_a_metric_the_run_does_not_produce_names_those_it_does(make_cfg):
    with pytest.raises(UserError) as e:
        train(make_cfg("checkpoint.keep_best=eval/fid@nfe4"))
    assert str(e.value).startswith(
        "checkpoint.keep_best=eval/fid@nfe4 is not among the metrics of this run's evaluation: "
        "eval/energy_distance@nfe1, eval/energy_distance@nfe4"
    )
    assert "\n" not in str(e.value)
