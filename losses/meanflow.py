"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling").

Conventions, in our time direction (noise x_0 at t = 0, data x_1 at t = 1, v = x_1 - x_0):

    the model is u(x_t, t, r): the average velocity from the state's time t to another time r,
        u(x_t, t, r) = 1/(r - t) ∫_t^r v(x_τ, τ) dτ,   so   x_r = x_t + (r - t) u(x_t, t, r),
    and u(x_t, t, t) = v(x_t, t) is the flow-matching velocity (the model contract's r = t).

Differentiating (r - t) u(x_t, t, r) = ∫_t^r v dτ in t along the trajectory (dx_t/dt = v):

    -u + (r - t) du/dt = -v   =>   u = v - (t - r) (v · ∂_x u + ∂_t u),

the paper's identity with t the state's time. The total derivative du/dt is one forward-mode
jvp of (x, t, r) -> u with tangents (v, 1, 0). One-step generation integrates from the noise
at t = 0 to r = 1: x_1 = x_0 + u(x_0, t=0, r=1) (the notes' "u(noise, r=0, t=1)", written
there with the paper's argument names; see solvers/meanflow.py).

(t, r) are two draws of the time sampler, t the smaller and r the larger, with r set equal to t for a
fraction ``1 - ratio`` of the batch: r ≥ t, the average runs towards the data. The default sampler is the
paper's logit-normal(-0.4, 1) in its time s = 1 - τ (data at s = 0), which is logit-normal(0.4, 1) in ours.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import jvp

from losses.base import Loss, LossOutput
from models.conditioning import Cond, check_dropout, drop_condition
from models.layers import jvp_safe_kernels
from paths.affine import LinearPath, ProbabilityPath, expand_like
from paths.time import LogitNormalTimeSampler, TimeSampler


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class MeanFlowLoss(Loss):
    """The MeanFlow objective with adaptive weighting and optional training-time CFG.

    ``ratio``: fraction of samples with r ≠ t (the paper's default 25%); ``path`` gives x_t and its velocity
    v (default the straight line), ``time_sampler`` the times (see the module docstring). u comes from one ordinary
    forward of the batch (the only path gradients take); du/dt, which only enters the stop-gradient
    target, from a no-grad jvp: by default only on the r ≠ t samples (``full_batch_jvp=False``;
    for r = t the target is plain v). ``jvp_fp32`` runs that jvp outside autocast, as the
    derivative terms lose too much in bf16, while the forward and backward keep the run's precision.
    CFG (the paper's eq. 13-15): the target velocity becomes
    ``omega v + kappa u(x_t, t, t | c) + (1 - omega - kappa) u(x_t, t, t | ∅)`` for the samples that
    keep their label; ``cond_dropout`` replaces a share of the conditions by the null one
    (models/conditioning.py), which guidance at sampling time needs too.
    """

    trains = "average_velocity"
    model_outputs = ("field",)

    def __init__(
        self,
        ratio: float = 0.25,
        p: float = 1.0,
        c: float = 1e-3,
        path: ProbabilityPath | None = None,
        time_sampler: TimeSampler | None = None,
        full_batch_jvp: bool = False,
        jvp_fp32: bool = True,
        omega: float = 1.0,
        kappa: float = 0.0,
        cond_dropout: float = 0.1,
        use_cuda_graph: bool = False,
    ):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"loss.ratio must be in [0, 1], got {ratio}")
        check_dropout(cond_dropout)
        self.ratio = ratio
        self.p = p
        self.c = c
        self.path = path if path is not None else LinearPath()
        self.time_sampler = time_sampler if time_sampler is not None else LogitNormalTimeSampler(mean=0.4, std=1.0)
        self.full_batch_jvp = full_batch_jvp
        self.jvp_fp32 = jvp_fp32
        self.omega = omega
        self.kappa = kappa
        self.cond_dropout = cond_dropout
        self.use_cuda_graph = use_cuda_graph
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor | None], Tensor]] = {}

    @property
    def fixed_model_calls(self) -> bool:  # type: ignore[override]
        """The selective jvp is skipped on a batch with no r != t sample, so ranks can differ."""
        return self.full_batch_jvp or self.use_cuda_graph

    def check(self, device: torch.device) -> None:
        if self.use_cuda_graph and device.type != "cuda":
            raise ValueError(
                f"loss.use_cuda_graph=true needs CUDA (device is {device.type}); drop it or train on a GPU"
            )
        if self.use_cuda_graph and not self.full_batch_jvp:
            raise ValueError("loss.use_cuda_graph=true needs loss.full_batch_jvp=true: a graph replays fixed shapes")

    def sample_times(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(t, r) with r ≥ t, r ≠ t for a ``ratio`` fraction; see the module docstring."""
        times = self.time_sampler((2, n), device)
        t, r = times.min(dim=0).values, times.max(dim=0).values
        equal = torch.rand(n, device=device) >= self.ratio
        return t, torch.where(equal, t, r)

    def _guided_velocity(
        self, model: nn.Module, x_t: Tensor, t: Tensor, v: Tensor, cond: Tensor, kept: Tensor
    ) -> Tensor:
        with torch.no_grad():
            u_cond = model(x_t, t, t, cond)
            u_null = model(x_t, t, t, None)
        guided = self.omega * v + self.kappa * u_cond + (1 - self.omega - self.kappa) * u_null
        return torch.where(expand_like(kept, v), guided.to(v.dtype), v)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x_1 = batch["x1"]
        cond: Cond = batch.get("cond")
        n = len(x_1)
        x_0 = torch.randn_like(x_1)
        t, r = self.sample_times(n, x_1.device)
        sample = self.path.sample(x_0, x_1, t)
        x_t, v = sample.x_t, sample.target

        cond = drop_condition(cond, self.cond_dropout)  # class labels: -1 is the null class
        assert cond is None or isinstance(cond, Tensor)
        if cond is not None and (self.omega != 1.0 or self.kappa != 0.0):
            v = self._guided_velocity(model, x_t, t, v, cond, cond >= 0)

        # u carries the gradient: one ordinary forward of the whole batch, under the run's autocast.
        # du/dt only enters the stop-gradient target: a no-grad jvp, in fp32 if jvp_fp32.
        u = model(x_t, t, r, cond)
        precision = torch.autocast(x_1.device.type, enabled=False) if self.jvp_fp32 else contextlib.nullcontext()
        with precision, torch.no_grad():
            if self.use_cuda_graph:
                dudt = self._graphed_tangent(model, x_t, t, r, v, cond)
            elif self.full_batch_jvp:
                dudt = self._jvp(model, x_t, t, r, v, cond)[1]
            else:
                dudt = self._selective_tangent(model, x_t, t, r, v, cond)
        dt = expand_like(t - r, x_1)
        target = (v - dt * dudt).detach()
        delta = (u.float() - target.float()).flatten(1)
        sq = delta.pow(2).sum(dim=1)
        weight = (sq.detach() + self.c).pow(-self.p)
        loss = (weight * sq).mean()  # adaptive weight w = 1 / (||Δ||² + c)^p, stop-gradient
        metrics = {
            "meanflow/mse": sq.detach().mean() / delta.shape[1],
            "meanflow/dudt_norm": dudt.detach().flatten(1).norm(dim=1).mean(),
        }
        return LossOutput(loss, metrics)

    def _jvp(
        self, model: nn.Module, x: Tensor, t: Tensor, r: Tensor, v: Tensor, cond: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if self.jvp_fp32:
            x, t, r, v = _at_least_fp32(x), _at_least_fp32(t), _at_least_fp32(r), _at_least_fp32(v)

        def u(x_: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
            return model(x_, t_, r_, cond)

        with jvp_safe_kernels():  # the fused attention kernels have no forward-mode rule
            out, tangent = jvp(u, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))  # type: ignore[misc]
        return out, tangent

    def _selective_tangent(
        self, model: nn.Module, x: Tensor, t: Tensor, r: Tensor, v: Tensor, cond: Tensor | None
    ) -> Tensor:
        """du/dt only where r ≠ t (elsewhere (t - r) du/dt is zero anyway).

        The split needs the indices on the host (one device sync per step), which is why
        ``full_batch_jvp`` exists for CUDA graphs and for high ``ratio``.
        """
        moving = (r != t).nonzero().squeeze(1)
        dudt = torch.zeros_like(_at_least_fp32(v) if self.jvp_fp32 else v)
        if len(moving):
            pick = None if cond is None else cond[moving]
            dudt[moving] = self._jvp(model, x[moving], t[moving], r[moving], v[moving], pick)[1].to(dudt.dtype)
        return dudt

    def _graphed_tangent(
        self, model: nn.Module, x: Tensor, t: Tensor, r: Tensor, v: Tensor, cond: Tensor | None
    ) -> Tensor:
        """du/dt by the no-grad jvp captured once per input shape in a CUDA graph and replayed.

        The graph reads the parameters in place, so optimizer steps are seen by every replay.
        """
        key = (id(model), tuple(x.shape), x.dtype, cond is None)
        if key not in self._graphs:
            static: list[Tensor | None] = [
                x.clone(),
                t.clone(),
                r.clone(),
                v.clone(),
                None if cond is None else cond.clone(),
            ]

            def run() -> Tensor:
                with torch.no_grad():
                    return self._jvp(model, static[0], static[1], static[2], static[3], static[4])[1]  # type: ignore[arg-type]

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up outside the graph, as capture requires
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for slot, value in zip(static, (x, t, r, v, cond), strict=True):
            if slot is not None and value is not None:
                slot.copy_(value)
        graph.replay()
        return out.clone()
