"""Plots of 2D samples and flows (first two coordinates of higher-dimensional data)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402


def _limits(*arrays: np.ndarray) -> tuple[float, float, float, float]:
    pts = np.concatenate([a[:, :2] for a in arrays])
    pts = pts[np.isfinite(pts).all(axis=1)]  # a diverged model's samples hold inf: plot the rest
    if len(pts) == 0:
        return -1.0, 1.0, -1.0, 1.0
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    return lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1]


def scatter_samples(data: np.ndarray, samples: dict[str, np.ndarray], path: Path) -> None:
    """One panel for the data and one per set of generated samples."""
    n = 1 + len(samples)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    x0, x1, y0, y1 = _limits(data, *samples.values())
    for ax, (title, pts) in zip(axes[0], [("data", data), *samples.items()], strict=True):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, color="black" if title == "data" else "tab:blue")
        ax.set(title=title, xlim=(x0, x1), ylim=(y0, y1), xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trajectories(trajectory: np.ndarray, path: Path) -> None:
    """Paths of points from noise (t=0, grey) to samples (t=1, blue); ``trajectory`` is (T, N, D)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(trajectory[:, :, 0], trajectory[:, :, 1], color="olive", alpha=0.25, lw=0.6)
    ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=3, color="grey", label="noise (t=0)")
    ax.scatter(trajectory[-1, :, 0], trajectory[-1, :, 1], s=3, color="tab:blue", label="sample (t=1)")
    ax.set(xticks=[], yticks=[], aspect="equal", title="flow trajectories")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def animate_flow(trajectory: np.ndarray, path: Path, fps: int = 15) -> None:
    """An animated GIF of the points moving along the flow; ``trajectory`` is (T, N, D)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    x0, x1, y0, y1 = _limits(*trajectory)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xticks=[], yticks=[], aspect="equal")
    points = ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=2, color="tab:blue")
    title = ax.set_title("t = 0.00")
    times = np.linspace(0, 1, len(trajectory))

    def frame(i: int):
        points.set_offsets(trajectory[i, :, :2])
        title.set_text(f"t = {times[i]:.2f}")
        return points, title

    FuncAnimation(fig, frame, frames=len(trajectory), blit=False).save(path, writer=PillowWriter(fps=fps))
    plt.close(fig)
