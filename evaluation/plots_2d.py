"""Plots of 2D samples and flows (first two coordinates of higher-dimensional data), titled with what
made them (run, solver, NFE) and how good they are (energy distance). Shared by the evaluators and
scripts/visualize_2d.py; matplotlib ``Figure`` objects on the Agg canvas, no pyplot state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluation.pictures import Titles, budget_scores, figure_pixels, frame_steps, nfe_text, save_figure, write_gif

DPI = 120


def _limits(*arrays: np.ndarray) -> tuple[float, float, float, float]:
    pts = np.concatenate([a[:, :2] for a in arrays])
    pts = pts[np.isfinite(pts).all(axis=1)]  # a diverged model's samples hold inf: plot the rest
    if len(pts) == 0:
        return -1.0, 1.0, -1.0, 1.0
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    return lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _aspect(x0: float, x1: float, y0: float, y1: float) -> float:
    """Height over width of equal-aspect panels of these limits, kept between 0.4 and 1.6: the figure
    is sized to its panels instead of framing wide data with white bands."""
    return float(np.clip((y1 - y0) / max(x1 - x0, 1e-12), 0.4, 1.6))


def samples_figure(data: np.ndarray, samples: dict[str, np.ndarray], title: str = "") -> Figure:
    """One panel for the held-out data and one per set of generated samples, each titled by its key
    (``NFE 4\\nenergy distance 0.012``), under ``title`` (the run, the solver)."""
    n = 1 + len(samples)
    lines = title.count("\n") + 1 if title else 0
    x0, x1, y0, y1 = _limits(data, *samples.values())
    fig = _figure(3.2 * n, 3.0 * _aspect(x0, x1, y0, y1) + 0.6 + 0.22 * lines)  # panels ~3.0 in wide
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, pts) in zip(axes, [("held-out data", data), *samples.items()], strict=True):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, color="black" if pts is data else "tab:blue")
        ax.set(xlim=(x0, x1), ylim=(y0, y1), xticks=[], yticks=[], aspect="equal")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def scatter_samples(data: np.ndarray, samples: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """``samples_figure`` written to ``path``."""
    save_figure(samples_figure(data, samples, title), path)


def trajectories_figure(trajectory: np.ndarray, title: str = "flow trajectories") -> Figure:
    """Paths of points from noise (grey) to samples (blue); ``trajectory`` is (T, N, D)."""
    x0, x1, y0, y1 = _limits(*trajectory)
    fig = _figure(4.5, 4.2 * _aspect(x0, x1, y0, y1) + 0.3 + 0.2 * (title.count("\n") + 1))  # axes ~4.2 in wide
    ax = fig.subplots()
    ax.plot(trajectory[:, :, 0], trajectory[:, :, 1], color="olive", alpha=0.25, lw=0.6)
    ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=3, color="grey", label="noise (start)")
    ax.scatter(trajectory[-1, :, 0], trajectory[-1, :, 1], s=3, color="tab:blue", label="sample (end)")
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xticks=[], yticks=[], aspect="equal")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_trajectories(trajectory: np.ndarray, path: Path, title: str = "flow trajectories") -> None:
    """``trajectories_figure`` written to ``path``."""
    save_figure(trajectories_figure(trajectory, title), path)


def animate_flow(trajectory: np.ndarray, path: Path, title: str = "", fps: float | None = None) -> None:
    """An animated GIF of the points moving along the sampling path, a frame per sampling step (at most
    ``MAX_FRAMES``), each titled ``title`` and its step; ``trajectory`` is (T, N, D); ``fps`` None:
    about 4 s in all."""
    x0, x1, y0, y1 = _limits(*trajectory)
    fig = _figure(4.5, 4.2 * _aspect(x0, x1, y0, y1) + 0.3 + 0.2 * (title.count("\n") + 2))
    ax = fig.subplots()
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xticks=[], yticks=[], aspect="equal")
    points = ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=2, color="tab:blue")
    steps = len(trajectory) - 1
    heading = ax.set_title(f"{title}\nsampling step {steps} of {steps}".lstrip("\n"), fontsize=9)
    fig.tight_layout()  # laid out once, for the longest title
    frames = []
    for i in frame_steps(len(trajectory)):
        points.set_offsets(trajectory[i, :, :2])
        heading.set_text(f"{title}\nsampling step {i} of {steps}".lstrip("\n"))
        frames.append(figure_pixels(fig))
    write_gif(frames, path, fps)


def budget_panels(samples: dict[str, np.ndarray], metrics: dict[str, float]) -> dict[str, np.ndarray]:
    """The samples of each budget key (``nfe4``) under their panel title: its NFE and energy distance."""
    panels = {}
    for key, x in samples.items():
        nfe = nfe_text(key, metrics[f"eval/nfe_used@{key}"])
        panels[f"{nfe}\nenergy distance {metrics[f'eval/energy_distance@{key}']:.4g}"] = x
    return panels


def write_2d_pictures(
    data: np.ndarray,
    samples: dict[str, np.ndarray],
    metrics: dict[str, float],
    trajectory: np.ndarray | None,
    titles: Titles,
    out_dir: Path,
    gif: str | None = None,
    fps: float | None = None,
) -> list[Path]:
    """The pictures of 2D samples per budget key (``nfe4``) with their ``eval/energy_distance@key`` and
    ``eval/nfe_used@key`` metrics: ``samples.png`` (a panel per budget titled with its NFE and energy
    distance), and with a ``trajectory`` (of the last budget) ``trajectories.png`` and, when ``gif``
    names it, its animation. Returns the paths written."""
    paths = [out_dir / "samples.png"]
    scatter_samples(data, budget_panels(samples, metrics), paths[0], titles.title())
    if trajectory is None:
        return paths
    last = list(samples)[-1]
    title = titles.title(nfe_text(last, metrics[f"eval/nfe_used@{last}"]), budget_scores(metrics, last))
    paths.append(out_dir / "trajectories.png")
    plot_trajectories(trajectory, paths[-1], f"sampling paths\n{title}")
    if gif is not None:
        paths.append(out_dir / gif)
        animate_flow(trajectory, paths[-1], title, fps)
    return paths
