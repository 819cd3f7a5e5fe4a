"""Checkpoints written before a class moved keep working: their stored config is read in today's names
(training/upgrade.py) before it is checked as untrusted data, so they re-score and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_object

from training.checkpoint import load_checkpoint, save_checkpoint
from training.errors import UserError
from training.train import train
from training.trusted import allowed_targets
from training.upgrade import RENAMED_TARGETS, upgrade_config

OLD_ENERGY = "evaluation.sample_eval.EnergyDistanceEval"
OLD_ADAPTER = {"_target_": "adapters.clip_training.ClipAdapterTraining", "phase": "adapter_only"}


@pytest.mark.parametrize("old", sorted(RENAMED_TARGETS))
def test_every_renamed_target_is_one_configs_builds_today(old):
    new = RENAMED_TARGETS[old]
    assert new in allowed_targets() and old not in allowed_targets()
    assert get_object(new) is not None


@pytest.fixture
def old_checkpoint(make_cfg) -> Path:
    """A run's last.pt as the code before the moves wrote it: the old evaluator name, the group ``adapter``
    with the old name of its class (only rebuilt runs of the CLIP adapter had one; its node is data here)."""
    cfg = make_cfg("epochs=2")
    cfg.trackio.enabled = False
    _, objects = train(cfg)
    path: Path = objects["checkpoint"]
    state = torch.load(path, weights_only=True)
    state["config"]["eval"]["_target_"] = OLD_ENERGY
    state["config"]["adapter"] = OLD_ADAPTER
    save_checkpoint(state, path)
    return path


def test_an_old_checkpoint_loads_in_todays_names(old_checkpoint):
    config = load_checkpoint(old_checkpoint)["config"]
    assert config["eval"]["_target_"] == RENAMED_TARGETS[OLD_ENERGY]
    assert "adapter" not in config
    assert config["adapter_training"] == {**OLD_ADAPTER, "_target_": RENAMED_TARGETS[OLD_ADAPTER["_target_"]]}


def test_an_old_checkpoint_rescores_and_resumes(old_checkpoint, make_cfg, tmp_path):
    scored, _ = train(make_cfg(f"eval_checkpoint={old_checkpoint}", "run_name=ev", f"paths.run_dir={tmp_path}/ev"))
    assert scored["eval/energy_distance@nfe1"] > 0
    before = load_checkpoint(old_checkpoint)["step"]
    resumed = make_cfg("epochs=3", "resume=true")
    resumed.trackio.enabled = False
    metrics, _ = train(resumed)
    assert metrics["train/steps"] > before


def test_an_old_loss_with_a_crafted_mu_is_one_line(old_checkpoint):
    state = torch.load(old_checkpoint, weights_only=True)
    loss = {k: v for k, v in state["config"]["loss"].items() if k not in ("path", "time_sampler")}
    state["config"]["loss"] = {**loss, "_target_": "losses.meanflow.MeanFlowLoss", "mu": "not a number"}
    save_checkpoint(state, old_checkpoint)
    with pytest.raises(UserError, match=r"has a malformed config \(its loss.mu is 'not a number', not a number\)"):
        load_checkpoint(old_checkpoint)


@pytest.mark.parametrize("old", ["use_checkpoint", "gradient_checkpointing"])
def test_the_old_names_of_activation_checkpointing_become_todays(old):
    """GLIDE's and SDXL's names for the switch, as their checkpoints stored them."""
    model = {"_target_": "models.glide.GlideUNet", old: True, "num_channels": 192}
    upgraded = upgrade_config({"model": model})["model"]
    assert upgraded == {"_target_": "models.glide.GlideUNet", "activation_checkpointing": True, "num_channels": 192}
    today = {"activation_checkpointing": False}
    assert upgrade_config({"model": today})["model"] == today
