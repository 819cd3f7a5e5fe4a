"""Image data, image evaluation and image models trained end to end through train(cfg)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dataloaders.base import HeldOut
from dataloaders.images import DigitsData, FolderData
from evaluation.contract import EvalContext
from evaluation.image_evaluator import ImageEval
from evaluation.sample_generation import velocity_of
from solvers.fixed_step import Euler
from training.errors import UserError
from training.train import train


def test_digits_are_16x16_in_model_range_with_labels_and_a_disjoint_held_out_set():
    data = DigitsData(num_eval=297)
    assert data.train_set.shape == (1500, 1, 16, 16) and data.eval_set.shape == (297, 1, 16, 16)
    assert data.train_set.min() >= -1 and data.train_set.max() <= 1 and data.train_set.max() > 0.9
    assert set(data.train_labels.tolist()) == set(range(10)) and data.num_classes == 10
    batch = next(iter(data.train_loader(torch.device("cpu"), seed=0)))
    assert batch["x1"].shape == (128, 1, 16, 16) and batch["cond"].shape == (128,)
    assert "cond" not in next(iter(DigitsData(num_classes=0).train_loader(torch.device("cpu"), seed=0)))


def test_digits_reject_a_wrong_shape_request():
    with pytest.raises(ValueError, match="digits are grey: dataloaders.channels must be 1"):
        DigitsData(channels=3)


def test_folder_with_class_subfolders(image_folder):
    data = FolderData(str(image_folder), image_size=8, class_subfolders=True, num_classes=2, num_eval=4,
                      batch_size=8, num_workers=0)  # fmt: skip
    assert data.eval_set.shape == (4, 3, 8, 8) and data.num_classes == 2
    loader = data.train_loader(torch.device("cpu"), seed=0)
    assert len(loader) == 36 // 8
    loader.set_epoch(3)
    first = [b["cond"].tolist() for b in loader]
    loader.set_epoch(3)
    assert [b["cond"].tolist() for b in loader] == first  # the order is a function of (seed, epoch)
    assert all(b["x1"].shape == (8, 3, 8, 8) and b["x1"].min() >= -1 for b in loader)


def test_folder_errors_name_the_fix(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder; point it to the images"):
        FolderData(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has 2 class folders but dataloaders.num_classes=5; set it to 2"):
        FolderData(str(image_folder), class_subfolders=True, num_classes=5, num_workers=0, batch_size=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        FolderData(str(empty), num_workers=0)


def test_unlabelled_folder_reads_every_image_below_root(image_folder):
    data = FolderData(str(image_folder), image_size=8, num_eval=4, batch_size=4, num_workers=0)
    assert data.num_classes == 0 and data.eval_set.shape == (4, 3, 8, 8)
    assert "cond" not in next(iter(data.train_loader(torch.device("cpu"), seed=0)))


def test_image_eval_writes_unit_range_samples_and_grids(tmp_path):
    class Still(nn.Module):  # velocity 0: samples are the noise itself
        output = "field"

        def forward(self, x, t, r, cond=None):
            return torch.zeros_like(x)

    reference = torch.rand(32, 1, 8, 8) * 2 - 1
    metrics = ImageEval(nfe=[1, 2], num_samples=20, batch_size=8)(
        Still(), Euler(), HeldOut(reference), EvalContext(torch.device("cpu"), out_dir=tmp_path)
    )
    x = np.load(tmp_path / "samples_nfe2.npy")
    assert x.shape == (20, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    for name in ("grid_nfe1.png", "grid_nfe2.png", "grid_data.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert metrics["eval/energy_distance@nfe1"] == pytest.approx(metrics["eval/energy_distance@nfe2"])


def test_classifier_free_guidance_extrapolates_from_the_null_class():
    class Table(nn.Module):  # class k -> k, null (cond=None) -> 10
        def forward(self, x, t, r, cond=None):
            value = torch.full((len(x),), 10.0) if cond is None else cond.float()
            return value[:, None].expand_as(x)

    cond = torch.tensor([2, 4])
    v = velocity_of(Table(), cond, guidance_scale=3.0)(torch.zeros(2, 1), torch.tensor(0.5))
    torch.testing.assert_close(v, torch.tensor([[10 + 3 * (2 - 10.0)], [10 + 3 * (4 - 10.0)]]))


TINY_IMAGE = [
    "dataloaders=digits", "dataloaders.batch_size=32", "dataloaders.num_eval=64", "eval=image", "eval.nfe=[1,2]",
    "eval.num_samples=32", "eval.batch_size=16", "eval.every_epochs=0", "max_steps=3", "epochs=1",
]  # fmt: skip
TINY_UNET = ["model=unet", "model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
             "model.attention_resolutions=[8]", "model.norm_groups=4", "model.dropout=0"]  # fmt: skip
TINY_DIT = ["model=dit_s4", "model._target_=models.dit.DiT", "+model.patch_size=4", "+model.hidden_size=32",
            "+model.depth=1", "+model.num_heads=2"]  # fmt: skip


@pytest.mark.parametrize(
    "model, loss",
    [(TINY_UNET, ["loss=meanflow", "solver=meanflow", "loss.cond_dropout=0.1"]),
     (TINY_DIT, ["loss=fm", "solver=euler", "eval.guidance_scale=2.0"]),
     (["model=cnn", "model.channels=16", "model.num_blocks=1"], ["loss=meanflow", "solver=meanflow"])],
    ids=["unet-meanflow", "dit-fm-cfg", "cnn-meanflow"],
)  # fmt: skip
def test_image_models_train_evaluate_and_reload(make_cfg, tmp_path, model, loss):
    metrics, objects = train(make_cfg(*TINY_IMAGE, *model, *loss))
    assert np.load(tmp_path / "run" / "samples_nfe1.npy").shape == (32, 1, 16, 16)
    assert (tmp_path / "run" / "grid_nfe2.png").is_file()
    evaluated, _ = train(make_cfg(*TINY_IMAGE, *model, *loss, f"eval_checkpoint={objects['checkpoint']}",
                                  "run_name=ev", f"paths.run_dir={tmp_path}/ev"))  # fmt: skip
    assert evaluated["eval/energy_distance@nfe2"] == pytest.approx(metrics["eval/energy_distance@nfe2"])
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["checkpoint_step"] == 3


def test_dit_patch_that_does_not_divide_the_image_is_a_one_line_error(make_cfg):
    with pytest.raises(UserError, match=r"^model config is invalid: DiT patch_size=8 does not divide input_size=12"):
        train(make_cfg(*TINY_IMAGE, "dataloaders.image_size=12", "model=dit_s8"))


def test_image_model_on_2d_data_is_a_one_line_error(make_cfg):
    with pytest.raises(
        UserError,
        match=r"^model=unet takes image\|latent data; dataloaders=moons serves dense data: "
        r"use dataloaders=celeba\|cifar10\|digits\|folder\|imagenet\|imagenet_latents$",
    ):
        train(make_cfg("model=unet"))
