"""Solvers against an ODE with a known solution: dx/dt = cos(t) x, x(t) = x(0) exp(sin t)."""

import math

import pytest
import torch

from solvers.adaptive import Dopri5
from solvers.base import ODESolution, uniform_grid
from solvers.fixed_step import RK4, Euler, Heun, Midpoint


def velocity(x, t):
    return torch.cos(t) * x


X0 = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
EXACT = X0 * math.exp(math.sin(1.0))


def error(solver, nfe):
    return (solver(velocity, X0.clone(), nfe).x - EXACT).abs().max().item()


@pytest.mark.parametrize("solver, order", [(Euler(), 1), (Heun(), 2), (Midpoint(), 2), (RK4(), 4)])
def test_fixed_step_convergence_order(solver, order):
    nfes = [solver.stages * n for n in (8, 16, 32)]
    errors = [error(solver, n) for n in nfes]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(abs(o - order) < 0.25 for o in observed), observed


class SolverContract:
    """What the trainer and evaluator rely on from every solver."""

    solver = None

    def test_returns_solution_with_state_shape_and_positive_nfe(self):
        out = self.solver(velocity, X0.clone(), 8)
        assert isinstance(out, ODESolution)
        assert out.x.shape == X0.shape and out.x.dtype == X0.dtype
        assert out.nfe > 0

    def test_callback_sees_increasing_times_ending_at_one(self):
        times = []
        self.solver(velocity, X0.clone(), 8, callback=lambda t, x: times.append(float(t)))
        assert times == sorted(times) and times[-1] == pytest.approx(1.0)

    def test_counts_every_function_evaluation(self):
        calls = 0

        def counted(x, t):
            nonlocal calls
            calls += 1
            return velocity(x, t)

        out = self.solver(counted, X0.clone(), 8)
        assert out.nfe == calls


class TestEuler(SolverContract):
    solver = Euler()


class TestHeun(SolverContract):
    solver = Heun()


class TestMidpoint(SolverContract):
    solver = Midpoint()


class TestRK4(SolverContract):
    solver = RK4()


class TestDopri5(SolverContract):
    solver = Dopri5(rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver, budget, used", [(Euler(), 10, 10), (Heun(), 10, 10), (RK4(), 10, 8), (RK4(), 1, 4)])
def test_nfe_budget_maps_to_whole_steps(solver, budget, used):
    assert solver(velocity, X0.clone(), budget).nfe == used


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_dopri5_meets_its_tolerance_and_spends_more_for_less(tol):
    out = Dopri5(rtol=tol, atol=tol)(velocity, X0.clone())
    assert (out.x - EXACT).abs().max().item() < 10 * tol * EXACT.abs().max().item()


def test_dopri5_tighter_tolerance_costs_more_evaluations():
    loose = Dopri5(rtol=1e-3, atol=1e-3)(velocity, X0.clone()).nfe
    tight = Dopri5(rtol=1e-9, atol=1e-9)(velocity, X0.clone()).nfe
    assert tight > loose


def test_fixed_step_rejects_zero_budget():
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        Euler()(velocity, X0.clone(), 0)


def test_uniform_grid():
    torch.testing.assert_close(uniform_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
