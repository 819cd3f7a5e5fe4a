"""scripts/fid_stats.py and scripts/score_samples.py, with the test feature network for Inception."""

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

from evaluation.clip_score import CLIPScore
from evaluation.fid_statistics import Statistics
from scripts import fid_stats, score_samples
from tests.fid_helpers import digit_images, tiny_extractor, write_folder
from tests.test_clip_score import PROMPTS, flat_images, one_thread, tiny  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_fid_stats_caches_a_folder_by_name_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    folder = write_folder(tmp_path / "faces", digit_images(40, seed=0))
    argv = [
        str(folder),
        "--name",
        "faces",
        "--mode",
        "legacy_tensorflow",
        "--stats-dir",
        str(tmp_path / "stats"),
        "--num-workers",
        "0",
    ]
    assert fid_stats.main(argv, extractor=tiny_extractor()) == 0
    assert "eval.fid.reference=faces" in capsys.readouterr().out
    stats = Statistics.load(tmp_path / "stats" / "faces_legacy_tensorflow.npz")
    assert (stats.count, stats.resolution, stats.mode, stats.source) == (40, "16x16", "legacy_tensorflow", str(folder))
    assert fid_stats.main(argv, extractor=tiny_extractor()) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert fid_stats.main([*argv, "--overwrite"], extractor=tiny_extractor()) == 0
    assert fid_stats.main(["--list", "--stats-dir", str(tmp_path / "stats")]) == 0
    assert "faces_legacy_tensorflow.npz" in capsys.readouterr().out


def test_fid_stats_registered_set_center_crops_to_its_resolution(tmp_path: Path) -> None:
    root = tmp_path / "imagenet" / "train"
    write_folder(root / "n01", digit_images(12, seed=0, size=40))
    Image.fromarray(digit_images(1, seed=1, size=64)[0]).resize((80, 60)).save(root / "n01" / "wide.png")
    argv = ["imagenet256", "--root", str(root), "--resolution", "24", "--stats-dir", str(tmp_path / "stats")]
    argv += ["--num-workers", "0"]
    assert fid_stats.main([*argv, "--mode", "legacy_tensorflow"], extractor=tiny_extractor()) == 0
    stats = Statistics.load(tmp_path / "stats" / "imagenet256_legacy_tensorflow.npz")
    assert (stats.count, stats.resolution) == (13, "24x24")


def test_fid_stats_errors_are_one_line(tmp_path: Path, capsys) -> None:
    folder = write_folder(tmp_path / "x", digit_images(4, seed=0))
    for args, message in {(str(folder),): "add --name NAME", ("nowhere",): "neither a registered set"}.items():
        assert fid_stats.main([*args, "--stats-dir", str(tmp_path / "stats")]) == 2
        assert message in capsys.readouterr().err
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = {
        (str(folder), "--name", "x", "--inception-path", str(tmp_path / "missing.pt")): "no file there; download",
        ("cifar10_train", "--root", str(tmp_path / "nocifar")): "no CIFAR-10 at",
    }
    for args, message in cases.items():
        out = subprocess.run(
            [sys.executable, "scripts/fid_stats.py", *args, "--stats-dir", str(tmp_path / "stats")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-1000:])
        assert out.stderr.startswith("error:") and out.stderr.count("\n") == 1


def test_score_samples_fid_kid_and_scores_json(tmp_path: Path) -> None:
    samples = write_folder(tmp_path / "samples", digit_images(40, seed=0))
    same = write_folder(tmp_path / "same", digit_images(40, seed=0))
    argv = [str(samples), "--reference", str(same), "--stats-dir", str(tmp_path / "stats")]
    assert score_samples.main(argv, extractor=tiny_extractor("clean")) == 0
    scores = json.loads((samples / "scores.json").read_text())
    assert scores["fid"] == pytest.approx(0, abs=1e-6) and scores["num_images"] == 40 and "kid" in scores
    noisy = write_folder(tmp_path / "noisy", digit_images(40, seed=0, noise=0.8))
    assert score_samples.main([str(noisy), *argv[1:]], extractor=tiny_extractor("clean")) == 0
    assert json.loads((noisy / "scores.json").read_text())["fid"] > 0.1
    assert score_samples.main([str(samples)]) == 2  # nothing asked for


def test_score_samples_clip_score_pairs_sample_i_with_prompt_i_mod_p(tiny: CLIPScore, tmp_path: Path) -> None:  # noqa: F811
    images = flat_images(2, (32, 32), torch.Generator().manual_seed(0))  # sample i shows colour i % 4
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:06d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join(PROMPTS[1:] + PROMPTS[:1]) + "\n")
    assert score_samples.main([str(folder), "--prompts", str(prompts)], clip=tiny) == 0
    matching = json.loads((folder / "scores.json").read_text())
    assert score_samples.main([str(folder), "--prompts", str(shuffled)], clip=tiny) == 0
    assert matching["clip/num_images"] == 8
    assert matching["clip_score"] > json.loads((folder / "scores.json").read_text())["clip_score"] + 10
