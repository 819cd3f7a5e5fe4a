"""GLIDE fine-tuning end to end through train(cfg): the experiment presets with a tiny GLIDE of the
same architecture, a captioned folder the test makes, GLIDE's real tokenizer, and sample_glide.py."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import sample_glide
from tests.conftest import GLIDE_DATA
from tests.test_caption_data import photos, shards  # noqa: F401  (fixtures)
from tests.test_clip_score import one_thread, tiny  # noqa: F401  (fixtures)
from training.checkpoint import load_checkpoint
from training.compose import compose_config
from training.errors import UserError
from training.train import train

pytestmark = pytest.mark.skipif(not GLIDE_DATA.is_dir(), reason=f"GLIDE's vocabulary not at {GLIDE_DATA}")

TINY_GLIDE = [
    "model.from_scratch=true", "model.num_channels=32", "model.num_res_blocks=1", "model.channel_mult='1,2'",
    "model.num_head_channels=16", "model.attention_resolutions='8'", "model.dropout=0", "model.xf_width=32",
    "model.xf_layers=1", "model.xf_heads=2", "model.text_ctx=16", "model.image_size=16",
]  # fmt: skip
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 captioned images: scikit-learn's sample photos, tinted and cropped, with a caption each."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("captioned")
    sample_photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(24):
        name, colour = list(COLOURS.items())[i % 4]
        photo = sample_photos[i % 2]
        top, left = rng.integers(0, 100), rng.integers(0, 200)
        crop = photo[top : top + 300, left : left + 300].astype(np.float32)
        tinted = (0.5 * crop + 0.5 * np.array(colour)).clip(0, 255).astype(np.uint8)
        Image.fromarray(tinted).save(root / f"{i:03d}.jpg")
        (root / f"{i:03d}.txt").write_text(f"a {name} tinted photo of {'a temple' if i % 2 else 'a flower'}\n")
    return root


def glide_cfg(make_cfg, data: Path | list[str], *overrides: str):
    """The base preset, tiny; ``data`` a captioned folder or the overrides that pick other data."""
    data = [f"dataloaders.root={data}"] if isinstance(data, Path) else data
    return make_cfg(
        "experiment=glide_base_finetune", *TINY_GLIDE, *data,
        f"dataloaders.tokenizer.vocab_dir={GLIDE_DATA}", "dataloaders.image_size=16", "dataloaders.num_workers=0",
        "dataloaders.num_eval=4", "precision=fp32", "solver.respacing='8'", "eval.samples_per_prompt=1",
        "eval.every_epochs=0", "trainer.log_every=10", "lr_schedule=constant", *overrides,
    )  # fmt: skip


def test_base_fine_tuning_lowers_the_loss_and_writes_grids(make_cfg, captioned: Path, tmp_path: Path) -> None:
    cfg = glide_cfg(make_cfg, captioned, "epochs=30", "optimizer.lr=1e-3", "eval.every_steps=75",
                    "checkpoint.every_steps=100", "trainer.ema_decay=0.99")  # fmt: skip
    metrics, objects = train(cfg)
    losses = objects["trainer"].losses
    assert len(losses) == 150  # 20 training pairs, batch 4: 5 steps an epoch
    first, last = statistics.mean(losses[:20]), statistics.mean(losses[-20:])
    assert last < 0.6 * first, (first, last)
    grids = sorted(p.name for p in (tmp_path / "run" / "grids").iterdir())
    assert grids == ["grid_final.png", "grid_step0000075.png", "grid_step0000150.png"]
    assert Image.open(tmp_path / "run" / "grid_final.png").size[1] > 16
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["eval/guidance_scale"] == 3.0 and saved["eval/num_prompts"] == 4
    state = load_checkpoint(objects["checkpoint"], "test")
    assert state["config"]["model"]["_target_"] == "models.glide.GlideUNet" and state["step"] == 150
    # eval-only on the launcher's defaults (solver=euler, eval=energy): the checkpoint's own sampler and grids;
    # eval=prompts from the command line resolves against the checkpoint's data (its tokenizer), not moons'
    for extra in ([], ["eval=prompts", "eval.samples_per_prompt=1"]):
        again = tmp_path / f"again{len(extra)}"
        train(compose_config([f"eval_checkpoint={objects['checkpoint']}", "run_name=again", f"paths.run_dir={again}",
                              "trackio.enabled=false", f"paths.experiment_log={tmp_path}/log.md", *extra]))  # fmt: skip
        rescored = json.loads((again / "metrics.json").read_text())
        assert rescored["eval/sampler"] == "ddpm" and rescored["eval/solver"] == saved["eval/solver"]
        assert (again / "grid_final.png").is_file()


def test_text_encoder_gets_its_own_learning_rate_or_is_frozen(make_cfg, captioned: Path) -> None:
    text = "^(transformer|token_embedding|positional_embedding|padding_embedding|final_ln|transformer_proj)"
    _, objects = train(glide_cfg(make_cfg, captioned, "max_steps=2", f"param_groups=[{{pattern: '{text}', lr: 1e-5}}]"))
    groups = objects["trainer"].optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]
    model = objects["model"]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.text_encoder_parameters()}
    _, objects = train(glide_cfg(make_cfg, captioned, "max_steps=2", "run_name=frozen", "overwrite=true",
                                 f"param_groups=[{{pattern: '{text}', freeze: true}}]"))  # fmt: skip
    assert not any(p.requires_grad for p in objects["model"].text_encoder_parameters())
    assert len(objects["trainer"].optimizer.param_groups) == 1


def test_upsampler_fine_tuning_and_chained_sampling(make_cfg, captioned: Path, tmp_path: Path) -> None:
    _, base = train(glide_cfg(make_cfg, captioned, "max_steps=3", "run_name=base"))
    up_cfg = glide_cfg(make_cfg, captioned, "experiment=glide_upsample_finetune", "max_steps=3", "run_name=up",
                       "model.image_size=32", "model.channel_mult='1,1,2'", "dataloaders.image_size=32",
                       "dataloaders.low_res_size=16", f"paths.run_dir={tmp_path}/up")  # fmt: skip
    _, up = train(up_cfg)
    assert (tmp_path / "up" / "grid_final.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red tinted photo of a flower\na blue tinted photo of a temple\n")
    out = tmp_path / "samples" / "grid.png"
    argv = ["--prompts", str(prompts), "--base", str(base["checkpoint"]), "--upsample", str(up["checkpoint"]),
            "--vocab-dir", str(GLIDE_DATA), "--samples", "2", "--base-respacing", "4", "--upsample-respacing", "4",
            "--out", str(out)]  # fmt: skip
    assert sample_glide.main(argv) == 0
    assert Image.open(out).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 x 2 grid of 32x32 with padding 2
    assert len(list((tmp_path / "samples" / "grid").glob("*.png"))) == 4
    # the base model's checkpoint where the upsampler's belongs: named, not crashed on
    wrong = argv.copy()
    wrong[wrong.index("--upsample") + 1] = str(base["checkpoint"])
    assert sample_glide.main(wrong) == 2


def test_sampling_is_deterministic_and_guidance_one_is_conditional(make_cfg, captioned: Path) -> None:
    from evaluation.sample_generation import sample
    from solvers.diffusion import DiffusionSampler

    _, objects = train(glide_cfg(make_cfg, captioned, "max_steps=2"))
    model = objects["ema"].module.eval()
    tokens = torch.randint(0, 50000, (2, 16))
    cond = {"tokens": tokens, "mask": torch.ones(2, 16, dtype=torch.bool)}
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_a"):
        sampler = DiffusionSampler(name, "6")
        a, b, one, conditional = (
            sample(model, sampler, noise, 0, cond=cond, guidance_scale=w, generator=torch.Generator().manual_seed(1))[
                0
            ].x
            for w in (2.0, 2.0, 1.0, 1.0)
        )
        assert a.shape == (2, 3, 16, 16) and torch.equal(a, b), name
        assert torch.equal(one, conditional), name


def test_glide_without_weights_is_a_one_line_error(make_cfg, captioned: Path) -> None:
    with pytest.raises(UserError, match="OpenAI's released weights .* model.checkpoint=PATH"):
        train(glide_cfg(make_cfg, captioned, "model.from_scratch=false"))


def test_webdataset_shards_through_the_launcher_config(make_cfg, shards: Path, tmp_path: Path) -> None:  # noqa: F811
    """Skipped samples are counted, and an epoch that ends before its estimated length ends cleanly."""
    data = ["dataloaders=webdataset", f"dataloaders.urls='{shards}/{{00000..00001}}.tar'"]
    cfg = glide_cfg(make_cfg, data, "dataloaders.wds_tar_size=100", "dataloaders.shuffle_buffer=8", "epochs=2",
                    "dataloaders.batch_size=2")  # fmt: skip
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.epoch == 2 and 0 < trainer.step < 2 * 100  # far fewer batches than the estimate
    assert np.isfinite(metrics["train/final_loss"])


def test_a_run_resumes_from_its_step_checkpoint(make_cfg, captioned: Path) -> None:
    _, first = train(glide_cfg(make_cfg, captioned, "max_steps=7", "checkpoint.every_steps=3", "epochs=3"))
    state = load_checkpoint(first["checkpoint"], "test")
    assert state["step"] == 7 and state["batch_in_epoch"] == 2  # 5 steps an epoch: stopped inside epoch 2
    _, resumed = train(glide_cfg(make_cfg, captioned, "resume=true", "epochs=3"))
    assert resumed["trainer"].step == 15 and resumed["trainer"].epoch == 3


def test_prompt_grid_logs_the_clip_score_of_its_samples(tiny, tmp_path: Path) -> None:  # noqa: F811
    """eval.clip scores each grid's samples against their prompts (a tiny CLIP trained on colours)."""
    from dataloaders.base import HeldOut
    from evaluation.contract import EvalContext
    from evaluation.prompt_grid_evaluators import PromptGridEval
    from models.glide_tokenizer import GlideTokenizer
    from solvers.base import Sampler, Solution

    colours = {"red": (0.9, -0.8, -0.8), "blue": (-0.8, -0.6, 0.8)}

    class Painter(Sampler):  # stands in for a diffusion sampler: paints the prompt
        calls, samples = "denoiser", ("eps",)

        def grid(self, nfe=0, device="cpu"):
            return torch.zeros(1)

        def __call__(self, fn, x, grid, callback=None, generator=None):
            rows = [colours["red" if i % 2 == 0 else "blue"] for i in range(len(x))]
            return Solution(torch.tensor(rows)[:, :, None, None].expand(-1, -1, 32, 32), 1)

    painter, nothing = Painter(), HeldOut(torch.zeros(0))

    evaluator = PromptGridEval(tokenizer=GlideTokenizer(str(GLIDE_DATA), text_ctx=16),
                               prompts=["a red image", "a blue image"], image_size=32,
                               grid_dir=str(tmp_path / "grids"), clip=tiny)  # fmt: skip
    metrics = evaluator(torch.nn.Identity(), painter, nothing, EvalContext(torch.device("cpu"), step=10))
    assert (tmp_path / "grids" / "grid_step0000010.png").is_file()
    evaluator.prompts = ["a blue image", "a red image"]  # the same pictures under the other captions
    swapped = evaluator(torch.nn.Identity(), painter, nothing, EvalContext(torch.device("cpu"), step=11))
    assert metrics["eval/clip_score"] > swapped["eval/clip_score"] + 10
