"""DiT: published sizes, the model contract, adaLN-Zero initialisation, forward-mode AD, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

import models.dit as dit
from models.dit import DiT

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "model").glob("dit_*.yaml"))

# DiT paper, Table 1 (ImageNet 256: 32x32x4 latents, 1000 classes).
PUBLISHED = {"DiT_S_2": 33e6, "DiT_B_2": 130e6, "DiT_L_2": 458e6, "DiT_XL_2": 675e6}


def tiny(num_classes: int = 10) -> DiT:
    return DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=num_classes)


def perturbed(model: DiT, seed: int = 0) -> DiT:
    """Move every weight off its initial value, so the zero-initialised paths carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def inputs(batch: int = 2, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 8, 8, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype)
    return x, t, t * torch.rand(batch, generator=gen, dtype=dtype)


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = getattr(dit, name)(input_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PUBLISHED[name], rel=0.02)


def test_output_has_the_input_shape_with_and_without_labels():
    model = perturbed(tiny())
    x, t, r = inputs(batch=3)
    assert model(x, t, r, torch.tensor([0, 4, 9])).shape == x.shape
    null = model(x, t, r)
    assert null.shape == x.shape
    torch.testing.assert_close(null, model(x, t, r, torch.full((3,), 10)))
    assert tiny(num_classes=0)(x, t, r).shape == x.shape


def test_fresh_model_outputs_zeros_until_its_weights_move():
    model = tiny()
    x, t, r = inputs()
    assert torch.equal(model(x, t, r, torch.tensor([1, 2])), torch.zeros_like(x))
    assert perturbed(model)(x, t, r, torch.tensor([1, 2])).abs().min() > 0


def test_the_interval_t_minus_r_reaches_the_output():
    model = perturbed(tiny())
    x, t, _ = inputs()
    assert not torch.allclose(model(x, t, t), model(x, t, 0.5 * t))


def test_bad_sizes_and_labels_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^DiT patch_size=4 does not divide input_size=30; choose a patch size"):
        DiT(input_size=30, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2)
    x, t, r = inputs()
    with pytest.raises(ValueError, match=r"built for 8x8 inputs but got 16x16"):
        tiny()(torch.zeros(2, 3, 16, 16), t, r)
    with pytest.raises(ValueError, match=r"num_classes=0 \(unconditional\)"):
        tiny(num_classes=0)(x, t, r, torch.tensor([1, 2]))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_dit_config_instantiates_on_meta(path):
    with torch.device("meta"):
        model = instantiate(with_data(OmegaConf.load(path)))
    assert isinstance(model, DiT)
    assert model.pos_embed.device.type == "meta"


def test_there_is_a_config_per_size_variant():
    assert [p.stem for p in CONFIGS] == sorted(f"dit_{s}{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8))


def with_data(model_cfg):
    """A model config resolved against a data set's shape (32x32x4, 1000 classes), as the launcher does."""
    shape = {"dataloaders": {"image_size": 32, "channels": 4, "num_classes": 1000}}
    return OmegaConf.merge(shape, {"model": model_cfg}).model
