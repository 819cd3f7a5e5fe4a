"""Parameter groups by name, the 8-bit AdamW guard, and step-based checkpoints and evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training import run as run_module
from training.callbacks import checkpointing
from training.checkpoint import load_checkpoint
from training.errors import UserError
from training.optim import param_groups
from training.train import train


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))


def test_rules_set_options_and_freeze_and_the_rest_keeps_the_defaults():
    model = mlp()
    groups = param_groups(model, [{"pattern": r"^0\.", "lr": 1e-5}, {"pattern": r"^2\.bias", "freeze": True}])
    assert [len(g["params"]) for g in groups] == [2, 1]
    assert groups[0]["lr"] == 1e-5 and "lr" not in groups[1]
    assert not model[2].bias.requires_grad and model[2].weight.requires_grad
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-3]
    plain = mlp()
    (only,) = param_groups(plain, [])  # no rules: one group of every parameter, as before
    assert [id(p) for p in only["params"]] == [id(p) for p in plain.parameters()] and set(only) == {"params"}


@pytest.mark.parametrize(
    "rules, message",
    [([{"lr": 1.0}], "needs a 'pattern'"), ([{"pattern": "("}], "not a regular expression"),
     ([{"pattern": "^text_encoder", "lr": 1.0}], "matches no trainable parameter")],
)  # fmt: skip
def test_bad_rules_are_one_line_errors(rules, message):
    with pytest.raises(ValueError, match=message):
        param_groups(mlp(), rules)


def test_param_groups_reach_the_optimizer_through_the_config(make_cfg):
    _, objects = train(make_cfg("+param_groups=[{pattern: '^net.0', freeze: true}]", "epochs=1"))
    model = objects["model"]
    assert not model.net[0].weight.requires_grad
    assert len(objects["trainer"].optimizer.param_groups) == 1
    with pytest.raises(UserError, match="matches no trainable parameter"):
        train(make_cfg("+param_groups=[{pattern: '^transformer', lr: 1e-5}]", "run_name=other"))


def test_checkpoints_and_evaluation_every_n_steps_mid_epoch(make_cfg, monkeypatch):
    """8 steps an epoch, checkpoint every 3 steps: after a 5-step run last.pt is from step 3, mid-epoch."""
    cfg = make_cfg("epochs=1", "max_steps=5", "checkpoint.every_steps=3", "checkpoint.every_epochs=1",
                   "eval.every_steps=2", "eval.every_epochs=0")  # fmt: skip
    cfg.trackio.enabled = False
    metrics, objects = train(cfg)
    state = load_checkpoint(objects["checkpoint"], "test")
    assert state["step"] == 5  # the final checkpoint
    assert "eval/energy_distance@nfe1" in state["metrics"]
    saved = []
    original = checkpointing.save_checkpoint

    def record(state, path, shown=None):
        saved.append((state["step"], state["batch_in_epoch"]))
        original(state, path, shown)

    monkeypatch.setattr(checkpointing, "save_checkpoint", record)
    train(make_cfg("epochs=1", "max_steps=5", "checkpoint.every_steps=3", "run_name=mid", "eval.every_steps=0"))
    assert saved[0] == (3, 3)  # mid-epoch: a resume starts on batch 4


def test_a_group_with_its_own_grad_clip_is_clipped_and_logged_on_its_own(make_cfg, monkeypatch) -> None:
    """Per-group clipping is generic: a param_groups rule may set ``grad_clip`` (and a ``name`` for the log)."""
    rows: list[dict[str, float]] = []

    class Recorder:
        def log(self, metrics: dict[str, float], step: int) -> None:
            rows.append(dict(metrics))

        def finish(self) -> None:
            pass

    monkeypatch.setattr(run_module, "make_tracker", lambda *a, **k: Recorder())
    cfg = make_cfg("max_steps=4", "trainer.log_every=2", "trainer.grad_clip=null",
                   "param_groups=[{pattern: '^net\\.0\\.', grad_clip: 1e-6, name: first}]")  # fmt: skip
    _, objects = train(cfg)
    assert [g["name"] for g in objects["trainer"].optimizer.param_groups[:1]] == ["first"]
    logged = [r for r in rows if "train/loss" in r][-1]
    assert logged["train/grad_norm_post_clip/first"] == pytest.approx(1e-6)
    assert logged["train/grad_norm_pre_clip/first"] > 1e-6
    rest = logged["train/grad_norm_pre_clip/group1"]  # no grad_clip of its own: trainer.grad_clip (null), measured
    assert logged["train/grad_norm_post_clip/group1"] == rest
    assert logged["train/grad_norm_pre_clip"] == pytest.approx(
        (logged["train/grad_norm_pre_clip/first"] ** 2 + rest**2) ** 0.5
    )
