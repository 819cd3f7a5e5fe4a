"""Plot what a trained 2D flow does: samples vs held-out data, trajectories, and an animated GIF.

python scripts/visualize_2d.py outputs/ckpts/mlp/quickstart/last.pt --solver heun --nfe 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from evaluation.energy_distance import energy_distance
from evaluation.pictures import Titles
from evaluation.plots_2d import write_2d_pictures
from evaluation.sample_generation import sample
from solvers.adaptive import Dopri5
from solvers.base import Sampler
from solvers.fixed_step import RK4, Euler, Heun, Midpoint
from solvers.meanflow import MeanFlowSolver
from training.cli import exit_code, positive_int
from training.errors import UserError
from training.inference import load_data, load_model

SOLVERS: dict[str, type[Sampler]] = {
    "meanflow": MeanFlowSolver,
    "euler": Euler,
    "heun": Heun,
    "midpoint": Midpoint,
    "rk4": RK4,
    "dopri5": Dopri5,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample a trained 2D model; write samples.png (titled with its energy distance to the "
        "held-out data), trajectories.png, flow.gif.",
        epilog="Exit status: 0 on success, 2 on bad input (missing or damaged checkpoint, bad option).",
    )
    p.add_argument("checkpoint", type=Path, help="a last.pt or archived epoch_XXXX.pt written by launcher.py")
    p.add_argument(
        "--solver",
        choices=sorted(SOLVERS),
        default=None,
        help="ODE solver (default: the checkpoint's own, else euler; dopri5 is adaptive and ignores --nfe)",
    )
    p.add_argument(
        "--nfe",
        type=positive_int,
        default=100,
        help="budget of model evaluations per sample (default: 100)",
    )
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=2000,
        help="samples drawn for samples.png (default: 2000)",
    )
    p.add_argument(
        "--points",
        type=positive_int,
        default=256,
        help="samples whose paths trajectories.png and flow.gif show (default: 256)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: viz/ next to the checkpoint)",
    )
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--fps", type=positive_int, default=15, help="frames per second of flow.gif (default: 15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    return p.parse_args(argv)


def own_solver(state: dict) -> str:
    """The solver the checkpoint was trained and evaluated with, where this script has it."""
    name = (state["config"].get("choices") or {}).get("solver")
    return name if name in SOLVERS else "euler"


def visualize(args: argparse.Namespace) -> list[Path]:
    """Write the three figures; returns their paths."""
    model, state = load_model(args.checkpoint, use_ema=not args.raw)
    data = load_data(state, args.checkpoint).eval_set
    if data.ndim != 2 or data.shape[1] < 2:
        raise UserError(
            f"checkpoint {args.checkpoint} models data of shape {tuple(data.shape[1:])}; "
            "this script plots (N, D >= 2) data"
        )
    noise = torch.randn(args.num_samples, data.shape[1], generator=torch.Generator().manual_seed(args.seed))
    name = args.solver or own_solver(state)
    solver = SOLVERS[name]()
    trains = state.get("sampling", {}).get("trains")
    if trains is not None and trains not in solver.samples:
        fits = "|".join(n for n, s in sorted(SOLVERS.items()) if trains in s.samples)
        raise UserError(f"--solver {name} samples {'|'.join(solver.samples)} models; this one predicts {trains}: "
                        f"use --solver {fits}")  # fmt: skip
    args.solver = name
    points = min(args.points, args.num_samples)
    solution, trajectory = sample(model, solver, noise, args.nfe, trajectory_points=points)
    assert trajectory is not None  # trajectory_points >= 1

    out = args.out or args.checkpoint.parent / "viz"
    out.mkdir(parents=True, exist_ok=True)
    weights = "raw" if args.raw else "EMA"
    key = "adaptive" if solver.adaptive else f"nfe{args.nfe}"
    x = solution.x.float()
    metrics = {
        f"eval/energy_distance@{key}": energy_distance(x, data.float()),
        f"eval/nfe_used@{key}": float(solution.nfe),
    }
    titles = Titles(f"{args.checkpoint.parent.name} ({weights} weights)", solver.label(), step=state["step"])
    paths = write_2d_pictures(
        data.numpy(), {key: x.numpy()}, metrics, trajectory.numpy(), titles, out, gif="flow.gif", fps=args.fps
    )
    print(f"step {state['step']}, {weights} weights, {args.solver} with {solution.nfe} NFE")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: report(visualize(args)))


def report(paths: list[Path]) -> int:
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
