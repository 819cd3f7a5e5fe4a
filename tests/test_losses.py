import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from losses.base import LossOutput
from losses.coupling import IndependentCoupling, OTCoupling
from losses.flow_matching import FlowMatchingLoss
from models.mlp import MLP


class OracleVelocity(nn.Module):
    """The exact marginal velocity when the data is the single point ``c``: (c - x) / (1 - t)."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c

    def forward(self, x, t, r, cond=None):
        return (self.c - x) / (1 - t)[:, None]


def test_fm_loss_is_zero_for_the_exact_velocity_field():
    torch.manual_seed(0)
    c = torch.tensor([2.0, -1.0], dtype=torch.float64)
    batch = {"x1": c.expand(512, 2).clone()}
    out = FlowMatchingLoss()(OracleVelocity(c), batch)
    assert isinstance(out, LossOutput)
    assert out.loss.item() < 1e-10


def test_fm_loss_matches_the_definition_on_seeded_draws():
    model = MLP(dim=2, hidden=16, depth=2)
    x_1 = torch.randn(64, 2)
    torch.manual_seed(1)
    loss = FlowMatchingLoss()(model, {"x1": x_1}).loss
    torch.manual_seed(1)
    x_0 = torch.randn_like(x_1)
    t = torch.rand(64)
    x_t = (1 - t[:, None]) * x_0 + t[:, None] * x_1
    expected = ((model(x_t, t, t) - (x_1 - x_0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_fm_loss_passes_r_equal_t_to_the_model():
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, t, r, cond=None):
            seen["t"], seen["r"] = t, r
            return torch.zeros_like(x)

    FlowMatchingLoss()(Spy(), {"x1": torch.randn(8, 2)})
    assert torch.equal(seen["t"], seen["r"])


def test_independent_coupling_keeps_pairs():
    x_0, x_1 = torch.randn(16, 2), torch.randn(16, 2)
    a, b = IndependentCoupling()(x_0, x_1)
    assert a is x_0 and b is x_1


def test_ot_coupling_permutes_noise_to_the_optimal_assignment():
    g = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 3
    a, b = OTCoupling()(x_0, x_1)
    assert b is x_1  # data (and anything aligned with it) is never reordered
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, x_0.tolist()))  # a permutation of the noise
    cost = torch.cdist(x_0.double(), x_1.double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    optimal = cost[rows, cols].sum()
    ours = ((a.double() - x_1.double()) ** 2).sum()
    independent = ((x_0.double() - x_1.double()) ** 2).sum()
    assert np.isclose(ours.item(), optimal, rtol=1e-9)
    assert ours < independent


def test_ot_coupling_rejects_unequal_batches():
    with pytest.raises(ValueError, match="equal batch sizes"):
        OTCoupling()(torch.randn(4, 2), torch.randn(5, 2))


def test_loss_output_must_be_scalar():
    with pytest.raises(ValueError, match="scalar"):
        LossOutput(torch.zeros(3))
