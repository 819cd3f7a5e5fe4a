"""Pictures of samples that can be read at a glance: image grids with one labelled row per class or
prompt, tiles upscaled (nearest) to at least ``MIN_TILE`` pixels, a title saying what made them (run,
sampler, NFE, guidance, score); and GIFs of frames drawn the same way.

Figures are matplotlib ``Figure`` objects on the Agg canvas (no pyplot state, no display), laid out
in exact pixels so a grid's size follows from its rows and tiles; text is measured, not guessed,
so it wraps instead of running over the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from PIL import Image
from torch import Tensor

from evaluation.sample_folder_writer import to_uint8

MIN_TILE = 64  # px: the smallest side of a tile in a grid
GAP = 2  # px between tiles
GAP_GREY = 200  # the gaps' colour: white and black tiles both stand out from it
DPI = 100
TITLE_PT, LABEL_PT = 10, 9
TITLE_LINE, LABEL_LINE = 16, 14  # px per line at those sizes
MAX_LABEL = 210  # px: the widest row-label column (prompts wrap inside it)
MIN_WIDTH = 360  # px: room for a two-line title above a narrow grid
MAX_FRAMES = 50  # a GIF of a longer sampling path skips steps: a picture, not a video

SCORE_NAMES = {"energy_distance": "energy distance", "fid": "FID", "kid": "KID", "clip_score": "CLIP score"}

_RENDERER = RendererAgg(1, 1, DPI)  # measures text for wrapping


@dataclass(frozen=True)
class Titles:
    """What the pictures of one evaluation are titled with: the run and its model (``label``), the
    sampler (its label with settings), the guidance scale and the training step (None: not known)."""

    label: str
    sampler: str
    guidance: float = 1.0
    step: int | None = None

    def title(self, nfe: str = "", scores: dict[str, float] | None = None) -> str:
        """The run and step on the first line; the sampler, ``nfe`` (``NFE 4``, ``30 steps``; "" leaves
        it out), the guidance scale and ``scores`` (metric name -> value) on the second."""
        head = " · ".join(p for p in (self.label, "" if self.step is None else f"step {self.step}") if p)
        parts = [self.sampler, nfe, f"guidance {self.guidance:g}"]
        parts += [f"{SCORE_NAMES.get(k, k)} {v:.4g}" for k, v in (scores or {}).items()]
        return "\n".join(p for p in (head, " · ".join(p for p in parts if p)) if p)


def budget_scores(metrics: dict[str, float], key: str) -> dict[str, float]:
    """The scores of one budget (``nfe10``) among the ``eval/<name>@<key>`` metrics, by name."""
    return {name: metrics[f"eval/{name}@{key}"] for name in SCORE_NAMES if f"eval/{name}@{key}" in metrics}


def nfe_text(key: str, used: float | None = None) -> str:
    """``NFE 10`` for budget ``nfe10``; an adaptive solver's budget names the evaluations it used."""
    if key == "adaptive":
        return "adaptive" if used is None else f"NFE {used:.0f} (adaptive)"
    return f"NFE {key.removeprefix('nfe')}"


@dataclass(frozen=True)
class Row:
    """One row of a grid: images (N, C, H, W) in [0, 1] and the label drawn left of them."""

    images: Tensor
    label: str = ""


def class_rows(images: Tensor, labels: Tensor | None, per_row: int = 8, max_rows: int = 10) -> list[Row]:
    """Class-conditional samples as one row per class (``per_row`` of that class, label ``class k``),
    at most ``max_rows`` classes spread over those present; unconditional ones as a plain grid."""
    if labels is None:
        count = min(len(images), per_row * max_rows)
        return [Row(images[i : min(i + per_row, count)]) for i in range(0, count, per_row)]
    labels = labels[: len(images)]
    present = labels.unique().tolist()
    spread = np.linspace(0, len(present) - 1, min(max_rows, len(present))).round().astype(int)
    return [Row(images[labels == c][:per_row], f"class {c}") for c in dict.fromkeys(present[i] for i in spread)]


def upscale(images: Tensor, min_tile: int = MIN_TILE) -> Tensor:
    """Nearest-neighbour upscaling by the integer factor that makes the smaller side >= ``min_tile``."""
    k = math.ceil(min_tile / min(images.shape[-2:]))
    return images if k <= 1 else images.repeat_interleave(k, -2).repeat_interleave(k, -1)


def to_rgb8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, 3) uint8; one channel becomes grey."""
    pixels = to_uint8(images)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels[..., :3]


def text_width(text: str, pt: int) -> float:
    """The width in px of one line of ``text`` at font size ``pt``, as the Agg renderer draws it."""
    return _RENDERER.get_text_width_height_descent(text, FontProperties(size=pt), ismath=False)[0]


def wrap(text: str, width_px: float, pt: int, max_lines: int | None = None) -> str:
    """``text`` broken into lines of at most ``width_px`` at font size ``pt``, at its `` · `` separators
    first, then between words; past ``max_lines`` cut with an ellipsis."""
    lines = [line for para in text.split("\n") for line in _fill(para, width_px, pt)]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and text_width(lines[-1] + "…", pt) > width_px:
            lines[-1] = lines[-1][:-1]
        lines[-1] = lines[-1].rstrip() + "…"
    return "\n".join(lines)


def _fill(text: str, width_px: float, pt: int) -> list[str]:
    """Greedy line filling; the pieces are the `` · ``-separated parts, split into words when too wide."""
    pieces: list[tuple[str, str]] = []  # (what joins it to the piece before, piece)
    for i, part in enumerate(text.split(" · ")):
        words = [part] if text_width(part, pt) <= width_px else part.split(" ")
        pieces += [(" · " if i and j == 0 else " ", word) for j, word in enumerate(words)]
    lines, line = [], ""
    for joiner, piece in pieces:
        if line and text_width(line + joiner + piece, pt) > width_px:
            lines.append(line)
            line = piece
        else:
            line = line + joiner + piece if line else piece
    return [*lines, line]


def label_column(labels: list[str]) -> int:
    """The width in px of a column for ``labels``: their longest line, at most ``MAX_LABEL`` (0 without)."""
    widths = [text_width(line, LABEL_PT) for label in labels for line in label.split("\n") if line]
    return int(min(max(widths), MAX_LABEL)) + 16 if widths else 0


def grid_figure(rows: list[Row], title: str) -> Figure:
    """The rows as one labelled grid under ``title``, pixel-exact: tiles upscaled to >= ``MIN_TILE``
    px with ``GAP`` px between them, row labels (wrapped to the row's height) in a column on the left."""
    tiles = [to_rgb8(upscale(row.images)) for row in rows]
    th, tw = tiles[0].shape[1:3]
    labels = [row.label for row in rows]
    left = label_column(labels)
    width = max(MIN_WIDTH, left + max(len(t) for t in tiles) * (tw + GAP) + GAP)
    title = wrap(title, width - 12, TITLE_PT)
    top = TITLE_LINE * (title.count("\n") + 1) + 10
    height = top + len(rows) * (th + GAP) + GAP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[top:, left : left + max(len(t) for t in tiles) * (tw + GAP) + GAP] = GAP_GREY
    for r, row_tiles in enumerate(tiles):
        y = top + GAP + r * (th + GAP)
        for c, tile in enumerate(row_tiles):
            x = left + GAP + c * (tw + GAP)
            canvas[y : y + th, x : x + tw] = tile
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    fig.text(0.5, 1 - 5 / height, title, ha="center", va="top", fontsize=TITLE_PT)
    for r, label in enumerate(labels):
        if label:
            y = top + GAP + r * (th + GAP) + th / 2
            text = wrap(label, left - 12, LABEL_PT, max_lines=max(1, th // LABEL_LINE))
            fig.text(6 / width, 1 - y / height, text, ha="left", va="center", fontsize=LABEL_PT)
    return fig


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure drawn as (H, W, 3) uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def save_png(pixels: np.ndarray, path: Path) -> None:
    """An RGB PNG written atomically: a picture that exists is complete, even while training goes on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    tmp.replace(path)


def save_figure(fig: Figure, path: Path) -> None:
    save_png(figure_pixels(fig), path)


def write_gif(frames: list[np.ndarray], path: Path, fps: float | None = None, hold: float = 1.5) -> None:
    """An animated GIF of (H, W, 3) frames at ``fps`` (None: about 4 s in all, 2 to 20 frames a second),
    its last frame held ``hold`` seconds longer so the result stays in view; written atomically."""
    per_frame = int(1000 / fps) if fps else int(1000 * min(0.5, max(0.05, 4.0 / len(frames))))
    durations = [per_frame] * len(frames)
    durations[-1] += int(1000 * hold)
    images = [Image.fromarray(f) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    tmp.replace(path)


def frame_steps(length: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """The sampling steps a GIF of a ``length``-point path shows: all of them up to ``max_frames``, else
    that many spread evenly, the first (noise) and last (samples) always among them."""
    return sorted(set(np.linspace(0, length - 1, min(length, max_frames)).round().astype(int).tolist()))


def image_gif(path_x: Tensor, labels: Tensor | None, title: str, path: Path) -> None:
    """The sampling path of images as a GIF of grids: ``path_x`` is (T, N, C, H, W) in [0, 1], a frame
    per sampling step (at most ``MAX_FRAMES``), laid out like the still grid, titled with the step."""
    steps = len(path_x) - 1
    frames = [
        figure_pixels(grid_figure(class_rows(path_x[i], labels), f"{title}\nsampling step {i} of {steps}"))
        for i in frame_steps(len(path_x))
    ]
    write_gif(frames, path)
