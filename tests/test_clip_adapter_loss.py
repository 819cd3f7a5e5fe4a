"""loss=clip_adapter_kl: the KL term against torch.distributions, exactly zero for an inert adapter even
under dropout (both passes share their masks), and a clear error without CLIP embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from losses.clip_adapter_kl import ClipAdapterKLLoss
from paths.diffusion_schedule import mean_flat


class ToyAdapted(nn.Module):
    """eps and variance values from x, with dropout; ``cond["clip"]`` adds ``strength`` x the embedding's mean."""

    output = "eps_var"

    def __init__(self, strength: float, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.drop = nn.Dropout(dropout)
        self.strength = nn.Parameter(torch.tensor(strength))

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None, cond: dict[str, Tensor]) -> Tensor:
        out = self.drop(self.conv(x)).tanh()
        if "clip" in cond:
            out = out + self.strength * cond["clip"].mean(dim=1).view(-1, 1, 1, 1)
        return out


def batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    clip = nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1) + 0.5
    return {"x1": torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, "cond": {"clip": clip}}


def test_kl_is_the_closed_form_between_the_two_predicted_gaussians() -> None:
    torch.manual_seed(0)
    model = ToyAdapted(strength=0.4, dropout=0.0)
    loss_fn = ClipAdapterKLLoss(kl_weight=0.5, cond_dropout=0.0)
    data = batch()
    torch.manual_seed(1)
    out = loss_fn(model, data)
    torch.manual_seed(1)  # the same timesteps and noise
    x_start, x_t, t, noise, cond = loss_fn.noised(data)
    with torch.no_grad():
        a, b = model(x_t, t.float(), None, cond), model(x_t, t.float(), None, {})
        pa = loss_fn.schedule.p_mean_variance(a[:, :3], a[:, 3:], x_t, t, clip=False)
        pb = loss_fn.schedule.p_mean_variance(b[:, :3], b[:, 3:], x_t, t, clip=False)
    expected = mean_flat(
        kl_divergence(Normal(pa.mean, (0.5 * pa.log_variance).exp()), Normal(pb.mean, (0.5 * pb.log_variance).exp()))
    ).mean()
    assert out.metrics["adapter/kl"].item() == pytest.approx(expected.item(), rel=1e-4)
    mse = ((noise - a[:, :3]) ** 2).mean()
    assert out.loss.item() == pytest.approx(mse.item() + 0.5 * expected.item(), rel=1e-4)


def test_an_inert_adapter_costs_exactly_zero_kl_even_with_dropout() -> None:
    torch.manual_seed(0)
    model = ToyAdapted(strength=0.0, dropout=0.5).train()
    out = ClipAdapterKLLoss(kl_weight=1.0, cond_dropout=0.0)(model, batch())
    assert out.metrics["adapter/kl"].item() == 0.0


def test_the_kl_gradient_reaches_the_adapter_only_through_the_adapted_pass() -> None:
    torch.manual_seed(0)
    model = ToyAdapted(strength=0.3, dropout=0.0)
    ClipAdapterKLLoss(kl_weight=1.0, cond_dropout=0.0)(model, batch()).loss.backward()
    assert model.strength.grad is not None and model.strength.grad.abs().item() > 0


def test_batches_without_clip_embeddings_are_refused() -> None:
    data = batch()
    data["cond"] = {}
    with pytest.raises(ValueError, match="needs CLIP embeddings in every batch"):
        ClipAdapterKLLoss()(ToyAdapted(0.1, 0.0), data)
