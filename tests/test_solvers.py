"""Solvers against an ODE with a known solution: dx/dt = cos(t) x, x(t) = x(0) exp(sin t)."""

import math

import pytest
import torch

from solvers.adaptive import Dopri5
from solvers.base import Solution, uniform_grid
from solvers.fixed_step import RK4, Euler, Heun, Midpoint
from solvers.meanflow import MeanFlowSolver


def velocity(x, t, r=None):
    return torch.cos(t) * x


X0 = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
EXACT = X0 * math.exp(math.sin(1.0))


def run(solver, fn, x, nfe=0, callback=None):
    """The sampler contract: the grid for a budget, then one call over it."""
    return solver(fn, x, solver.grid(nfe, x.device), callback)


def error(solver, nfe):
    return (run(solver, velocity, X0.clone(), nfe).x - EXACT).abs().max().item()


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
        out = run(self.solver, velocity, X0.clone(), 8)
        assert isinstance(out, Solution)
        assert out.x.shape == X0.shape and out.x.dtype == X0.dtype
        assert out.nfe > 0

    def test_callback_sees_increasing_times_ending_at_one(self):
        times = []
        run(self.solver, velocity, X0.clone(), 8, callback=lambda t, x: times.append(float(t)))
        assert times == sorted(times) and times[-1] == pytest.approx(1.0)

    def test_counts_every_function_evaluation(self):
        calls = 0

        def counted(x, t, r=None):
            nonlocal calls
            calls += 1
            return velocity(x, t)

        out = run(self.solver, counted, X0.clone(), 8)
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
    assert run(solver, velocity, X0.clone(), budget).nfe == used


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_dopri5_meets_its_tolerance_and_spends_more_for_less(tol):
    out = run(Dopri5(rtol=tol, atol=tol), velocity, X0.clone())
    assert (out.x - EXACT).abs().max().item() < 10 * tol * EXACT.abs().max().item()


def test_dopri5_tighter_tolerance_costs_more_evaluations():
    loose = run(Dopri5(rtol=1e-3, atol=1e-3), velocity, X0.clone()).nfe
    tight = run(Dopri5(rtol=1e-9, atol=1e-9), velocity, X0.clone()).nfe
    assert tight > loose


def test_fixed_step_rejects_zero_budget():
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        Euler().grid(0)


def test_uniform_grid():
    torch.testing.assert_close(uniform_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


class TestMeanFlow(SolverContract):
    """MeanFlow jumps along an average velocity u(x, t, r); given the instantaneous one (r ignored) it
    is Euler's method, so it keeps the contract on the same ODE."""

    solver = MeanFlowSolver()


def test_the_solver_runs_on_an_explicit_grid():
    """A caller may pass any increasing grid (the contract's explicit times), not only the uniform one."""
    grid = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    out = RK4()(velocity, X0.clone(), grid)
    assert out.nfe == 16 and (out.x - EXACT).abs().max().item() < 1e-3
