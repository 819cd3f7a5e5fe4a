"""End-to-end behaviour of train(cfg) on tiny configs: outputs, determinism, resume, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate

import training.checkpoint as checkpoint_mod
from training import config_tree
from training.checkpoint import load_checkpoint, save_checkpoint, verifies
from training.config_tree import target_class
from training.errors import NonFiniteLossError, UserError
from training.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group", ["dataloaders", "model", "loss", "solver", "optimizer", "lr_schedule", "trainer", "eval", "precision"]
)
def test_every_group_option_instantiates(make_cfg, group, image_folder):
    for option in options(group):
        image = group == "model" and option != "mlp"
        extra = ["dataloaders=digits"] if image else []
        if group == "dataloaders" and option in ("folder", "celeba", "imagenet"):
            extra = [
                f"dataloaders.root={image_folder}",
                "dataloaders.image_size=8",
                "dataloaders.batch_size=4",
                "dataloaders.num_workers=0",
                "dataloaders.num_classes=0",
                "dataloaders.class_subfolders=true",
            ]
        if group == "dataloaders" and option == "imagenet_latents":  # made by a script: the error must say how
            with pytest.raises(Exception, match="no manifest.json .* python scripts/precompute_latents.py"):
                instantiate(make_cfg("dataloaders=imagenet_latents", "dataloaders.root=/nonexistent")[group])
            continue
        if group == "dataloaders" and option == "cifar10":  # not downloadable here: the error must say what to do
            with pytest.raises(Exception, match="CIFAR-10 is not in .* set dataloaders.data_dir=PATH"):
                instantiate(
                    make_cfg("dataloaders=cifar10", "dataloaders.data_dir=/nonexistent", "dataloaders.download=false")[
                        group
                    ]
                )
            continue
        if group == "model" and option.startswith("glide"):  # starts from released weights: say where they are
            with pytest.raises(Exception, match="OpenAI's released weights .* model.checkpoint=PATH"):
                instantiate(make_cfg(f"model={option}")[group])
            extra = ["model.from_scratch=true"]
        if group == "dataloaders" and option == "sdxl_cache":  # made by a script: the error must say how
            with pytest.raises(Exception, match="not an SDXL cache .* python scripts/precompute_sdxl.py"):
                instantiate(make_cfg("dataloaders=sdxl_cache", "dataloaders.root=/nonexistent")[group])
            continue
        if group == "model" and option == "sdxl_lora":  # SDXL's weights are not here (offline): say what to do
            with pytest.raises(Exception, match="cannot load SDXL .* pass a local diffusers folder"):
                instantiate(make_cfg(f"model={option}")[group])
            continue
        if option in ("prompts", "sdxl_prompts") or (group == "dataloaders" and option in ("captions", "webdataset")):
            continue  # need captioned data and a tokenizer: built in tests/test_glide_training.py, test_sdxl_lora.py
        cfg = make_cfg(f"{group}={option}", *extra)
        with torch.device("meta" if group == "model" else "cpu"):  # DiT-XL on meta: no 2.7 GB allocation
            obj = instantiate(cfg[group])
        if group == "optimizer" and option == "adamw8bit" and not torch.cuda.is_available():
            with pytest.raises(ValueError, match="needs CUDA; on this device use optimizer=adamw"):
                obj(params=[torch.nn.Parameter(torch.zeros(1))])
            continue
        if group == "optimizer":
            obj = obj(params=[torch.nn.Parameter(torch.zeros(1))])
            assert isinstance(obj, torch.optim.Optimizer), option
        elif group == "lr_schedule":
            obj = obj(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=10)
            assert isinstance(obj, torch.optim.lr_scheduler.LRScheduler), option
        elif cfg[group].get("_partial_"):  # built later with the run's objects
            assert obj.func is get_object(cfg[group]["_target_"]), option
        else:  # the object is what its _target_ names, and what the declared kinds were read from
            assert isinstance(obj, target_class(cfg[group])), option
            if group in config_tree.GROUPS:
                assert target_class(cfg[group]) is config_tree.declared_options()[group][option], option
        if group == "model":
            assert sum(p.numel() for p in obj.parameters()) > 0, option


def test_every_experiment_and_debug_preset_composes(make_cfg):
    for group in ("experiment", "debug"):
        for option in options(group):
            assert make_cfg(f"{group}={option}").run_name == "test"


def test_training_writes_every_output(make_cfg, tmp_path):
    metrics, objects = train(make_cfg())
    run_dir = tmp_path / "run"
    ckpts = tmp_path / "outputs" / "ckpts" / "mlp" / "test"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved) >= {
        "eval/energy_distance@nfe1",
        "eval/energy_distance@nfe4",
        "eval/nfe_used@nfe4",
        "train/final_loss",
        "train/ms_per_step",
    }
    assert {k: saved[k] for k in metrics} == pytest.approx(metrics)
    # how the scores were made sits beside them
    assert saved["eval/solver"] == "euler" and saved["eval/num_samples"] == 256 and saved["eval/seed"] == 1234
    for name in ("samples_nfe1.npy", "samples_nfe4.npy", "samples.png", "trajectories.png"):
        assert (run_dir / name).stat().st_size > 0
    import numpy as np

    assert np.load(run_dir / "samples_nfe4.npy").shape == (256, 2)
    assert (ckpts / "last.pt").is_file()
    assert sorted(p.name for p in (ckpts / "archive").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    state = load_checkpoint(ckpts / "last.pt")
    assert state["step"] == 16 and state["epoch"] == 2
    assert state["config"]["model"]["hidden"] == 256  # the full resolved config travels with the weights
    log = (tmp_path / "EXPERIMENT_LOG.md").read_text()
    assert "test · completed" in log and "eval/energy_distance@nfe4" in log and str(ckpts / "last.pt") in log


def test_flow_matching_learns_moons(make_cfg):
    metrics, objects = train(
        make_cfg(
            "epochs=10",
            "dataloaders.num_train=4096",
            "model.hidden=64",
            "eval.nfe=[20]",
            "eval.num_samples=1000",
            "dataloaders.num_eval=1000",
            "eval.every_epochs=0",
            "lr_schedule=constant",
        )
    )
    losses = objects["trainer"].losses
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    # untrained: samples stay near N(0, I); the moons' energy distance to it is ~1.3
    assert metrics["eval/energy_distance@nfe20"] < 0.3


def test_deterministic_runs_give_bit_identical_losses(make_cfg, tmp_path):
    first = train(make_cfg("deterministic=true", "loss=fm_ot"))[1]["trainer"].losses
    second = train(make_cfg("deterministic=true", "loss=fm_ot", "overwrite=true"))[1]["trainer"].losses
    assert first == second and len(first) == 16


def test_resume_continues_exactly(make_cfg):
    full = train(make_cfg("epochs=3", "deterministic=true", "run_name=full"))
    # stop mid-epoch 2 (8 steps an epoch), then resume to the end
    train(make_cfg("epochs=3", "deterministic=true", "run_name=split", "max_steps=11"))
    resumed = train(make_cfg("epochs=3", "deterministic=true", "run_name=split", "resume=true"))
    assert resumed[1]["trainer"].losses == full[1]["trainer"].losses[11:]
    for a, b in zip(full[1]["model"].parameters(), resumed[1]["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed[0]["eval/energy_distance@nfe4"] == full[0]["eval/energy_distance@nfe4"]


def test_gradient_accumulation_takes_one_step_per_group(make_cfg):
    _, objects = train(make_cfg("trainer.grad_accum=2"))
    assert objects["trainer"].step == 8  # 2 epochs x 8 batches / 2


def test_bf16_autocast_trains_on_cpu(make_cfg):
    metrics, objects = train(make_cfg("precision=bf16"))
    assert math.isfinite(metrics["train/final_loss"]) and 0 < metrics["train/final_loss"] < 10
    assert all(math.isfinite(loss) for loss in objects["trainer"].losses)
    assert math.isfinite(metrics["eval/energy_distance@nfe4"])


# --- bad input ---------------------------------------------------------------------------------
def test_missing_run_name(make_cfg):
    cfg = make_cfg("run_name=???")
    with pytest.raises(UserError, match="run_name is required"):
        train(cfg)


def test_resume_without_checkpoint_names_the_path(make_cfg, tmp_path):
    with pytest.raises(UserError, match=f"no checkpoint at {tmp_path}/outputs/ckpts/mlp/test/last.pt"):
        train(make_cfg("resume=true"))


def test_existing_run_is_not_overwritten_silently(make_cfg):
    train(make_cfg())
    with pytest.raises(UserError, match="already has a checkpoint.*resume=true.*overwrite=true"):
        train(make_cfg())


def test_resume_with_different_model_or_loss_is_refused_with_the_keys(make_cfg):
    train(make_cfg())
    with pytest.raises(UserError, match=r"model.hidden: 256 -> 64"):
        train(make_cfg("resume=true", "model.hidden=64"))
    with pytest.raises(
        UserError, match=r"loss.coupling._target_: losses.coupling.IndependentCoupling -> losses.coupling.OTCoupling"
    ):
        train(make_cfg("resume=true", "loss=fm_ot"))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a checkpoint at all", "truncated or not a torch checkpoint"),
    ],
)
def test_eval_checkpoint_missing_or_garbage(make_cfg, tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        train(make_cfg(f"eval_checkpoint={path}"))


def test_eval_checkpoint_truncated_or_foreign(make_cfg, tmp_path):
    _, objects = train(make_cfg())
    data = objects["checkpoint"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not a torch checkpoint"):
        train(make_cfg(f"eval_checkpoint={truncated}"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(UserError, match="not a DenoisingZoo checkpoint"):
        train(make_cfg(f"eval_checkpoint={foreign}"))


def test_eval_checkpoint_scores_the_saved_model(make_cfg, tmp_path):
    trained, objects = train(make_cfg())
    metrics, _ = train(
        make_cfg(
            f"eval_checkpoint={objects['checkpoint']}",
            "run_name=ev",
            "model.hidden=999",
            f"paths.run_dir={tmp_path}/eval_run",
        )
    )
    # the model is rebuilt from the checkpoint's config, whatever model.* says now
    assert metrics["eval/energy_distance@nfe4"] == trained["eval/energy_distance@nfe4"]
    assert json.loads((tmp_path / "eval_run" / "metrics.json").read_text())["checkpoint_step"] == 16


def test_eval_with_another_solver_reports_its_nfe(make_cfg, tmp_path):
    _, objects = train(make_cfg())
    metrics, _ = train(make_cfg(f"eval_checkpoint={objects['checkpoint']}", "solver=dopri5"))
    assert set(k for k in metrics if k.startswith("eval/")) == {
        "eval/energy_distance@adaptive",
        "eval/nfe_used@adaptive",
    }
    assert metrics["eval/nfe_used@adaptive"] >= 6


def test_eval_only_samples_with_the_checkpoints_own_sampler_unless_told_otherwise(make_cfg, tmp_path):
    trained, objects = train(make_cfg("loss=meanflow", "solver=meanflow", "eval.nfe=[1,2]"))
    ckpt = objects["checkpoint"]

    def rescore(*overrides: str) -> tuple[dict, dict]:
        run = tmp_path / f"ev{len(list(tmp_path.glob('ev*')))}"
        metrics, _ = train(make_cfg(f"eval_checkpoint={ckpt}", "run_name=ev", f"paths.run_dir={run}", *overrides))
        return metrics, json.loads((run / "metrics.json").read_text())

    metrics, saved = rescore()  # the launcher's default is solver=euler: the checkpoint's meanflow wins
    assert saved["eval/sampler"] == "meanflow" and saved["eval/solver"] == "meanflow"
    assert metrics["eval/energy_distance@nfe1"] == trained["eval/energy_distance@nfe1"]
    _, saved = rescore("solver=heun")  # an average-velocity model at r = t is a velocity model: it fits
    assert saved["eval/sampler"] == "heun"
    with pytest.raises(
        UserError,
        match=r"^solver=diffusion samples eps models; model=mlp with loss=meanflow "
        r"predicts average_velocity: use solver=dopri5\|euler\|heun\|meanflow",
    ):
        rescore("solver=diffusion")
    _, fm = train(make_cfg("run_name=fm", "overwrite=true"))
    with pytest.raises(
        UserError, match=r"^solver=meanflow samples average_velocity models; .* loss=fm predicts velocity"
    ):
        train(make_cfg(f"eval_checkpoint={fm['checkpoint']}", "run_name=ev", "solver=meanflow"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
@pytest.mark.parametrize(
    "override, message",
    [
        ("device=cuda", "device=cuda but CUDA is not available"),
        ("precision=fp16", "precision=fp16 needs CUDA"),
        ("precision=tf32", "precision=tf32 \\(TensorFloat-32\\) needs an NVIDIA GPU"),
    ],
)
def test_device_or_precision_the_machine_lacks(make_cfg, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train(make_cfg(override))
    assert not (tmp_path / "outputs" / "ckpts").exists()  # refused before any work


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg("loss._target_=helpers.NaNAfter", "+loss.after=12", "epochs=3")
    with pytest.raises(
        NonFiniteLossError,
        match=r"loss is nan at step 13 \(epoch 1\).*nan_policy=rollback \(or skip\).*last good checkpoint: .*last.pt",
    ):
        train(cfg)
    last = tmp_path / "outputs" / "ckpts" / "mlp" / "test" / "last.pt"
    state = torch.load(last, weights_only=True)  # its loss is a test class, which load_checkpoint refuses to trust
    assert verifies(last) and state["step"] == 8 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert "failed: loss is nan at step 13" in (tmp_path / "EXPERIMENT_LOG.md").read_text()


def test_nan_policy_skip_drops_bad_batches_and_finishes(make_cfg):
    metrics, objects = train(make_cfg("loss._target_=helpers.NaNAfter", "+loss.after=12", "nan_policy=skip"))
    assert objects["trainer"].step == 12 and objects["trainer"].skipped_batches == 4
    assert all(torch.isfinite(p).all() for p in objects["model"].parameters())


def test_failed_checkpoint_write_leaves_the_previous_one_loadable(make_cfg, monkeypatch):
    _, objects = train(make_cfg())
    path = objects["checkpoint"]
    before = load_checkpoint(path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_mod.torch, "save", disk_full)
    with pytest.raises(
        UserError,
        match=r"^could not write checkpoint .*last.pt \(\[Errno 28\] No space left on "
        r"device\); \d+ MiB free in .*: free some space \(the previous checkpoint there is intact\)",
    ):
        save_checkpoint({**before, "step": 999}, path)
    monkeypatch.undo()
    after = load_checkpoint(path)
    assert after["step"] == before["step"]
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_experiment_log_appends_without_touching_earlier_entries(make_cfg, tmp_path):
    log = tmp_path / "EXPERIMENT_LOG.md"
    log.write_text("# my notes\n\nhand-written text\n")
    train(make_cfg())
    train(make_cfg("run_name=second"))
    text = log.read_text()
    assert text.startswith("# my notes\n\nhand-written text\n")
    assert text.index("test · completed") < text.index("second · completed")


@pytest.mark.slow
def test_compiled_training_saves_plain_state_dicts(make_cfg):
    metrics, objects = train(make_cfg("compile=true"))
    state = load_checkpoint(objects["checkpoint"])
    assert not any("_orig_mod" in k for k in state["model"])
    assert metrics["train/final_loss"] < 10


def test_a_value_the_class_rejects_is_a_one_line_error(make_cfg):
    with pytest.raises(
        UserError, match=r"^model config is invalid: depth must be >= 1, got 0; check the model.\* overrides$"
    ):
        train(make_cfg("model.depth=0"))


def test_overwrite_with_a_broken_config_keeps_the_old_checkpoint(make_cfg):
    _, objects = train(make_cfg())
    with pytest.raises(UserError, match="model config is invalid"):
        train(make_cfg("overwrite=true", "model.depth=0"))
    assert load_checkpoint(objects["checkpoint"])["step"] == 16


def test_a_run_from_before_cond_dropout_resumes_and_rescores(make_cfg, tmp_path):
    """Checkpoints name the loss's dropout as they were written (uncond_p, class_dropout, ...): they load
    in today's names, so resume=true is not refused over the rename."""
    _, objects = train(make_cfg("loss=meanflow", "solver=meanflow"))
    path = objects["checkpoint"]
    state = torch.load(path, weights_only=True)
    loss = state["config"]["loss"]
    state["config"]["loss"] = {**{k: v for k, v in loss.items() if k != "cond_dropout"}, "class_dropout": 0.1,
                               "num_classes": 0}  # fmt: skip
    del state["sampling"], state["config"]["choices"]  # and from before checkpoints recorded their sampler
    save_checkpoint(state, path)
    assert load_checkpoint(path)["config"]["loss"] == loss
    train(make_cfg(f"eval_checkpoint={path}", "run_name=ev", f"paths.run_dir={tmp_path}/ev"))
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["eval/sampler"] == "meanflow"
    metrics, _ = train(make_cfg("loss=meanflow", "solver=meanflow", "resume=true", "epochs=3"))
    assert metrics["train/steps"] == 24


@pytest.mark.parametrize("key, value", [("sampling", ["euler"]), ("config.choices", "meanflow")])
def test_a_checkpoint_with_a_malformed_sampling_record_is_a_one_line_error(make_cfg, tmp_path, key, value):
    _, objects = train(make_cfg())
    state = torch.load(objects["checkpoint"], weights_only=True)
    if key == "sampling":
        state["sampling"] = value
    else:
        state["config"]["choices"] = value
    save_checkpoint(state, objects["checkpoint"])
    with pytest.raises(UserError, match=rf"^eval_checkpoint .* has a malformed {key}; it is damaged"):
        train(make_cfg(f"eval_checkpoint={objects['checkpoint']}", "run_name=ev"))
