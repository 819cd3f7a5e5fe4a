"""The pictures a run writes: grids with a row per class or prompt and readable tiles, titles that say
what made them and how good they are, loss.png in every run folder, and the sampling GIFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from dataloaders.base import HeldOut
from evaluation.contract import EvalContext
from evaluation.energy_evaluator import EnergyDistanceEval
from evaluation.image_evaluator import ImageEval
from evaluation.pictures import GAP, GAP_GREY, MIN_TILE, Row, Titles, class_rows, frame_steps, grid_figure
from evaluation.plots_2d import budget_panels, samples_figure
from evaluation.prompt_grid_evaluators import PipelinePromptEval
from solvers.fixed_step import Euler
from training.callbacks.evaluation import run_label
from training.callbacks.loss_plot import LossPlot
from training.checkpoint import load_checkpoint
from training.train import train

CPU = torch.device("cpu")
TILE = MIN_TILE + GAP  # a tile and the gap after it


class ClassGrey(nn.Module):
    """Velocity that takes any noise to the grey level of its class in one Euler step (class k of K ->
    k / (K - 1) in [0, 1]); unconditional: mid-grey."""

    output = "field"

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Tensor | None = None) -> Tensor:
        level = torch.zeros(len(x)) if cond is None else cond.float() / (self.num_classes - 1) * 2 - 1
        return level.view(-1, *[1] * (x.dim() - 1)) - x


def tile_centres(path: Path, rows: int, cols: int) -> np.ndarray:
    """The grey value at the centre of each tile, (rows, cols), for a grid whose tiles are MIN_TILE px
    (its tiles end at the bottom right of the picture; the title is above, the labels left)."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.int16)
    h, w = pixels.shape
    ys = [h - (rows - r) * TILE + MIN_TILE // 2 for r in range(rows)]
    xs = [w - (cols - c) * TILE + MIN_TILE // 2 for c in range(cols)]
    return pixels[np.ix_(ys, xs)]


def test_class_conditional_grid_has_one_row_per_class_of_64px_tiles_under_a_title(tmp_path):
    k = 3
    reference = torch.rand(16, 1, 8, 8) * 2 - 1
    ctx = EvalContext(CPU, out_dir=tmp_path, step=7, label="run (unet, fm)")
    ImageEval(nfe=[1], num_samples=8 * k, batch_size=8)(ClassGrey(k), Euler(), HeldOut(reference, k), ctx)
    path = tmp_path / "grid_nfe1.png"
    h, w = Image.open(path).size[::-1]
    assert h - k * TILE - GAP >= 40  # two title lines above the k rows, nothing else
    centres = tile_centres(path, rows=k, cols=8)
    expected = np.round(255 * np.arange(k) / (k - 1))[:, None]
    assert np.abs(centres - expected).max() <= 1  # row r holds the 8 samples of class r
    column = np.asarray(Image.open(path).convert("L"))[:, w - 8 * TILE + MIN_TILE // 2]
    top = h - k * TILE  # class 0's black tiles: 64 px tall between grey gaps
    gap = GAP_GREY
    assert (column[top - 1], column[top], column[top + MIN_TILE - 1], column[top + MIN_TILE]) == (gap, 0, 0, gap)


def test_unconditional_grid_is_eight_columns(tmp_path):
    reference = torch.rand(16, 3, 8, 8) * 2 - 1
    ImageEval(nfe=[1], num_samples=20, batch_size=20)(
        ClassGrey(2), Euler(), HeldOut(reference), EvalContext(CPU, out_dir=tmp_path)
    )
    centres = tile_centres(tmp_path / "grid_nfe1.png", rows=3, cols=8)
    assert np.abs(centres[:2] - 128).max() <= 1  # mid-grey samples, 8 a row: 20 -> rows of 8, 8, 4
    with Image.open(tmp_path / "grid_data.png") as data:
        assert data.size[0] >= 8 * TILE and data.size[1] >= 2 * TILE  # 16 held-out images, 2 rows of 8


def test_titles_name_run_sampler_nfe_guidance_and_scores():
    titles = Titles("digits (unet, meanflow)", "dopri5(atol=1e-05)", guidance=1.5, step=300)
    title = titles.title("NFE 4", {"energy_distance": 0.012345, "fid": 45.678})
    assert title == (
        "digits (unet, meanflow) · step 300\n"
        "dopri5(atol=1e-05) · NFE 4 · guidance 1.5 · energy distance 0.01235 · FID 45.68"
    )
    assert Titles("", "pipeline", 5.0).title("30 steps") == "pipeline · 30 steps · guidance 5"
    rows = class_rows(torch.rand(24, 1, 8, 8), torch.arange(24) % 3)
    assert [row.label for row in rows] == ["class 0", "class 1", "class 2"] and len(rows[0].images) == 8
    fig = grid_figure(rows, title)
    assert [t.get_text() for t in fig.texts][0] == title  # fits in its two lines above a 600 px grid
    assert [t.get_text() for t in fig.texts][1:] == ["class 0", "class 1", "class 2"]
    assert run_label("digits", {"model": "unet", "loss": "meanflow", "solver": "euler"}) == "digits (unet, meanflow)"


def test_a_long_caption_wraps_inside_its_column_and_is_cut_at_the_tile_height():
    prompt = "an oil painting of a corgi wearing a party hat, " * 6
    fig = grid_figure([Row(torch.rand(2, 3, 8, 8), prompt)], "title")
    caption = fig.texts[1].get_text()
    assert 1 < len(caption.splitlines()) <= MIN_TILE // 14 and caption.endswith("…")
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    first_tile = (fig.get_figwidth() * fig.dpi) - 2 * TILE  # the label column ends where the tiles start
    assert fig.texts[1].get_window_extent(renderer).x1 < first_tile


def test_2d_panels_are_titled_with_their_energy_distance():
    data = torch.randn(200, 2)
    metrics = EnergyDistanceEval(nfe=[1, 4], num_samples=100, batch_size=100)(
        ClassGrey(2), Euler(), HeldOut(data), EvalContext(CPU)
    )
    samples = {"nfe1": np.zeros((100, 2)), "nfe4": np.ones((100, 2))}
    fig = samples_figure(data.numpy(), budget_panels(samples, metrics), "run · step 3\neuler · guidance 1")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "held-out data"
    assert titles[2] == f"NFE 4\nenergy distance {metrics['eval/energy_distance@nfe4']:.4g}"


@pytest.mark.parametrize("image", [False, True], ids=["2d", "images"])
def test_animate_writes_a_gif_of_the_sampling_path(tmp_path, image):
    shape = (1, 8, 8) if image else (2,)
    evaluator = (ImageEval if image else EnergyDistanceEval)(nfe=[1, 3], num_samples=20, batch_size=20, animate=True)
    evaluator(ClassGrey(2), Euler(), HeldOut(torch.rand(16, *shape), 2), EvalContext(CPU, out_dir=tmp_path))
    with Image.open(tmp_path / "sampling.gif") as gif:
        assert gif.n_frames == 4  # noise and the 3 steps of the last budget
    long = frame_steps(101)  # NFE 100: 50 frames, from the noise to the samples
    assert frame_steps(4) == [0, 1, 2, 3] and (len(long), long[0], long[-1]) == (50, 0, 100)
    evaluator.animate = False
    evaluator(ClassGrey(2), Euler(), HeldOut(torch.rand(16, *shape), 2), EvalContext(CPU, out_dir=tmp_path / "off"))
    assert not (tmp_path / "off" / "sampling.gif").exists()


class Painter(nn.Module):
    """A pipeline model: ``sample(prompt=...)`` paints each prompt's images one flat colour."""

    output = "pipeline"

    def sample(self, prompt: list[str], height: int, width: int, **kwargs: object) -> Tensor:
        return torch.stack([torch.full((3, height, width), 0.2 * (i // 2 + 1)) for i in range(len(prompt))])


def test_prompt_grid_has_a_captioned_row_per_prompt(tmp_path):
    prompts = ["a red apple on a wooden table", "a boat on a lake at sunset"]
    evaluator = PipelinePromptEval(prompts=prompts, samples_per_prompt=2, image_size=8, grid_dir=str(tmp_path / "g"))
    evaluator(Painter(), None, HeldOut(torch.zeros(0, 3, 8, 8)), EvalContext(CPU, step=5, label="sdxl (lora)"))
    path = tmp_path / "g" / "grid_step0000005.png"
    centres = tile_centres(path, rows=2, cols=2)
    assert np.abs(centres - np.array([[51], [102]])).max() <= 1  # 8 px images drawn 64 px, a row per prompt
    assert Image.open(path).size[0] > 2 * TILE + 150  # the captions' column left of the tiles


def test_loss_png_is_drawn_in_the_run_folder_and_its_history_resumes(make_cfg, tmp_path):
    train(make_cfg("epochs=1", "eval.animate=true"))
    run_dir = tmp_path / "run"
    with Image.open(run_dir / "sampling.gif") as gif:
        assert gif.n_frames == 5  # the last budget, NFE 4
    ckpt = tmp_path / "outputs" / "ckpts" / "mlp" / "test" / "last.pt"
    history = next(s for s in load_checkpoint(ckpt)["callbacks"] if "losses" in s)
    assert history["steps"].tolist() == list(range(1, 9)) and [e["step"] for e in history["evals"]] == [8]
    (run_dir / "loss.png").unlink()
    train(make_cfg("resume=true", "epochs=2"))
    with Image.open(run_dir / "loss.png") as picture:
        assert picture.size[0] > 600 and picture.size[1] > 500  # the loss above the evaluations' scores
    history = next(s for s in load_checkpoint(ckpt)["callbacks"] if "losses" in s)
    assert history["steps"].tolist() == list(range(1, 17))  # the first run's steps and the resumed run's
    assert [e["step"] for e in history["evals"]] == [8, 16]  # each run's final evaluation
    assert "eval/energy_distance@nfe4" in history["evals"][1]["scores"]


def test_loss_plot_keeps_the_steps_of_the_losses_read_back():
    class Run:  # what LossPlot reads of the trainer
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.checked_step = 0
            self.step = 0

        def read(self, values: list[float]) -> None:
            self.losses += values
            self.checked_step = self.step = self.checked_step + len(values)

    run, plot = Run(), LossPlot(Path("unused.png"))
    run.read([3.0, 2.0])
    plot.collect(run)
    run.read([1.5])
    run.read([1.0, 0.5])  # two reads (a log point, then a check before a checkpoint) between calls
    plot.collect(run)
    plot.on_evaluation(run, {"eval/energy_distance@nfe4": 0.1, "eval/nfe_used@nfe4": 4.0}, final=False)
    assert plot.steps == [1, 2, 3, 4, 5] and plot.losses == [3.0, 2.0, 1.5, 1.0, 0.5]
    saved = plot.state_dict()
    run.read([9.0, 9.0])  # losses past the checkpoint, then a NaN: rollback to step 5
    plot.collect(run)
    plot.load_state_dict(saved)
    run.checked_step = run.step = 5
    run.read([0.4])
    plot.collect(run)
    assert plot.steps == [1, 2, 3, 4, 5, 6] and plot.losses[-1] == 0.4
    assert plot.evals == [(5, {"eval/energy_distance@nfe4": 0.1})]  # nfe_used is not a score
    assert len(plot.figure().axes) == 2
    run.read([1e-3] * 50)  # a loss that fell by more than 20x: drawn on a log scale
    plot.collect(run)
    assert [ax.get_yscale() for ax in plot.figure().axes] == ["log", "linear"]
    fresh = LossPlot(Path("unused.png"))  # a malformed history (checkpoints are untrusted) starts afresh
    fresh.load_state_dict({**saved, "losses": torch.zeros(3, dtype=torch.float64)})
    fresh.load_state_dict({**saved, "evals": [{"step": "5", "scores": {}}]})
    assert (fresh.steps, fresh.evals) == ([], [])
    fresh.load_state_dict(saved)
    assert fresh.steps == [1, 2, 3, 4, 5] and fresh.evals == [(5, {"eval/energy_distance@nfe4": 0.1})]
