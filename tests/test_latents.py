"""Latent space: the SD VAE wrapper, precompute_latents (shards, manifest, resume), LatentData and a
MeanFlow DiT trained on latents, all with a tiny randomly initialised AutoencoderKL saved to a folder."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapters.vae import SDVAE
from dataloaders.images import image_transform
from dataloaders.latents import LatentData
from scripts.precompute_latents import main as precompute_latents
from training.errors import UserError
from training.train import train

SCALING = 0.5  # not SD's 0.18215: the wrapper must read it from the VAE's config
TINY_VAE = {
    "block_out_channels": [8, 16],  # two blocks: 16x16 images -> 8x8 latents
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "scaling_factor": SCALING,
}
FOLDER = ["dataloaders.image_size=16", "dataloaders.class_subfolders=true", "dataloaders.num_classes=2",
          "dataloaders.num_workers=0", "dataloaders.batch_size=4"]  # fmt: skip
LATENT_DATA = ["dataloaders.image_size=8", "dataloaders.channels=4", "dataloaders.num_classes=2",
               f"dataloaders.expected_scaling_factor={SCALING}", "dataloaders.num_eval=4",
               "dataloaders.batch_size=8"]  # fmt: skip


def make_images(root: Path) -> Path:
    """40 PNGs in two class folders, each a horizontal gradient (so its flip is another image)."""
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(20):
            ramp = np.linspace(0, 255, 12, dtype=np.uint8)[None, :, None]
            pixels = np.broadcast_to(ramp, (10, 12, 3)).copy()
            pixels[..., 1] = 5 * i + 100 * c
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def precompute(images: Path, vae: Path, out: Path, *extra: str) -> int:
    args = ["--data", "folder", "--data-override", f"dataloaders.root={images}"]
    for override in FOLDER:
        args += ["--data-override", override]
    return precompute_latents([*args, "--vae", str(vae), "--out", str(out), "--batch-size", "8", "--device", "cpu",
                               *extra])  # fmt: skip


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    SDVAE(config=TINY_VAE).vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory, vae_dir) -> Path:
    """The 40 images encoded with flips in one shard-size-32 run: 80 latents of 4x8x8 in 2 shards."""
    root = tmp_path_factory.mktemp("latents")
    assert precompute(make_images(root / "images"), vae_dir, root / "out", "--shard-size", "32") == 0
    return root / "out"


def test_sd_vae_loads_from_a_folder_offline_and_round_trips_shapes(vae_dir):
    vae = SDVAE(pretrained=str(vae_dir))
    assert vae.scaling_factor == SCALING and vae.source == str(vae_dir)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.training  # frozen
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    mean = vae.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, mean * SCALING)  # the posterior mean, scaled by the config's factor
    assert not torch.equal(vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0)), z)
    images = vae.decode(z)
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, vae.vae.decode(mean).sample.clamp(-1, 1))  # decode undoes the scaling


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_sd_vae_that_is_neither_a_folder_nor_reachable_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"^SD VAE 'denoising-zoo/no-such-vae' is not a local folder and the hub is "
                                         r"offline \(HF_HUB_OFFLINE=1\); download it once online") as info:  # fmt: skip
        SDVAE(pretrained="denoising-zoo/no-such-vae")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="holds no AutoencoderKL"):
        SDVAE(pretrained=str(tmp_path))


def test_precompute_writes_flipped_shards_and_a_manifest_and_resumes(image_folder, vae_dir, tmp_path, caplog):
    make_images(tmp_path / "gradients")  # asymmetric images replace the flat colours: a flip is another image
    for path in (tmp_path / "gradients").rglob("*.png"):
        path.replace(image_folder / path.relative_to(tmp_path / "gradients"))
    out = tmp_path / "latents"
    assert precompute(image_folder, vae_dir, out, "--shard-size", "16") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("vae", "scaling_factor", "latent_shape", "image_size", "num_images",
                                     "num_classes", "flip", "dtype")} == {
        "vae": str(vae_dir), "scaling_factor": SCALING, "latent_shape": [4, 8, 8], "image_size": 16,
        "num_images": 40, "num_classes": 2, "flip": True, "dtype": "float16"}  # fmt: skip
    assert [(s["file"], s["images"], s["latents"]) for s in manifest["shards"]] == [
        ("shard_00000.safetensors", 16, 32),
        ("shard_00001.safetensors", 16, 32),
        ("shard_00002.safetensors", 8, 16),
    ]
    shard = load_file(out / "shard_00000.safetensors")
    assert shard["latents"].shape == (32, 4, 8, 8) and shard["latents"].dtype == torch.float16
    assert shard["flipped"].tolist() == [False] * 16 + [True] * 16
    assert shard["image_index"].tolist() == list(range(16)) * 2 and shard["labels"].tolist() == [0] * 32
    with Image.open(image_folder / "cats" / "000.png") as image:  # image 0 is cats/000.png (file order)
        x = image_transform(16, center_crop=True, hflip=False)(image.convert("RGB"))[None]
    vae = SDVAE(pretrained=str(vae_dir))
    torch.testing.assert_close(shard["latents"][0].float(), vae.encode(x)[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(shard["latents"][16].float(), vae.encode(x.flip(-1))[0], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(shard["latents"][0], shard["latents"][16])

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    caplog.set_level(logging.INFO, logger="dataloaders.latents")
    assert precompute(image_folder, vae_dir, out, "--shard-size", "16") == 0  # a finished run: nothing to encode
    assert "skipping 3 finished shards" in caplog.text and "wrote" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")} == mtimes

    manifest["shards"] = manifest["shards"][:2]  # as if killed after writing the last shard, before recording it
    (out / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    assert precompute(image_folder, vae_dir, out, "--shard-size", "16") == 0
    assert "skipping 2 finished shards" in caplog.text and caplog.text.count("wrote shard_") == 1
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    assert [name for name in sorted(again) if again[name] != mtimes[name]] == ["shard_00002.safetensors"]
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 3


def test_precompute_bad_input_is_one_line(image_folder, vae_dir, tmp_path, capsys):
    out = tmp_path / "latents"
    assert precompute(image_folder, vae_dir, out, "--shard-size", "64") == 0
    capsys.readouterr()  # the progress bar
    assert precompute(image_folder, vae_dir, out, "--shard-size", "64", "--no-flip") == 2
    assert precompute(image_folder, tmp_path / "no-vae", out) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].startswith(f"error: {out} holds latents made with other settings (flip: True -> False)")
    assert errors[1].startswith("error: SD VAE") and len(errors) == 2


def test_latent_data_holds_out_whole_images_and_batches_float32(latents):
    data = LatentData(str(latents), SCALING, image_size=8, channels=4, num_classes=2, num_eval=4, batch_size=8)
    assert data.shape == (4, 8, 8) and data.num_classes == 2
    assert data.eval_set.shape == (4, 4, 8, 8) and data.eval_set.dtype == torch.float32
    assert data.train_set.shape == (80 - 2 * 4, 4, 8, 8)  # neither copy of a held-out image trains
    loader = data.train_loader(torch.device("cpu"), seed=0)
    batch = next(iter(loader))
    assert len(loader) == 72 // 8 and batch["x1"].dtype == torch.float32 and batch["cond"].shape == (8,)
    images = data.decode(data.eval_set[:2])
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize(
    "change, expected",
    [({"channels": 3}, "3x8x8 with scaling 0.5"), ({"image_size": 32}, "4x32x32 with scaling 0.5"),
     ({"expected_scaling_factor": 0.18215}, "4x8x8 with scaling 0.18215")],
)  # fmt: skip
def test_latents_that_do_not_fit_the_model_are_a_one_line_error(latents, change, expected):
    kwargs = {"expected_scaling_factor": SCALING, "image_size": 8, "channels": 4, "num_eval": 4, **change}
    message = f"latents in {latents} are 4x8x8 with scaling 0.5 but the model expects {expected}; re-run scripts/"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        LatentData(str(latents), **kwargs)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_a_decoding_vae_that_is_not_there_fails_before_training(latents):
    with pytest.raises(ValueError, match="^SD VAE 'denoising-zoo/no-such-vae' is not a local folder and the hub"):
        LatentData(str(latents), SCALING, image_size=8, channels=4, num_eval=4, vae="denoising-zoo/no-such-vae")


def test_missing_latents_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json .* python scripts/precompute_latents.py"):
        LatentData(str(tmp_path))


TINY_DIT = ["model._target_=models.dit.DiT", "+model.patch_size=4", "+model.hidden_size=32", "+model.depth=1",
            "+model.num_heads=2"]  # fmt: skip


def test_imagenet_meanflow_experiment_trains_on_latents(make_cfg, latents, tmp_path):
    cfg = make_cfg("experiment=imagenet_dit_b2_meanflow", f"dataloaders.root={latents}", *LATENT_DATA, *TINY_DIT,
                   "max_steps=2", "epochs=1", "eval.nfe=[1,2]", "eval.num_samples=8", "eval.batch_size=8",
                   "eval.every_epochs=0")  # fmt: skip
    assert (cfg.loss.kappa, cfg.loss.cond_dropout, cfg.dataloaders.num_classes, cfg.precision.name) == (
        0.5,
        0.1,
        2,
        "bf16",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].step == 2 and np.isfinite(metrics["eval/energy_distance@nfe2"])
    assert np.load(tmp_path / "run" / "samples_nfe1.npy").shape == (8, 4, 8, 8)  # samples stay latents
    with pytest.raises(UserError, match="dataloaders config is invalid: latents in .* are 4x8x8 with scaling 0.5 but"):
        train(make_cfg("experiment=imagenet_dit_b2_meanflow", f"dataloaders.root={latents}", *LATENT_DATA, *TINY_DIT,
                       "dataloaders.expected_scaling_factor=0.18215", "run_name=wrong"))  # fmt: skip


def test_latent_runs_write_decoded_grids(make_cfg, tmp_path, latents):
    from PIL import Image

    cfg = make_cfg("experiment=imagenet_dit_b2_meanflow", f"dataloaders.root={latents}", *LATENT_DATA, *TINY_DIT,
                   "max_steps=1", "epochs=1", "eval.nfe=[1]", "eval.num_samples=4", "eval.batch_size=4",
                   "eval.every_epochs=0", "precision=fp32")  # fmt: skip
    train(cfg)
    with Image.open(tmp_path / "run" / "grid_nfe1.png") as grid, Image.open(tmp_path / "run" / "grid_data.png") as data:
        assert grid.mode == data.mode == "RGB"  # 3-channel pixels decoded by the VAE, not 4-channel latents
        # four decoded 16x16 images, a row per class (two of each of 2), drawn 64 px under the title
        assert grid.size[0] >= 2 * (64 + 2) + 2 and 2 * (64 + 2) + 2 + 40 <= grid.size[1] < 3 * (64 + 2)
