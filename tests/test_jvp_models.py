"""Every image model class MeanFlow can train, enumerated from configs/model/ (a new YAML of a new class is
covered unedited; of the options that build one class, the first), at its debug=smoke size: the fused
kernels of its plain forward and the jvp-safe ones agree, the jvp through it matches finite differences,
and activation checkpointing changes no output, gradient or tangent."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.func import jvp

from models import layers
from models.layers import jvp_safe_kernels
from training.compose import compose_config
from training.config_tree import declared, option_nodes, target_class


def image_model_options() -> dict[type, str]:
    """The first option (by name) of each class that outputs a field on image data."""
    first: dict[type, str] = {}
    for name, node in sorted(option_nodes("model").items()):
        cls = target_class(node)
        if declared(cls, "output") == "field" and "image" in declared(cls, "data_kinds"):
            first.setdefault(cls, name)
    return first


IMAGE_MODELS = sorted(image_model_options().values())
CHECKPOINTABLE = [n for n in IMAGE_MODELS if "activation_checkpointing" in option_nodes("model")[n]]


def test_the_enumeration_finds_the_image_models():
    assert {cls.__name__ for cls in image_model_options()} == {"UNet", "SmallCNN", "DiT"}
    assert {"unet", "dit_b2"} <= set(CHECKPOINTABLE)


def smoke_model(name: str, **overrides: object) -> nn.Module:
    """The option at debug=smoke on digits (16x16x1, 10 classes), every weight perturbed off its
    zero initialisation so that each branch reaches the output."""
    cfg = compose_config([f"model={name}", "debug=smoke", "dataloaders=digits", "run_name=jvp",
                          *(f"model.{k}={v}" for k, v in overrides.items())])  # fmt: skip
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 16, 16, generator=g, dtype=dtype)
    t = torch.rand(3, generator=g, dtype=dtype) * 0.5
    r = t + 0.4
    v = torch.randn(x.shape, generator=g, dtype=dtype)
    return x, t, r, v


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_fused_and_jvp_safe_kernels_agree(name):
    model = smoke_model(name)
    x, t, r, _ = inputs()
    cond = torch.tensor([0, 4, 9])
    with torch.no_grad():
        fused = model(x, t, r, cond)
        with jvp_safe_kernels():
            safe = model(x, t, r, cond)
    assert fused.shape == x.shape and fused.is_contiguous()
    torch.testing.assert_close(fused, safe, rtol=1e-4, atol=1e-5)  # fp32: the reductions run in another order


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_jvp_through_the_model_matches_finite_differences(name):
    """MeanFlow's tangent (v, 1, 0) along (x, t, r), in float64, against central differences."""
    model = smoke_model(name).double()
    x, t, r, v = inputs(torch.float64)
    cond = torch.tensor([0, 4, 9])

    def u(x_, t_, r_):
        return model(x_, t_, r_, cond)

    with jvp_safe_kernels():
        out, tangent = jvp(u, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    eps = 1e-7  # time enters as sin/cos(1000 t): a small step keeps the truncation error down
    fd = (u(x + eps * v, t + eps, r) - u(x - eps * v, t - eps, r)) / (2 * eps)
    torch.testing.assert_close(out, u(x, t, r))
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-6 * fd.abs().max().item())
    assert tangent.abs().max() > 1e-3  # the derivative is not trivially zero


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_jvp_runs_under_bf16_autocast(name):
    model = smoke_model(name)
    x, t, r, v = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16), jvp_safe_kernels():
        out, tangent = jvp(lambda x_, t_, r_: model(x_, t_, r_, None), (x, t, r), (v, torch.ones_like(t), 0 * r))
    assert out.shape == tangent.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all()


@pytest.mark.parametrize("name", CHECKPOINTABLE)
def test_activation_checkpointing_changes_no_output_gradient_or_tangent(name, monkeypatch):
    calls = []
    checkpoint = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    plain, checkpointed = smoke_model(name), smoke_model(name, activation_checkpointing=True)
    x, t, r, v = inputs()
    cond = torch.tensor([0, 4, 9])
    outs, grads = [], []
    for model in (plain, checkpointed):
        out = model(x, t, r, cond)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in model.parameters()])
    assert calls  # the checkpointed model did recompute, the plain one did not
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    tangents, recomputed = [], len(calls)
    for model in (plain, checkpointed):  # MeanFlow's no-grad jvp passes through unchanged
        with torch.no_grad(), jvp_safe_kernels():
            tangents.append(jvp(lambda x_, t_, m=model: m(x_, t_, r, cond), (x, t), (v, torch.ones_like(t)))[1])
    torch.testing.assert_close(tangents[0], tangents[1])
    assert len(calls) == recomputed  # nothing to recompute in a no-grad jvp: the blocks run as they are
