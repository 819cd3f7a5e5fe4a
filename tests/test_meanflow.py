"""MeanFlow: the target identity, the jvp, time sampling, guidance, one-step sampling, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.sample_generation import velocity_of
from losses.meanflow import MeanFlowLoss
from models.mlp import MLP
from paths.time import LogitNormalTimeSampler
from solvers.meanflow import MeanFlowSolver
from training.errors import UserError
from training.train import train


class SinglePointAverageVelocity(nn.Module):
    """The exact u(x_t, t, r) when the data is one point c: paths are straight lines to c, so the
    average velocity over any [t, r] is the instantaneous one, (c - x) / (1 - t)."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c

    def forward(self, x, t, r, cond=None):
        return (self.c - x) / (1 - t)[:, None]


@pytest.mark.parametrize("full_batch_jvp", [False, True])
def test_loss_vanishes_for_the_exact_average_velocity(full_batch_jvp):
    torch.manual_seed(0)
    c = torch.tensor([1.5, -2.0], dtype=torch.float64)
    loss_fn = MeanFlowLoss(
        ratio=0.5, full_batch_jvp=full_batch_jvp, time_sampler=LogitNormalTimeSampler(mean=0.0, std=0.5)
    )
    out = loss_fn(SinglePointAverageVelocity(c), {"x1": c.expand(256, 2).clone()})
    assert out.metrics["meanflow/mse"].item() < 1e-20  # float64 end to end
    assert out.metrics["meanflow/dudt_norm"].item() > 0  # the jvp really ran and was not zero


def test_wrong_sign_convention_would_not_vanish():
    """Guard against a sign slip: with the total derivative taken in r instead of t the target
    differs from u for the exact model, so the loss above is a real check."""
    torch.manual_seed(0)
    c = torch.tensor([1.5, -2.0], dtype=torch.float64)
    model = SinglePointAverageVelocity(c)
    x_1 = c.expand(64, 2).clone()
    x_0 = torch.randn_like(x_1)
    t, r = torch.full((64,), 0.2, dtype=torch.float64), torch.full((64,), 0.7, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x_0 + t[:, None] * x_1
    v = x_1 - x_0
    _, dudr = torch.func.jvp(
        lambda x, t_, r_: model(x, t_, r_), (x_t, t, r), (v, torch.zeros_like(t), torch.ones_like(r))
    )
    wrong = v - (t - r)[:, None] * dudr
    assert (wrong - model(x_t, t, r)).abs().max() > 0.1


def test_jvp_matches_finite_differences_through_an_mlp():
    torch.manual_seed(0)
    model = MLP(dim=3, hidden=32, depth=2).double()
    loss_fn = MeanFlowLoss(jvp_fp32=False)
    x, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t, r = torch.rand(5, dtype=torch.float64) * 0.5, torch.rand(5, dtype=torch.float64) * 0.5 + 0.5
    u, dudt = loss_fn._jvp(model, x, t, r, v, None)
    eps = 1e-6
    fd = (model(x + eps * v, t + eps, r) - model(x - eps * v, t - eps, r)) / (2 * eps)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(u, model(x, t, r))


def test_selective_and_full_batch_jvp_give_the_same_loss():
    model = MLP(dim=2, hidden=32, depth=2)
    batch = {"x1": torch.randn(128, 2)}
    torch.manual_seed(3)
    selective = MeanFlowLoss(full_batch_jvp=False)(model, batch)
    torch.manual_seed(3)
    full = MeanFlowLoss(full_batch_jvp=True)(model, batch)
    torch.testing.assert_close(selective.loss, full.loss, rtol=1e-5, atol=1e-6)
    selective.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_time_sampling_runs_towards_the_data_at_the_configured_ratio():
    torch.manual_seed(0)
    t, r = MeanFlowLoss(ratio=0.25).sample_times(20000, torch.device("cpu"))
    assert torch.all((0 <= t) & (t <= r) & (r <= 1))
    assert abs((r != t).float().mean().item() - 0.25) < 0.02


def test_training_time_guidance_mixes_the_target_as_the_paper():
    class PerClass(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.arange(4.0)[:, None].expand(4, 2).clone())  # class k -> (k, k)

        def forward(self, x, t, r, cond=None):
            return self.table[3 if cond is None else cond]  # None: the null class

    loss_fn = MeanFlowLoss(omega=2.0, kappa=0.5, cond_dropout=0.1)
    v = torch.ones(4, 2)
    cond = torch.tensor([0, 1, 2, 3])
    kept = torch.tensor([True, True, True, False])
    guided = loss_fn._guided_velocity(PerClass(), torch.zeros(4, 2), torch.zeros(4), v, cond, kept)
    # omega v + kappa u(c) + (1 - omega - kappa) u(null=3) = 2 + 0.5 k - 1.5 * 3
    expected = torch.tensor([2 + 0.5 * k - 4.5 for k in range(3)] + [1.0])[:, None].expand(4, 2)
    torch.testing.assert_close(guided, expected)


def test_training_time_guidance_without_classes_is_refused_before_any_work(make_cfg, tmp_path):
    from training.train import train

    with pytest.raises(UserError, match=r"loss.omega/kappa .* need class labels; dataloaders=moons has none"):
        train(make_cfg("loss=meanflow", "solver=meanflow", "loss.omega=2.0"))
    assert not (tmp_path / "outputs").exists()


def test_one_step_sampling_reaches_the_point_for_the_exact_model():
    c = torch.tensor([1.5, -2.0])
    model = SinglePointAverageVelocity(c)
    noise = torch.randn(100, 2)
    for nfe in (1, 2):
        solver = MeanFlowSolver()
        out = solver(velocity_of(model), noise.clone(), solver.grid(nfe))
        assert out.nfe == nfe
        torch.testing.assert_close(out.x, c.expand(100, 2), rtol=1e-5, atol=1e-5)


def test_meanflow_learns_one_step_moons(make_cfg):
    metrics, _ = train(
        make_cfg(
            "loss=meanflow", "solver=meanflow", "epochs=12", "dataloaders.num_train=4096", "model.hidden=64",
            "eval.nfe=[1,2]", "eval.num_samples=1000", "dataloaders.num_eval=1000", "eval.every_epochs=0",
        )
    )  # fmt: skip
    # untrained one-step samples stay near the noise, ~1.3 from the moons; flow matching at 1 NFE ~1.5
    assert metrics["eval/energy_distance@nfe1"] < 0.3
    assert metrics["eval/nfe_used@nfe1"] == 1


def test_nan_in_meanflow_names_the_step_and_the_term(make_cfg, tmp_path):
    from training.checkpoint import load_checkpoint
    from training.errors import NonFiniteLossError

    cfg = make_cfg("loss=meanflow", "loss._target_=helpers.MeanFlowNaNAfter", "+loss.after=10", "solver=meanflow")
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 11 \(epoch 1; non-finite terms: meanflow/dudt_norm\)"
    ):
        train(cfg)
    assert load_checkpoint(tmp_path / "outputs" / "ckpts" / "mlp" / "test" / "last.pt", builds=False)["step"] == 8


def test_loss_metrics_reach_the_tracker_as_window_means():
    from dataloaders.base import TensorLoader
    from training.precision import Precision
    from training.schedules import warmup_constant
    from training.tracking import Tracker
    from training.trainer import Trainer

    class Capture(Tracker):
        def __init__(self):
            self.logged: list[tuple[int, dict[str, float]]] = []

        def log(self, metrics, step):
            self.logged.append((step, metrics))

    model = MLP(dim=2, hidden=16, depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = Capture()
    trainer = Trainer(
        model, MeanFlowLoss(), optimizer, warmup_constant(optimizer, 8), Precision("fp32"), torch.device("cpu"),
        tracker, log_every=4,
    )  # fmt: skip
    trainer.fit(TensorLoader(torch.randn(256, 2), 32, seed=0), epochs=1, max_steps=None)
    assert [step for step, _ in tracker.logged] == [4, 8]
    for _, metrics in tracker.logged:
        assert metrics["train/meanflow/mse"] > 0 and metrics["train/meanflow/dudt_norm"] > 0
        assert metrics["train/loss"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_graph_without_cuda_or_full_batch_jvp_is_a_one_line_error(make_cfg):
    from training.errors import UserError

    with pytest.raises(UserError, match=r"^loss.use_cuda_graph=true needs CUDA \(device is cpu\)"):
        train(make_cfg("loss=meanflow", "solver=meanflow", "loss.use_cuda_graph=true", "loss.full_batch_jvp=true"))
    with pytest.raises(ValueError, match="needs loss.full_batch_jvp=true"):
        MeanFlowLoss(use_cuda_graph=True).check(torch.device("cuda"))
