"""FID in the framework: numbered sample folders that resume, per-sample noise, and FID/KID at
the end of training and in eval-only runs (Inception replaced by tests/fid_helpers.tiny_extractor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.errors import EvaluationError
from evaluation.sample_folder_writer import MANIFEST, write_samples
from evaluation.sample_generation import ImageSampler
from solvers.fixed_step import Euler
from tests.fid_helpers import digit_images, write_folder
from tests.test_images import TINY_IMAGE, TINY_UNET
from training.errors import UserError
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def ramp(start: int, stop: int) -> torch.Tensor:
    """Sample i: a 4x4 RGB image of value (i % 10) / 10, the same however the samples are batched."""
    return torch.stack([torch.full((3, 4, 4), (i % 10) / 10) for i in range(start, stop)])


class Interrupt(Exception):
    pass


def test_samples_are_numbered_pngs_and_an_interrupted_run_resumes(tmp_path: Path) -> None:
    settings = {"source": "ckpt@step5", "solver": "euler", "budget": "nfe2", "seed": 0}
    calls: list[tuple[int, int]] = []

    def failing(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        if start >= 8:
            raise Interrupt
        return ramp(start, stop)

    folder = tmp_path / "samples"
    with pytest.raises(Interrupt):
        write_samples(folder, 20, 4, failing, settings, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(8)] + [MANIFEST]

    def counting(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return ramp(start, stop)

    calls.clear()
    files = write_samples(folder, 20, 4, counting, settings, progress=False)
    assert calls == [(8, 12), (12, 16), (16, 20)]  # resumed at the first missing sample
    straight = write_samples(tmp_path / "straight", 20, 7, ramp, settings, progress=False)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in straight]
    assert np.asarray(Image.open(files[13])).mean() == pytest.approx(0.3 * 255, abs=0.5)
    calls.clear()
    write_samples(folder, 24, 4, counting, settings, progress=False)  # more samples: the first 20 are kept
    assert calls == [(20, 24)]


def test_samples_of_other_settings_are_replaced_and_foreign_folders_refused(tmp_path: Path) -> None:
    folder = tmp_path / "samples"
    write_samples(folder, 6, 4, ramp, {"source": "a@step1"}, progress=False)
    calls = []
    write_samples(folder, 6, 4, lambda a, b: calls.append(a) or ramp(a, b), {"source": "a@step2"}, progress=False)
    assert calls == [0, 4] and json.loads((folder / MANIFEST).read_text()) == {"source": "a@step2"}
    foreign = tmp_path / "holiday_photos"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"...")
    with pytest.raises(EvaluationError, match="not empty and has no samples.json"):
        write_samples(foreign, 4, 4, ramp, {}, progress=False)
    assert (foreign / "beach.jpg").exists()


def test_sample_i_is_the_same_whatever_the_batching() -> None:
    model = torch.nn.Identity()

    class Half(torch.nn.Module):
        def forward(self, x, t, r, cond):
            return -0.5 * x + (0 if cond is None else cond[:, None, None, None].float() / 10)

    sampler = ImageSampler(Half(), Euler(), 2, (1, 4, 4), torch.device("cpu"), seed=3, num_classes=4)
    whole = sampler(0, 10)
    torch.testing.assert_close(torch.cat([sampler(0, 3), sampler(3, 7), sampler(7, 10)]), whole)
    assert whole.shape == (10, 1, 4, 4) and 0 <= whole.min() and whole.max() <= 1
    assert not torch.equal(sampler.noise(0, 1), ImageSampler(model, Euler(), 2, (1, 4, 4), "cpu", seed=4).noise(0, 1))


FID = [
    "eval.fid.num_samples=40", "eval.fid.nfe=[2]", "eval.fid.batch_size=16", "eval.fid.progress=false",
    "+eval.fid.extractor._target_=tests.fid_helpers.tiny_extractor", "+eval.fid.extractor.mode=clean",
    "eval.fid.energy_distance_samples=32",
]  # fmt: skip


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "reference_digits", digit_images(64, seed=0), grey=True)


def test_training_ends_with_fid_kid_and_settings_in_metrics_json(make_cfg, tmp_path: Path, reference: Path) -> None:
    metrics, objects = train(make_cfg(*TINY_IMAGE, *TINY_UNET, *FID, f"eval.fid.reference={reference}"))
    assert metrics["eval/fid@nfe2"] > 0 and np.isfinite(metrics["eval/kid@nfe2"])
    assert metrics["eval/energy_distance_features@nfe2"] > 0
    assert "eval/fid@nfe1" not in metrics  # only the budgets eval.fid.nfe names
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["fid/num_samples"] == 40 and saved["fid/mode"] == "clean" and saved["fid/seed"] == 0
    assert saved["eval/solver"] == "euler" and saved["eval/guidance_scale"] == 1.0
    assert saved["eval/fid@nfe2"] == pytest.approx(metrics["eval/fid@nfe2"])
    folder = tmp_path / "outputs" / "samples" / "test" / "nfe2_euler_w1_seed0"
    assert len(list(folder.glob("*.png"))) == 40
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"].endswith("last.pt@step3") and manifest["budget"] == "nfe2"
    assert Image.open(folder / "000000.png").size == (16, 16)
    assert len(list((tmp_path / "outputs" / "fid_stats").glob("folder-reference_digits-*_clean.npz"))) == 1


def test_eval_only_run_uses_the_checkpoint_eval_config_and_logs_an_eval_trackio_run(
    make_cfg, tmp_path: Path, reference: Path
) -> None:
    _, objects = train(make_cfg(*TINY_IMAGE, *TINY_UNET, *FID, f"eval.fid.reference={reference}"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    # the command: no eval= choice, so the checkpoint's image evaluator is used, with FID-48 on top
    out = subprocess.run(
        [sys.executable, "launcher.py", "run_name=fid48", f"eval_checkpoint={objects['checkpoint']}",
         "eval.fid.num_samples=48", f"paths.root={tmp_path}/outputs", f"paths.experiment_log={tmp_path}/LOG.md",
         "trusted_targets=[tests.fid_helpers.tiny_extractor]"],  # the test's extractor: not in configs/
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FID" in out.stdout and "nfe2" in out.stdout
    metrics = json.loads(next((tmp_path / "outputs" / "runs" / "fid48").glob("*/metrics.json")).read_text())
    assert metrics["fid/num_samples"] == 48 and metrics["eval/fid@nfe2"] > 0 and metrics["checkpoint_step"] == 3
    # training's final evaluation scored the same weights (last.pt at step 3): its 40 samples are
    # reused and 8 added
    folder = tmp_path / "outputs" / "samples" / "test" / "nfe2_euler_w1_seed0"
    assert len(list(folder.glob("*.png"))) == 48
    assert "eval of" in (tmp_path / "LOG.md").read_text() and "eval/fid@nfe2" in (tmp_path / "LOG.md").read_text()
    trackio = str(Path(sys.executable).parent / "trackio")
    runs = subprocess.run(
        [trackio, "list", "runs", "--project", "denoising-zoo", "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert json.loads(runs)["runs"] == ["eval/fid48"]  # no training run is created


def test_fid_bad_settings_are_one_line_errors(make_cfg, tmp_path: Path, reference: Path) -> None:
    with pytest.raises(UserError, match="needs eval.fid.reference"):
        train(make_cfg(*TINY_IMAGE, *TINY_UNET, *FID))
    with pytest.raises(UserError, match="FID/KID need image samples"):
        train(make_cfg("eval.fid.num_samples=10", f"eval.fid.reference={reference}"))
    # a missing reference fails before any training step
    with pytest.raises(UserError, match="no reference statistics 'cifar10_train'"):
        train(make_cfg(*TINY_IMAGE, *TINY_UNET, *FID, "eval.fid.reference=cifar10_train"))
    assert not (tmp_path / "outputs" / "ckpts").exists()
