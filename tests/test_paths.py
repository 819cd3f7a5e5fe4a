"""Probability paths and time samplers: round trips in float64, the velocity as the path's t-derivative, shape
errors in one line, the samplers' laws, the losses' draws unchanged, and another path or time distribution
chosen from the command line alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from losses.meanflow import MeanFlowLoss
from models.mlp import MLP
from paths.affine import AffinePath, CosinePath, LinearPath, PathSample, expand_like
from paths.time import LogitNormalTimeSampler, UniformTimeSampler
from training.checkpoint import load_checkpoint, save_checkpoint
from training.compose import compose_config
from training.config_tree import CONFIG_DIR
from training.train import train
from training.trusted import unsafe_reason
from training.upgrade import upgrade_loss_config

PATHS = [LinearPath(), CosinePath()]
SHAPES = [(6, 2), (6, 3, 4, 4)]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "loss" / group).glob("*.yaml"))


def pair(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_the_path_runs_from_the_noise_at_0_to_the_data_at_1(path, shape):
    x_0, x_1 = pair(shape)
    ones = torch.ones(shape[0], dtype=torch.float64)
    torch.testing.assert_close(path.sample(x_0, x_1, 0 * ones).x_t, x_0, rtol=0, atol=1e-15)
    torch.testing.assert_close(path.sample(x_0, x_1, ones).x_t, x_1, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_the_target_is_the_t_derivative_of_x_t(path, shape):
    x_0, x_1 = pair(shape)
    t = torch.rand(shape[0], dtype=torch.float64)
    sample = path.sample(x_0, x_1, t)
    x_t, dx_dt = torch.func.jvp(lambda t_: path.sample(x_0, x_1, t_).x_t, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(x_t, sample.x_t, rtol=0, atol=0)
    torch.testing.assert_close(dx_dt, sample.target, rtol=1e-12, atol=1e-12)
    eps = 1e-6  # and by central differences, independently of autograd
    fd = (path.sample(x_0, x_1, t + eps).x_t - path.sample(x_0, x_1, t - eps).x_t) / (2 * eps)
    torch.testing.assert_close(fd, sample.target, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_the_coefficients_derivatives_are_their_t_derivatives(path):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = path.coefficients(t)
    _, (da, ds, _, _) = torch.func.jvp(path.coefficients, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(da, d_alpha_t)
    torch.testing.assert_close(ds, d_sigma_t)


def test_the_linear_paths_fused_interpolation_is_its_affine_one():
    x_0, x_1 = pair((6, 3))
    t = expand_like(torch.rand(6, dtype=torch.float64), x_1)
    fused, affine = LinearPath().interpolate(x_0, x_1, t), AffinePath.interpolate(LinearPath(), x_0, x_1, t)
    torch.testing.assert_close(fused.x_t, affine.x_t, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(fused.target, affine.target, rtol=0, atol=0)


def test_the_cosine_path_preserves_variance():
    alpha_t, sigma_t, _, _ = CosinePath().coefficients(torch.rand(100, dtype=torch.float64))
    torch.testing.assert_close(alpha_t**2 + sigma_t**2, torch.ones(100, dtype=torch.float64))


def test_linear_path_sigma_adds_gaussian_noise_of_that_width_and_keeps_the_target():
    torch.manual_seed(0)
    x_0, x_1 = pair((20000, 2))
    t = torch.rand(20000, dtype=torch.float64)
    noisy = LinearPath(sigma=0.1).sample(x_0, x_1, t)
    clean = LinearPath().sample(x_0, x_1, t)
    assert torch.equal(noisy.target, clean.target)
    assert abs((noisy.x_t - clean.x_t).std().item() - 0.1) < 0.002
    with pytest.raises(ValueError, match=r"^path.sigma must be >= 0, got -0.1$"):
        LinearPath(sigma=-0.1)


@pytest.mark.parametrize(
    "x_0, x_1, t",
    [((4, 2), (4, 3), (4,)), ((4, 2), (4, 2), (3,)), ((4, 2), (4, 2), (4, 1)), ((4, 2), (4, 2), ())],
)
def test_mismatched_shapes_are_a_one_line_error_naming_them(x_0, x_1, t):
    with pytest.raises(ValueError) as e:
        LinearPath().sample(torch.zeros(x_0), torch.zeros(x_1), torch.zeros(t))
    assert str(e.value) == (
        f"path.sample needs x_0 and x_1 of one shape (B, ...) and t of shape (B,); got x_0 {x_0}, x_1 {x_1}, t {t}"
    )
    with pytest.raises(ValueError, match=r"^x_t \(4, 2\) and target \(4, 3\) differ in shape$"):
        PathSample(torch.zeros(4, 2), torch.zeros(4, 3))


def test_expand_like_gives_one_value_per_row():
    t = torch.arange(3.0)
    assert expand_like(t, torch.zeros(3, 5, 2, 2)).shape == (3, 1, 1, 1)
    assert expand_like(t, torch.zeros(3, 5)).shape == (3, 1)
    assert torch.equal((expand_like(t, torch.zeros(3, 4)) * torch.ones(3, 4))[:, 2], t)


def test_uniform_times_fill_the_unit_interval():
    torch.manual_seed(0)
    t = UniformTimeSampler()(200000, torch.device("cpu"), torch.float64)
    assert t.dtype == torch.float64 and t.shape == (200000,)
    assert 0 <= t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005 and abs(t.var().item() - 1 / 12) < 0.002


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.4, 1.0), (-1.0, 0.5)])
def test_logit_normal_times_have_that_mean_and_std_of_the_logit(mean, std):
    torch.manual_seed(0)
    t = LogitNormalTimeSampler(mean, std)((2, 100000), torch.device("cpu"), torch.float64)
    assert t.shape == (2, 100000) and bool(((0 < t) & (t < 1)).all())
    logit = torch.logit(t)
    assert abs(logit.mean().item() - mean) < 0.01 and abs(logit.std().item() - std) < 0.01


def test_logit_normal_needs_a_positive_std():
    with pytest.raises(ValueError, match=r"^time_sampler.std must be > 0, got 0.0$"):
        LogitNormalTimeSampler(0.0, 0.0)


@pytest.mark.parametrize("mu, sigma", [(-0.4, 1.0), (0.0, 0.5)])
def test_meanflow_draws_the_same_times_as_before_the_time_sampler(mu, sigma):
    """The times MeanFlow drew inline (in the paper's time, data at 0), bit for bit for the same seed."""
    n, ratio = 1000, 0.25
    torch.manual_seed(0)
    s = torch.sigmoid(mu + sigma * torch.randn(2, n))
    s_t, s_r = s.max(dim=0).values, s.min(dim=0).values
    s_r = torch.where(torch.rand(n) >= ratio, s_t, s_r)
    torch.manual_seed(0)
    loss = MeanFlowLoss(ratio=ratio, time_sampler=LogitNormalTimeSampler(mean=0.0 - mu, std=sigma))
    t, r = loss.sample_times(n, torch.device("cpu"))
    assert torch.equal(t, 1 - s_t) and torch.equal(r, 1 - s_r)


def test_meanflow_loss_matches_its_inline_path():
    model = MLP(dim=2, hidden=16, depth=2)
    batch = {"x1": torch.randn(64, 2)}
    torch.manual_seed(2)
    ours = MeanFlowLoss(ratio=1.0, full_batch_jvp=True, cond_dropout=0.0)(model, batch).metrics["meanflow/mse"]
    torch.manual_seed(2)
    x_1 = batch["x1"]
    x_0 = torch.randn_like(x_1)
    t, r = MeanFlowLoss(ratio=1.0).sample_times(64, x_1.device)
    x_t, v = (1 - t[:, None]) * x_0 + t[:, None] * x_1, x_1 - x_0
    u, dudt = torch.func.jvp(lambda x, t_, r_: model(x, t_, r_), (x_t, t, r), (v, torch.ones_like(t), 0 * r))
    target = v - (t - r)[:, None] * dudt
    torch.testing.assert_close(ours, ((u - target) ** 2).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["fm", "meanflow"])
@pytest.mark.parametrize(
    "choice", [f"loss/path={o}" for o in options("path")] + [f"loss/time_sampler={o}" for o in options("time_sampler")]
)
def test_every_path_and_time_sampler_option_trains_from_the_command_line(make_cfg, loss, choice):
    group, option = choice.removeprefix("loss/").split("=")
    solver = ["solver=meanflow"] if loss == "meanflow" else []
    cfg = make_cfg(f"loss={loss}", *solver, choice, "max_steps=3", "epochs=1", "eval.nfe=[1]")
    metrics, objects = train(cfg)
    node = OmegaConf.load(CONFIG_DIR / "loss" / group / f"{option}.yaml")
    assert type(getattr(objects["trainer"].loss_fn, group)).__name__ == node._target_.rsplit(".", 1)[-1]
    assert metrics["train/steps"] == 3 and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    state = load_checkpoint(objects["checkpoint"])  # its config is one configs/ builds: trusted, rebuilt
    assert unsafe_reason(state["config"], state["sampling"]) is None
    assert state["config"]["loss"][group] == OmegaConf.to_container(node)


def test_a_time_sampler_setting_is_a_command_line_value(make_cfg):
    cfg = make_cfg("loss/time_sampler=logit_normal", "loss.time_sampler.mean=0.5", "max_steps=2", "epochs=1")
    _, objects = train(cfg)
    sampler = objects["trainer"].loss_fn.time_sampler
    assert isinstance(sampler, LogitNormalTimeSampler) and sampler.mean == 0.5


def composed_loss(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(["run_name=x", "paths.run_dir=x", *overrides]).loss)  # type: ignore


# each loss node as checkpoints stored it before paths/, and the command that trained it
OLD_LOSS_NODES = [
    (["loss=fm"], {"_target_": "losses.flow_matching.FlowMatchingLoss", "sigma": 0.0, "cond_dropout": 0.1,
                   "coupling": {"_target_": "losses.coupling.IndependentCoupling"}}),
    (["loss=fm_ot"], {"_target_": "losses.flow_matching.FlowMatchingLoss", "sigma": 0.0, "cond_dropout": 0.1,
                      "coupling": {"_target_": "losses.coupling.OTCoupling"}}),
    (["loss=meanflow"], {"_target_": "losses.meanflow.MeanFlowLoss", "ratio": 0.25, "p": 1.0, "c": 1e-3, "mu": -0.4,
                         "sigma": 1.0, "full_batch_jvp": False, "jvp_fp32": True, "omega": 1.0, "kappa": 0.0,
                         "cond_dropout": 0.1, "use_cuda_graph": False}),
    (["experiment=moons_meanflow"], {"_target_": "losses.meanflow.MeanFlowLoss", "ratio": 0.75, "p": 0.5, "c": 1e-3,
                                     "mu": 0.0, "sigma": 1.0, "full_batch_jvp": False, "jvp_fp32": True, "omega": 1.0,
                                     "kappa": 0.0, "cond_dropout": 0.1, "use_cuda_graph": False}),
]  # fmt: skip


@pytest.mark.parametrize("overrides, old", OLD_LOSS_NODES, ids=["fm", "fm_ot", "meanflow", "moons_meanflow"])
def test_an_old_loss_node_gains_the_path_and_times_it_trained_with(overrides, old):
    assert upgrade_loss_config(old) == composed_loss(*overrides)


def test_a_flow_loss_with_a_path_is_left_as_it_is():
    today = composed_loss("loss=meanflow", "loss/time_sampler=uniform", "loss/path=cosine")
    assert upgrade_loss_config(today) == today


def test_a_run_from_before_paths_resumes_and_rescores(make_cfg, tmp_path):
    _, objects = train(make_cfg())
    path: Path = objects["checkpoint"]
    state = torch.load(path, weights_only=True)
    loss = state["config"]["loss"]
    state["config"]["loss"] = {**{k: v for k, v in loss.items() if k not in ("path", "time_sampler")}, "sigma": 0.0}
    save_checkpoint(state, path)
    assert load_checkpoint(path)["config"]["loss"] == loss
    train(make_cfg(f"eval_checkpoint={path}", "run_name=ev", f"paths.run_dir={tmp_path}/ev"))
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["eval/sampler"] == "euler"
    metrics, _ = train(make_cfg("resume=true", "epochs=3"))
    assert metrics["train/steps"] == 24
