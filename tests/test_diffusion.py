"""GLIDE-style diffusion: schedules, respacing, the loss and the samplers.

Samplers are checked against an independent implementation of each update on a fixed input (a
direct GLIDE ``p_sample`` / ``ddim_sample`` for the diffusers-backed ones, diffusers' schedulers for
the direct sigma-space ones) and against a Gaussian data distribution whose exact eps predictor is
known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from torch import Tensor, nn

from evaluation.sample_generation import guided_denoiser, sample
from losses.diffusion import DiffusionLoss
from models.conditioning import drop_condition, null_condition
from paths.diffusion_schedule import DiffusionSchedule, betas_for, space_timesteps
from solvers.diffusion import (
    SAMPLERS,
    SIGMA_SAMPLERS,
    DiffusionSampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sigma_grid,
)

torch.set_num_threads(2)

COSINE = DiffusionSchedule(betas_for("squaredcos_cap_v2"))
LINEAR = DiffusionSchedule(betas_for("linear"))

# diffusers' schedulers build sigmas through numpy arrays of tensors
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class TinyNet(nn.Module):
    """A small conv stand-in for GLIDE's model: ``(x, t, r, cond) -> (eps, variance values)``."""

    output = "eps_var"

    def __init__(self, channels: int = 3, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )

    def forward(self, x: Tensor, t: Tensor, r: None, cond: dict | None) -> Tensor:
        t_map = (t / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, t_map], dim=1))


class TextNet(nn.Module):
    """Conditional stand-in: the text (tokens under the mask, none where ``drop``) shifts eps; records
    the batches it sees."""

    output = "eps_var"

    def __init__(self):
        super().__init__()
        self.body = TinyNet()
        self.calls: list[int] = []

    def forward(self, x: Tensor, t: Tensor, r: None, cond: dict | None) -> Tensor:
        self.calls.append(len(x))
        out = self.body(x, t, r, cond)
        if cond is None:
            return out
        mask = cond["mask"] & ~cond["drop"][:, None] if "drop" in cond else cond["mask"]
        text = (cond["tokens"].float() * mask.float()).mean(dim=1) / 10  # (B,)
        return out + text.view(-1, 1, 1, 1)


class NearlyExact(nn.Module):
    """The closed-form Gaussian eps predictor (below) plus a small random conv net: a sane,
    spatially varying denoiser, so sampler comparisons are not dominated by x_start ~ sigma_max."""

    output = "eps_var"

    def __init__(self, schedule: DiffusionSchedule):
        super().__init__()
        self.exact, self.net = GaussianEps(schedule), TinyNet()

    def forward(self, x: Tensor, t: Tensor, r: None, cond: dict | None) -> Tensor:
        return self.exact(x, t, r, cond) + 0.1 * self.net(x, t, r, cond)


def fixed_model(schedule: DiffusionSchedule = COSINE, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return NearlyExact(schedule).eval()


def noise(shape: tuple[int, ...] = (2, 3, 8, 8), seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# schedules and respacing


def test_cosine_betas_are_capped_and_linear_endpoints_match_glide():
    cos = betas_for("squaredcos_cap_v2")
    assert cos.shape == (1000,) and cos.dtype == torch.float64
    assert bool((cos > 0).all()) and cos.max() <= 0.999 and cos[-1] == 0.999
    lin = betas_for("linear")
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    lin500 = betas_for("linear", 500)  # GLIDE scales by 1000 / steps
    assert lin500[0].item() == pytest.approx(2e-4) and lin500[-1].item() == pytest.approx(0.04)
    with pytest.raises(ValueError, match="valid: squaredcos_cap_v2, linear"):
        betas_for("cosine")


def test_q_sample_has_the_marginal_mean_and_std():
    x_start = torch.full((20000, 1, 2, 2), 0.5)
    t = torch.full((20000,), 300)
    x_t = COSINE.q_sample(x_start, t, torch.randn_like(x_start))
    a = COSINE.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=0.01)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - a), abs=0.01)


@pytest.mark.parametrize(
    "spec, count, head, tail",
    [
        ("100", 100, [0, 10, 20, 30], [979, 989, 999]),
        ("ddim50", 50, [0, 20, 40], [940, 960, 980]),
        # GLIDE's preset: sections of 200 steps strided to 10,10,3,2,2, and 997 instead of 999
        ("fast27", 27, [0, 22, 44, 66, 88, 111, 133, 155, 177, 199, 200], [799, 800, 997]),
    ],
)
def test_respacing_keeps_alphas_cumprod_and_maps_to_original_timesteps(spec, count, head, tail):
    spaced = COSINE.respace(spec)
    kept = spaced.timestep_map
    assert len(spaced) == count and kept.tolist() == sorted(set(kept.tolist()))
    assert kept[: len(head)].tolist() == head and kept[-len(tail) :].tolist() == tail
    torch.testing.assert_close(spaced.alphas_cumprod, COSINE.alphas_cumprod[kept], rtol=1e-10, atol=0)
    # recomputed betas: each step jumps from the previous kept alpha_bar
    torch.testing.assert_close(spaced.betas[1:], 1 - COSINE.alphas_cumprod[kept[1:]] / COSINE.alphas_cumprod[kept[:-1]])
    # a kept step's noise level maps back to its original timestep
    torch.testing.assert_close(spaced.sigma_to_timestep(spaced.sigmas), kept.double())


def test_ddim_spacing_is_an_exact_stride_and_sections_follow_glide():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22]  # (100 - 1) / 9 = 11
    assert len(space_timesteps(300, "10,15,20")) == 45


@pytest.mark.parametrize("spec", ["fast", "ddimx", "ddim3000", "2000", "10,0", ""])
def test_bad_respacing_specs_raise(spec):
    with pytest.raises(ValueError):
        COSINE.respace(spec)


def test_vb_term_is_zero_for_the_true_posterior_and_a_likelihood_at_t0():
    torch.manual_seed(0)
    x_start = torch.rand(4, 3, 4, 4) * 2 - 1
    eps = torch.randn_like(x_start)
    t = torch.tensor([0, 1, 500, 999])
    x_t = COSINE.q_sample(x_start.double(), t, eps.double())
    # exact eps and v = -1 (the posterior variance) give the true posterior: KL = 0 for t > 0
    vb = COSINE.vb_terms_bpd(x_start.double(), x_t, t, eps.double(), -torch.ones_like(x_t))
    torch.testing.assert_close(vb[1:], torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    assert vb[0] > 0  # the decoder's -log-likelihood of 8-bit data, in bits/dim


# ---------------------------------------------------------------------------------------------
# the loss


def test_loss_is_finite_scalar_with_metrics():
    loss = DiffusionLoss(loss_type="hybrid")
    out = loss(fixed_model(), {"x1": torch.rand(4, 3, 8, 8) * 2 - 1, "cond": None})
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.metrics) == {"diffusion/mse", "diffusion/vb"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in out.metrics.values())
    with pytest.raises(ValueError, match="valid: simple, hybrid"):
        DiffusionLoss(loss_type="kl")


def test_loss_is_float32_under_autocast():
    loss = DiffusionLoss(loss_type="hybrid")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(fixed_model(), {"x1": torch.rand(4, 3, 8, 8) * 2 - 1, "cond": None})
    assert out.loss.dtype == torch.float32 and out.metrics["diffusion/vb"].dtype == torch.float32


@pytest.mark.parametrize("loss_type", ["simple", "hybrid"])
def test_training_a_tiny_net_lowers_the_loss(loss_type):
    torch.manual_seed(0)
    data = torch.rand(8, 3, 8, 8).round() * 2 - 1  # a tiny fixed binary-image data set
    model = TinyNet()
    loss = DiffusionLoss(loss_type=loss_type, cond_dropout=0.0)

    def held_out() -> float:
        torch.manual_seed(123)  # the same t and noise before and after
        with torch.no_grad():
            return sum(loss(model, {"x1": data, "cond": None}).loss.item() for _ in range(20)) / 20

    before = held_out()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        out = loss(model, {"x1": data, "cond": None})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = held_out()
    assert after < 0.6 * before, (before, after)  # ~1.01 -> ~0.42 in 300 steps


def test_text_dropout_marks_the_right_fraction_of_rows():
    torch.manual_seed(0)
    cond = {"tokens": torch.randint(1, 100, (20000, 6)), "mask": torch.ones(20000, 6, dtype=torch.bool)}
    dropped = drop_condition(cond, 0.2)
    assert isinstance(dropped, dict)
    assert dropped["drop"].float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert dropped["tokens"] is cond["tokens"] and dropped["mask"] is cond["mask"]  # kept, input not mutated
    assert "drop" not in cond
    assert drop_condition(cond, 0.0) is cond and drop_condition(None, 0.5) is None
    assert bool(null_condition(cond)["drop"].all())


def test_label_dropout_marks_the_null_class_and_the_model_embeds_it_as_the_null_row():
    from models.layers import LabelEmbedder

    torch.manual_seed(0)
    labels = torch.arange(20000) % 10
    dropped = drop_condition(labels, 0.1)
    assert isinstance(dropped, Tensor)
    off = dropped == -1
    assert off.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(dropped[~off], labels[~off])
    embed = LabelEmbedder(10, 4)
    torch.testing.assert_close(embed(dropped[off][:3], 3, torch.device("cpu")), embed(None, 3, torch.device("cpu")))


def test_loss_passes_dropped_condition_and_original_timesteps_to_the_model():
    seen = {}

    class Recorder(TinyNet):
        def forward(self, x, t, r, cond):
            seen.update(t=t, r=r, cond=cond)
            return super().forward(x, t, r, cond)

    cond = {"tokens": torch.ones(1000, 4, dtype=torch.long), "mask": torch.ones(1000, 4, dtype=torch.bool)}
    DiffusionLoss(cond_dropout=0.5)(Recorder(), {"x1": torch.zeros(1000, 3, 2, 2), "cond": cond})
    assert torch.equal(seen["r"], seen["t"]) and seen["t"].dtype == torch.float32
    assert 0 <= seen["t"].min() and seen["t"].max() <= 999 and seen["t"].max() > 900
    assert seen["cond"]["drop"].float().mean().item() == pytest.approx(0.5, abs=0.06)


def test_a_field_model_trains_on_eps_with_flow_time_and_samples_with_the_fixed_variance():
    """A model with C output channels (UNet, DiT) predicts eps alone, sees time 1 - t/T (noise at 0),
    and the samplers run it with DDPM's fixed posterior variance."""
    seen = {}

    class Field(nn.Module):
        output = "field"

        def forward(self, x, t, r, cond):
            seen.update(t=t)
            return torch.zeros_like(x)

    out = DiffusionLoss()(Field(), {"x1": torch.zeros(500, 1, 2, 2), "cond": None})
    assert torch.isfinite(out.loss) and 0 <= seen["t"].min() and seen["t"].max() <= 1
    sampler = DiffusionSampler("ddpm")
    solution, _ = sample(Field(), sampler, noise((2, 1, 4, 4)), 10, generator=torch.Generator().manual_seed(0))
    assert solution.nfe == 10 and solution.x.shape == (2, 1, 4, 4) and torch.isfinite(solution.x).all()
    assert torch.equal(seen["t"], torch.ones(2))  # the last kept step is timestep 0: time 1, the data end


def test_hybrid_adds_a_vb_term_whose_gradient_reaches_only_the_variance_channels():
    out_param = nn.Parameter(torch.randn(4, 6, 8, 8) * 0.1)

    class Constant(nn.Module):
        output = "eps_var"

        def forward(self, x, t, r, cond):
            return out_param

    x1 = torch.rand(4, 3, 8, 8) * 2 - 1
    grads, losses = {}, {}
    for loss_type in ("simple", "hybrid"):
        torch.manual_seed(0)  # the same t and noise for both
        out_param.grad = None
        out = DiffusionLoss(loss_type=loss_type)(Constant(), {"x1": x1, "cond": None})
        out.loss.backward()
        grads[loss_type], losses[loss_type] = out_param.grad.clone(), out
    assert losses["hybrid"].loss > losses["simple"].loss
    torch.testing.assert_close(
        losses["hybrid"].loss, losses["hybrid"].metrics["diffusion/mse"] + losses["hybrid"].metrics["diffusion/vb"]
    )
    torch.testing.assert_close(grads["hybrid"][:, :3], grads["simple"][:, :3])  # eps: the MSE only
    assert bool((grads["simple"][:, 3:] == 0).all()) and grads["hybrid"][:, 3:].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# guidance


def text_cond(batch: int) -> dict[str, Tensor]:
    tokens = torch.arange(batch * 4).view(batch, 4) % 7 + 1
    return {"tokens": tokens, "mask": torch.ones(batch, 4, dtype=torch.bool)}


def test_cfg_scale_one_is_the_conditional_model_exactly():
    torch.manual_seed(0)
    model, x, t, cond = TextNet(), torch.randn(3, 3, 8, 8), torch.tensor(500.0), text_cond(3)
    eps, var_values = guided_denoiser(model, cond, 1.0)(x, t)
    out = model(x, t.expand(3), t.expand(3), cond)
    assert torch.equal(eps, out[:, :3]) and torch.equal(var_values, out[:, 3:])
    assert model.calls == [3, 3]  # one plain call each


def test_cfg_runs_one_batched_call_and_extrapolates_from_the_unconditional_half():
    torch.manual_seed(0)
    model, x, t, cond = TextNet(), torch.randn(3, 3, 8, 8), torch.tensor(500.0), text_cond(3)
    eps, var_values = guided_denoiser(model, cond, 3.0)(x, t)
    assert model.calls == [6]
    uncond = {**cond, "mask": torch.zeros_like(cond["mask"])}
    out_c, out_u = model(x, t.expand(3), None, cond), model(x, t.expand(3), None, uncond)  # mask off: the same null
    assert not torch.allclose(out_c, out_u)
    torch.testing.assert_close(eps, out_u[:, :3] + 3.0 * (out_c[:, :3] - out_u[:, :3]))
    torch.testing.assert_close(var_values, out_c[:, 3:])


# ---------------------------------------------------------------------------------------------
# samplers: direct references for the diffusers-backed ones


def glide_ddpm(denoiser, x_T, schedule, generator):
    """GLIDE's p_sample_loop, written out."""
    x = x_T
    for i in reversed(range(len(schedule))):
        t = torch.full((len(x),), i)
        eps, var_values = denoiser(x, schedule.timestep_map[i].float())
        out = schedule.p_mean_variance(eps, var_values, x, t, clip=True)
        if i > 0:
            x = out.mean + torch.exp(0.5 * out.log_variance) * torch.randn(x.shape, generator=generator)
        else:
            x = out.mean
    return x


def glide_ddim(denoiser, x_T, schedule, generator, eta):
    """GLIDE's ddim_sample_loop, written out."""
    x = x_T
    for i in reversed(range(len(schedule))):
        t = torch.full((len(x),), i)
        eps, _ = denoiser(x, schedule.timestep_map[i].float())
        x_start = schedule.predict_x_start_from_eps(x, t, eps).clamp(-1, 1)
        eps = schedule.predict_eps_from_x_start(x, t, x_start)
        a, a_prev = schedule.alphas_cumprod[i].item(), schedule.alphas_cumprod_prev[i].item()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x = x_start * math.sqrt(a_prev) + math.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0:  # diffusers draws at every step; the last step's sigma is 0
            x = x + sigma * torch.randn(x.shape, generator=generator)
    return x


@pytest.mark.parametrize("spec", ["100", "fast27"])
def test_ddpm_matches_glide_p_sample(spec):
    schedule, denoiser = COSINE.respace(spec), guided_denoiser(fixed_model(), None)
    ours = sample_ddpm(denoiser, noise(), schedule, generator=torch.Generator().manual_seed(1))
    ref = glide_ddpm(denoiser, noise(), schedule, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_glide_ddim_sample(eta):
    schedule, denoiser = COSINE.respace("fast27"), guided_denoiser(fixed_model(), None)
    ours = sample_ddim(denoiser, noise(), schedule, generator=torch.Generator().manual_seed(1), eta=eta)
    ref = glide_ddim(denoiser, noise(), schedule, torch.Generator().manual_seed(1), eta)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_ddim_calls_the_model_at_the_original_timesteps():
    schedule, seen = COSINE.respace("fast27"), []
    sample_ddim(guided_denoiser(fixed_model(), None), noise(), schedule, callback=lambda t, x: seen.append(int(t)))
    assert seen == schedule.timestep_map.flip(0).tolist()


# ---------------------------------------------------------------------------------------------
# samplers: diffusers' schedulers as the reference for the direct sigma-space ones


def run_diffusers(scheduler, denoiser, x_T, schedule, generator=None, sigma_space=True):
    """Drive a diffusers scheduler; the model's timestep comes from each sigma, as in ours.

    The linear schedule is used with it: diffusers holds alphas_cumprod in float32, and the cosine
    schedule's noisiest respaced beta (~ 1 - 1e-4) then loses ~5e-4 of sigma_max to rounding."""
    scheduler.set_timesteps(len(schedule))
    scheduler.set_begin_index(0)
    x = x_T * math.sqrt(1 + scheduler.sigmas[0].item() ** 2) if sigma_space else x_T
    for i, index in enumerate(scheduler.timesteps):
        t = schedule.sigma_to_timestep(scheduler.sigmas[i].double()).float()
        eps, _ = denoiser(scheduler.scale_model_input(x, index), t)
        x = scheduler.step(eps, index, x, generator=generator).prev_sample
    return x


def diffusers_kwargs(schedule):
    return {"num_train_timesteps": len(schedule), "trained_betas": schedule.betas.tolist()}


@pytest.mark.parametrize("karras", [False, True])
def test_euler_matches_diffusers(karras):
    schedule, denoiser = LINEAR.respace("50"), guided_denoiser(fixed_model(LINEAR), None)
    scheduler = EulerDiscreteScheduler(**diffusers_kwargs(schedule), use_karras_sigmas=karras)
    ref = run_diffusers(scheduler, denoiser, noise(), schedule)
    torch.testing.assert_close(
        torch.from_numpy(scheduler.sigmas.numpy()).double(), sigma_grid(schedule, karras), rtol=2e-4, atol=0
    )
    torch.testing.assert_close(sample_euler(denoiser, noise(), schedule, karras=karras), ref, atol=1e-4, rtol=1e-4)


def test_euler_ancestral_matches_diffusers():
    schedule, denoiser = LINEAR.respace("50"), guided_denoiser(fixed_model(LINEAR), None)
    scheduler = EulerAncestralDiscreteScheduler(**diffusers_kwargs(schedule))
    ref = run_diffusers(scheduler, denoiser, noise(), schedule, generator=torch.Generator().manual_seed(1))
    ours = sample_euler_ancestral(denoiser, noise(), schedule, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(karras):
    schedule, denoiser = LINEAR.respace("50"), guided_denoiser(fixed_model(LINEAR), None)
    scheduler = DPMSolverMultistepScheduler(
        **diffusers_kwargs(schedule),
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=karras,
        timestep_spacing="trailing",  # one inference step per kept step
    )
    # diffusers' DPM-Solver works in DDPM space; the data-prediction update is the same in sigma space
    ref = run_diffusers(scheduler, denoiser, noise(), schedule, sigma_space=False)
    torch.testing.assert_close(
        torch.from_numpy(scheduler.sigmas.numpy()).double(), sigma_grid(schedule, karras), rtol=2e-4, atol=0
    )
    torch.testing.assert_close(sample_dpmpp_2m(denoiser, noise(), schedule, karras=karras), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# the sampler contract and a closed-form check


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_shape_range_and_determinism(name):
    sampler = DiffusionSampler(name, respacing="fast27")
    model, cond = TextNet(), text_cond(2)

    def run(seed: int) -> Tensor:
        solution, _ = sample(
            model, sampler, noise(), 0, cond=cond, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed)
        )
        assert solution.nfe == 27
        return solution.x

    first = run(1)
    assert first.shape == (2, 3, 8, 8) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1 and torch.isfinite(first).all()
    assert torch.equal(first, run(1))
    if name in ("ddpm", "euler_a"):
        assert not torch.equal(first, run(2))  # the generator drives the noise
    assert not first.requires_grad


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_sees_every_step(name):
    schedule, times = COSINE.respace("fast27"), []
    SAMPLERS[name](
        guided_denoiser(fixed_model(), None), noise(), schedule, callback=lambda t, x: times.append(float(t))
    )
    assert len(times) == 27 and times == sorted(times, reverse=True)


MU, STD = 0.3, 0.2


class GaussianEps(nn.Module):
    """The exact eps predictor for data ~ N(MU, STD^2) per pixel: E[eps | x_t] in closed form."""

    output = "eps_var"

    def __init__(self, schedule: DiffusionSchedule = COSINE):
        super().__init__()
        self.alphas_cumprod = schedule.alphas_cumprod

    def forward(self, x: Tensor, t: Tensor, r: None, cond: dict | None) -> Tensor:
        # alpha_bar at a fractional timestep, by the log-sigma interpolation the samplers invert
        log_sigmas = 0.5 * ((1 - self.alphas_cumprod) / self.alphas_cumprod).log()
        low = t.double().floor().long().clamp(0, 998)
        w = t.double() - low
        sigma2 = torch.exp(2 * ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]))
        a = (1 / (1 + sigma2)).view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1).float()  # v = -1: the posterior variance


@pytest.mark.parametrize("name, karras", [(n, False) for n in SAMPLERS] + [(n, True) for n in SIGMA_SAMPLERS])
def test_exact_eps_predictor_lands_on_the_gaussian_data(name, karras):
    # ancestral Euler is first order in its variance error (std 0.184 at 100 steps, 0.193 at 200)
    sampler = DiffusionSampler(name, respacing="400" if name == "euler_a" else "100", karras=karras)
    samples = sample(GaussianEps(), sampler, noise((4000, 1, 1, 1)), 0, generator=torch.Generator().manual_seed(1))[0].x
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, abs=0.02)


def test_bad_sampler_settings_raise_one_line_errors():
    with pytest.raises(ValueError, match="valid: ddpm, ddim, dpmpp_2m, euler, euler_a"):
        DiffusionSampler("heun")
    with pytest.raises(ValueError, match="valid"):
        DiffusionSampler("ddim", respacing="fast")
    with pytest.raises(ValueError, match="karras"):
        DiffusionSampler("ddim", karras=True)
    with pytest.raises(ValueError, match="eta"):
        DiffusionSampler("euler", eta=0.5)
    with pytest.raises(ValueError, match="valid"):
        DiffusionSampler("ddim", noise_schedule="cosine")


def test_an_nfe_budget_beyond_the_schedule_is_refused_before_any_work(make_cfg, tmp_path):
    from training.errors import UserError
    from training.train import train

    overrides = ["dataloaders=digits", "model=cnn", "loss=diffusion", "solver=diffusion", "loss.steps=100"]
    with pytest.raises(
        UserError,
        match=r"^eval.nfe=\[1, 200\] asks solver=diffusion for more steps than its "
        r"100-step schedule: use eval.nfe values up to 100$",
    ):
        train(make_cfg(*overrides, "eval.nfe=[1,200]"))
    assert not (tmp_path / "outputs").exists()
