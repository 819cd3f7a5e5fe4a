from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from models.cnn import SmallCNN
from models.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def tiny_unet(num_classes: int = NUM_CLASSES) -> UNet:
    return UNet(
        in_channels=3,
        image_size=8,
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        num_heads=4,
        norm_groups=4,
        num_classes=num_classes,
    )


def tiny_cnn(num_classes: int = NUM_CLASSES) -> SmallCNN:
    return SmallCNN(in_channels=3, channels=8, num_blocks=2, norm_groups=4, num_classes=num_classes)


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Noise on every weight, so the zero-initialised layers stop hiding the rest of the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, t and r: one MeanFlow interval (r > t, as losses/meanflow.py draws them) and one r = t (flow matching)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    t = torch.tensor([0.25, 0.5], dtype=dtype)
    r = torch.tensor([0.75, 0.5], dtype=dtype)
    return x, t, r


def test_parameter_counts_at_the_default_settings():
    with torch.device("meta"):
        unet = UNet(in_channels=3, image_size=32, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3)
        cnn_rgb, cnn_gray = SmallCNN(in_channels=3), SmallCNN(in_channels=1)
    assert n_params(unet) == 51_157_507  # the notes: ~51M
    for cnn in (cnn_rgb, cnn_gray):
        assert abs(n_params(cnn) / 0.5e6 - 1) < 0.2, n_params(cnn)


@pytest.mark.parametrize("make", [tiny_unet, tiny_cnn], ids=["unet", "cnn"])
def test_output_shape_with_and_without_labels_and_null_label_is_none(make):
    model = perturb_(make())
    x, t, r = inputs()
    with torch.no_grad():
        labeled = model(x, t, r, torch.tensor([3, 7]))
        unlabeled = model(x, t, r)
        null = model(x, t, r, torch.full((2,), NUM_CLASSES))
    assert labeled.shape == unlabeled.shape == x.shape
    assert not torch.allclose(labeled, unlabeled)
    torch.testing.assert_close(null, unlabeled)


@pytest.mark.parametrize("make", [tiny_unet, tiny_cnn], ids=["unet", "cnn"])
def test_fresh_model_predicts_zero_and_r_matters_once_trained(make):
    model = make().eval()
    x, t, r = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, r), torch.zeros_like(x))
        perturb_(model)
        assert not torch.allclose(model(x, t, r), model(x, t, torch.zeros_like(r)))


@pytest.mark.parametrize("make", [tiny_unet, tiny_cnn], ids=["unet", "cnn"])
def test_labels_for_an_unconditional_model_raise_one_line(make):
    model = make(num_classes=0)
    x, t, r = inputs()
    with pytest.raises(ValueError, match="unconditional") as err:
        model(x, t, r, torch.tensor([0, 1]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["unet", "cnn"])
def test_model_config_instantiates_on_meta(name):
    with torch.device("meta"):
        model = instantiate(with_data(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")))
    assert isinstance(model, {"unet": UNet, "cnn": SmallCNN}[name])
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"image_size": 28}, "cannot be halved"), ({"attention_resolutions": (15,)}, "match no feature-map size")],
)
def test_unet_rejects_sizes_that_do_not_fit_the_levels(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        UNet(**kwargs)


def with_data(model_cfg):
    """A model config resolved against a data set's shape (32x32x4, 1000 classes), as the launcher does."""
    shape = {"dataloaders": {"image_size": 32, "channels": 4, "num_classes": 1000}}
    return OmegaConf.merge(shape, {"model": model_cfg}).model
