"""Gaussian diffusion maths shared by the diffusion loss and the diffusion samplers.

Follows GLIDE / improved-diffusion (Nichol & Dhariwal 2021): discrete timesteps ``t = 0 .. T-1``,
``x_t = sqrt(alpha_bar_t) x_start + sqrt(1 - alpha_bar_t) eps``, an eps-predicting model with a
learned-range variance, x_start predictions clipped to [-1, 1], and respacing that keeps a subset
of the original timesteps with recomputed betas. Everything is held in float64 on the CPU and
cast to the input's dtype and device on use, so the same schedule serves a float32 CUDA loss and
an MPS sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from paths.affine import expand_like

NOISE_SCHEDULES = ("squaredcos_cap_v2", "linear")


def betas_for(name: str, steps: int = 1000) -> Tensor:
    """GLIDE's named beta schedules, float64 of length ``steps``.

    ``"linear"`` scales DDPM's 1e-4 .. 0.02 by ``1000 / steps`` so any ``steps`` gives the same
    process; ``"squaredcos_cap_v2"`` is the cosine alpha_bar of improved-diffusion with betas
    capped at 0.999 so the last steps stay finite.
    """
    if name == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 0.0001, scale * 0.02, steps, dtype=torch.float64)
    if name == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown noise_schedule {name!r}; valid: {', '.join(NOISE_SCHEDULES)}")


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The original timesteps a respacing ``spec`` keeps, ascending (GLIDE's ``space_timesteps``).

    ``"100"`` or ``"10,15,20"``: the process is cut into equal sections and each section is
    strided to that many steps (fractional stride, rounded). ``"ddimN"``: the integer stride that
    gives exactly N steps, as in the DDIM paper. ``"fast27"``: GLIDE's preset ``"10,10,3,2,2"``
    with the noisiest step T-1 swapped for T-3, which GLIDE found reduces DDIM artifacts.
    """
    valid = 'valid: "N", "N1,N2,...", "ddimN", "fast27"'
    if spec == "fast27":
        steps = set(space_timesteps(num_timesteps, "10,10,3,2,2"))
        steps.remove(num_timesteps - 1)
        steps.add(num_timesteps - 3)
        return sorted(steps)
    if spec.startswith("ddim"):
        try:
            desired = int(spec[len("ddim") :])
        except ValueError:
            raise ValueError(f"bad respacing {spec!r}; {valid}") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride ({spec!r})")
    try:
        section_counts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"bad respacing {spec!r}; {valid}") from None
    if any(c < 1 for c in section_counts):
        raise ValueError(f"bad respacing {spec!r}: section counts must be >= 1; {valid}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, list[int]()
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count} ({spec!r})")
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # an accumulated float index and Python's round(), exactly as GLIDE, so the kept sets agree
        index = 0.0
        for _ in range(count):
            kept.append(start + round(index))
            index += frac_stride
        start += size
    return sorted(set(kept))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    # the tanh approximation improved-diffusion uses; kept so bits/dim are comparable to theirs
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood (nats) of 8-bit data x in [-1, 1] under a Gaussian discretised to bins of 2/255.

    The edge bins extend to -inf and +inf, so the decoder gives a proper distribution on 256 levels.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class PMeanVariance:
    """The model's reverse step ``p(x_{t-1} | x_t)``: a Gaussian and the x_start it implies."""

    mean: Tensor
    log_variance: Tensor
    pred_x_start: Tensor


class DiffusionSchedule:
    """A discrete Gaussian diffusion, original or respaced.

    ``t`` arguments are indices into this schedule (LongTensor (B,)); ``timestep_map[t]`` is the
    original timestep the model must be called with (GLIDE does not rescale timesteps).
    """

    def __init__(
        self, betas: Tensor, timestep_map: Tensor | None = None, original_alphas_cumprod: Tensor | None = None
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map.long()
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # the un-respaced process, for mapping a noise level back to an original timestep
        self.original_alphas_cumprod = (
            self.alphas_cumprod if original_alphas_cumprod is None else original_alphas_cumprod.double()
        )

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0; GLIDE clips its log to the t = 1 value
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def __len__(self) -> int:
        return self.num_timesteps

    @staticmethod
    def _at(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """``arr[t]`` in x's dtype and device, shaped to broadcast against x."""
        out = arr.to(dtype=x.dtype).to(x.device)[t.to(x.device)]
        return expand_like(out, x)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample ``q(x_t | x_start)``."""
        return (
            self._at(self.alphas_cumprod.sqrt(), t, x_start) * x_start
            + self._at((1.0 - self.alphas_cumprod).sqrt(), t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x_start)``."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_x_start_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            self._at(torch.rsqrt(self.alphas_cumprod), t, x_t) * x_t
            - self._at(torch.sqrt(1.0 / self.alphas_cumprod - 1.0), t, x_t) * eps
        )

    def predict_eps_from_x_start(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        return (self._at(torch.rsqrt(self.alphas_cumprod), t, x_t) * x_t - x_start) / self._at(
            torch.sqrt(1.0 / self.alphas_cumprod - 1.0), t, x_t
        )

    def p_mean_variance(
        self, eps: Tensor, var_values: Tensor, x_t: Tensor, t: Tensor, clip: bool = True
    ) -> PMeanVariance:
        """The reverse step from an eps prediction and learned-range variance values v in [-1, 1].

        ``log var = frac log(beta_t) + (1 - frac) log(posterior variance)`` with ``frac = (v + 1) / 2``:
        the model interpolates between the two bounds of the true reverse variance (improved-diffusion).
        """
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(torch.log(self.betas), t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_x_start = self.predict_x_start_from_eps(x_t, t, eps)
        if clip:
            pred_x_start = pred_x_start.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x_start, x_t, t)
        return PMeanVariance(mean, log_variance, pred_x_start)

    def vb_terms_bpd(self, x_start: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, var_values: Tensor) -> Tensor:
        """Per-sample variational bound term L_t in bits/dim, (B,).

        KL(q(x_{t-1} | x_t, x_start) || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder NLL
        at t = 0; the model's x_start is not clipped, as in improved-diffusion's training loss.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(eps, var_values, x_t, t, clip=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out.mean, 0.5 * out.log_variance)
        decoder_nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, decoder_nll, kl)

    def respace(self, spec: str) -> DiffusionSchedule:
        """The schedule over the timesteps ``spec`` keeps (see ``space_timesteps``).

        Betas are recomputed as ``1 - alpha_bar_k / alpha_bar_{k_prev}`` so each kept step keeps its
        original alpha_bar; ``timestep_map`` maps the new indices to the original timesteps.
        """
        kept = torch.tensor(space_timesteps(self.num_timesteps, spec))
        alphas_cumprod = self.alphas_cumprod[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return DiffusionSchedule(1.0 - alphas_cumprod / prev, self.timestep_map[kept], self.original_alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        """Noise levels in the variance-exploding parameterisation, ``sqrt((1 - a) / a)``, ascending."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """The (fractional) original timestep of a noise level: log-sigma interpolation on the original
        process, as k-diffusion's ``sigma_to_t``, so grids between kept steps (Karras) still map well."""
        log_sigmas = 0.5 * ((1.0 - self.original_alphas_cumprod) / self.original_alphas_cumprod).log()
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_sigmas) - 2)
        low = low.reshape(log_sigma.shape)
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        return low + w
