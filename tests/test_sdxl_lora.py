"""SDXL LoRA end to end through train(cfg), on a tiny SDXL of the real layout saved as a diffusers
folder (tests/sdxl_helpers.py) and a captioned folder the tests make; LoRA files checked with
diffusers' own loader; generation, LoRA export and the latent/text cache through their scripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from adapters.sdxl import SDXLLoRA, is_lora_key
from adapters.sdxl_components import SDXLWeightsError, load_components
from adapters.sdxl_lora import KOHYA_FILE, LORA_FILE, lora_file_base
from dataloaders.caption_preprocess import Preprocess
from dataloaders.sdxl_cache_writer import SDXLEncoding, precompute_sdxl_cache
from losses.sdxl import SDXLDiffusionLoss, min_snr_weights
from scripts import export, generate, precompute_sdxl
from tests.sdxl_helpers import FP32, save_tiny_sdxl
from tests.test_caption_data import photos, shards  # noqa: F401  (fixtures)
from training.checkpoint import load_checkpoint
from training.errors import UserError
from training.train import train

CPU = torch.device("cpu")
SIZE = 64  # pixels; latents 8x8


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 landscape images (80x64) of four colours, captioned with their colour."""
    root = tmp_path_factory.mktemp("captioned")
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
    rng = np.random.default_rng(0)
    for i in range(8):
        name, colour = list(colours.items())[i % 4]
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (64, 80, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square\n")
    return root


def sdxl_cfg(make_cfg, sdxl: Path, data: list[str], *overrides: str):
    return make_cfg(
        "experiment=sdxl_lora", f"model.pretrained={sdxl}", *FP32, "model.activation_checkpointing=false",
        "precision=fp32", *data, f"dataloaders.image_size={SIZE}", "dataloaders.batch_size=2",
        "eval.num_inference_steps=2", "eval.samples_per_prompt=1", "eval.every_epochs=0", "trainer.grad_accum=1",
        "trainer.log_every=5", "checkpoint.every_steps=0", "checkpoint.archive_every_epochs=0", *overrides,
    )  # fmt: skip


def folder_data(captioned: Path) -> list[str]:
    return [f"dataloaders.root={captioned}", "dataloaders.num_workers=0", "dataloaders.num_eval=2"]


@pytest.fixture(scope="module")
def trained(sdxl: Path, captioned: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, ["experiment=sdxl_lora", f"model.pretrained={sdxl}", *FP32,
                            "model.activation_checkpointing=false", "precision=fp32", *folder_data(captioned),
                            f"dataloaders.image_size={SIZE}", "dataloaders.batch_size=2",
                            "eval.num_inference_steps=2", "eval.samples_per_prompt=1", "eval.every_epochs=0",
                            "trainer.grad_accum=1", "trainer.log_every=5", "checkpoint.archive_every_epochs=0",
                            "epochs=20", "optimizer.lr=3e-3", "loss.cond_dropout=0.1"])  # fmt: skip
    metrics, objects = train(cfg)
    return {"metrics": metrics, **objects, "tmp": tmp}


def fixed_loss(model: SDXLLoRA, batch: dict, seeds: range = range(8)) -> float:
    """The loss on one batch averaged over fixed noise and timesteps (same draws for every model)."""
    loss_fn = SDXLDiffusionLoss()
    values = []
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            values.append(loss_fn(model, batch).loss.item())
    return sum(values) / len(values)


def test_training_lowers_the_loss_and_trains_only_the_lora(trained: dict, sdxl: Path):
    model = trained["model"]
    fresh = SDXLLoRA(str(sdxl), unet_dtype="float32", text_encoder_dtype="float32")
    batch = next(iter(trained["data"].train_loader(CPU, seed=0)))
    torch.manual_seed(0)
    fresh_lora = fresh.state_dict()
    before, after = fixed_loss(fresh, batch), fixed_loss(model, batch)
    assert after < 0.95 * before, (before, after)  # a tiny random UNet: 1.192 -> 1.104 (0.93x) in 60 steps
    base_now = {n: p for n, p in model.named_parameters() if not is_lora_key(n)}
    for name, p in fresh.named_parameters():
        if not is_lora_key(name):
            assert torch.equal(p, base_now[name]), f"frozen weight {name} changed"
    lora = model.state_dict()
    assert lora.keys() == fresh_lora.keys() and all(".lora_" in k for k in lora)
    assert any(not torch.equal(lora[k], fresh_lora[k]) for k in lora if "lora_B" in k)
    state = load_checkpoint(trained["checkpoint"])
    assert state["model"].keys() == lora.keys()  # the checkpoint holds the LoRA, not SDXL


def test_lora_files_load_into_diffusers_with_identical_outputs(trained: dict, sdxl: Path):
    folder = trained["checkpoint"].parent / "last_lora"
    assert (folder / LORA_FILE).is_file() and (folder / KOHYA_FILE).is_file()
    assert lora_file_base(folder / LORA_FILE)["pretrained"] == str(sdxl)
    ours = trained["model"].eval()

    def sample(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return pipe(prompt="a red square", num_inference_steps=2, height=SIZE, width=SIZE, generator=g,
                    output_type="pt").images  # fmt: skip

    expected = sample(ours.pipeline())
    base = sample(StableDiffusionXLPipeline.from_pretrained(str(sdxl)))
    for weights in (folder, folder / KOHYA_FILE):  # diffusers' format, then kohya's through diffusers' converter
        pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
        pipe.load_lora_weights(str(weights))
        assert torch.allclose(sample(pipe), expected, atol=1e-5), weights
    assert not torch.allclose(base, expected, atol=1e-3)  # the LoRA does change the images


def test_resume_continues_exactly_and_refuses_another_rank(make_cfg, sdxl: Path, captioned: Path):
    straight = train(sdxl_cfg(make_cfg, sdxl, folder_data(captioned), "run_name=straight", "max_steps=4"))[1]
    train(sdxl_cfg(make_cfg, sdxl, folder_data(captioned), "run_name=halves", "max_steps=2"))
    resumed = train(sdxl_cfg(make_cfg, sdxl, folder_data(captioned), "run_name=halves", "max_steps=4", "resume=true"))
    a, b = straight["model"].state_dict(), resumed[1]["model"].state_dict()
    assert resumed[1]["trainer"].step == 4 and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"resume refused.*lora_rank: 4 -> 8"):
        train(sdxl_cfg(make_cfg, sdxl, folder_data(captioned), "run_name=halves", "max_steps=6", "resume=true",
                       "model.lora_rank=8"))  # fmt: skip


def test_export_lora_writes_the_trained_weights(trained: dict, tmp_path: Path):
    assert export.main([str(trained["checkpoint"]), "--lora", "--out-dir", str(tmp_path), "--format", "both"]) == 0
    for name in (LORA_FILE, KOHYA_FILE):
        got, want = load_file(tmp_path / name), load_file(trained["checkpoint"].parent / "last_lora" / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_size_conditioning_and_text_match_the_pipeline(sdxl: Path):
    """``cond["sizes"]`` from the data pipeline is the pipeline's own add_time_ids; the text
    encoding is the pipeline's encode_prompt."""
    import random

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
    image = Image.new("RGB", (120, 90), (200, 10, 10))  # landscape: the crop moves along x
    _, _, _, sizes = Preprocess(SIZE, min_crop_scale=0.8, crop_jitter=0.5)(image, random.Random(1))
    h, w, top, left, th, tw = (int(v) for v in sizes)
    assert (h, w, th, tw) == (90, 120, SIZE, SIZE) and top >= 0 and left > 0
    expected = pipe._get_add_time_ids((h, w), (top, left), (th, tw), torch.float32, text_encoder_projection_dim=16)
    assert torch.equal(sizes[None], expected)
    model = SDXLLoRA(str(sdxl), unet_dtype="float32", text_encoder_dtype="float32")
    from adapters.sdxl import SDXLTokenizer

    tokens, _ = SDXLTokenizer(pretrained=str(sdxl))(["a red square", "two cats"])
    embeds, pooled = model.text({"tokens": tokens})
    want_embeds, _, want_pooled, _ = pipe.encode_prompt(["a red square", "two cats"], do_classifier_free_guidance=False)
    assert torch.allclose(embeds, want_embeds, atol=1e-6) and torch.allclose(pooled, want_pooled, atol=1e-6)
    dropped, dropped_pooled = model.text({"tokens": tokens, "drop": torch.tensor([True, False])})
    assert dropped[0].abs().max() == 0 and dropped_pooled[0].abs().max() == 0 and torch.equal(dropped[1], embeds[1])


def test_generate_writes_coco_triplets_with_per_image_seeds(sdxl: Path, trained: dict, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue square\na green square\n")
    common = ["--pretrained", str(sdxl), "--prompt-file", str(prompts), "--shuffle", "--seed", "7", "--steps", "2",
              "--image-size", "64x48", "--scheduler", "euler_a",  # fresh noise each step, from the image's seed
              "--lora", str(trained["checkpoint"].parent / "last_lora")]  # fmt: skip
    assert generate.main([*common, "--num-images", "5", "--batch-size", "2", "--out-dir", str(tmp_path / "a")]) == 0
    assert generate.main([*common, "--num-images", "3", "--batch-size", "1", "--out-dir", str(tmp_path / "b")]) == 0
    order = generate.image_prompts(["a red square", "a blue square", "a green square"], 5, True, 7)
    assert order[3:] == order[:2] and sorted(order[:3]) == ["a blue square", "a green square", "a red square"]
    for i in range(5):
        stem = tmp_path / "a" / f"{i:05d}"
        record = json.loads(stem.with_suffix(".json").read_text())
        assert record["seed"] == 7 + i and record["prompt"] == order[i] == stem.with_suffix(".txt").read_text().strip()
        assert Image.open(stem.with_suffix(".png")).size == (64, 48)
    for i in range(3):  # the same image whatever the batch it was drawn in
        a = np.asarray(Image.open(tmp_path / "a" / f"{i:05d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / f"{i:05d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_a_latent_and_text_cache_trains_and_is_checked(make_cfg, sdxl: Path, captioned: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    args = ["--folder", str(captioned), "--pretrained", str(sdxl), "--out", str(cache), "--image-size", str(SIZE),
            "--batch-size", "3"]  # fmt: skip
    assert precompute_sdxl.main(args) == 0
    assert len(list(cache.glob("*.safetensors"))) == 8
    entry = load_file(cache / "00.safetensors")
    assert entry["latents"].shape == (4, 8, 8) and entry["prompt_embeds"].shape == (77, 32)
    (cache / "03.safetensors").unlink()  # an interrupted run: only the missing entry is encoded again
    counts = precompute_sdxl_cache(captioned, cache, SDXLEncoding(str(sdxl), image_size=SIZE, batch_size=3))
    assert counts["cached_before"] == 7 and counts["written"] == 1
    data = ["dataloaders=sdxl_cache", f"dataloaders.root={cache}"]
    metrics, objects = train(sdxl_cfg(make_cfg, sdxl, data, "run_name=cached", "max_steps=3"))
    assert objects["trainer"].step == 3 and np.isfinite(metrics["train/final_loss"])
    with pytest.raises(UserError, match="text_encoder_lora"):
        train(sdxl_cfg(make_cfg, sdxl, data, "run_name=te", "max_steps=1", "model.text_encoder_lora=true"))
    other = save_tiny_sdxl(tmp_path / "other-sdxl", seed=1)
    with pytest.raises(UserError, match="encoded with other weights"):
        train(sdxl_cfg(make_cfg, other, data, "run_name=other", "max_steps=1"))


def test_text_encoder_lora_trains_both_encoders(make_cfg, sdxl: Path, captioned: Path):
    _, objects = train(sdxl_cfg(make_cfg, sdxl, folder_data(captioned), "run_name=te", "max_steps=2",
                                "model.text_encoder_lora=true", "loss.cond_dropout=0"))  # fmt: skip
    lora = objects["model"].state_dict()
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) and "lora_B" in k and lora[k].abs().sum() > 0 for k in lora), part
    folder = objects["checkpoint"].parent / "last_lora"
    assert any(k.startswith("text_encoder_2.") for k in load_file(folder / LORA_FILE))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
    pipe.load_lora_weights(str(folder))  # diffusers puts the text encoders' LoRA back too
    want = objects["model"].pipeline().encode_prompt("a red square", do_classifier_free_guidance=False)
    got = pipe.encode_prompt("a red square", do_classifier_free_guidance=False)
    assert torch.allclose(got[0], want[0], atol=1e-6) and torch.allclose(got[2], want[2], atol=1e-6)


def test_the_presets_bf16_recipe_trains_on_webdataset_shards(make_cfg, sdxl: Path, shards: Path):  # noqa: F811
    """The preset's dtypes as they are (bf16 UNet and text encoders, fp32 VAE and LoRA, bf16 autocast),
    on WebDataset shards, through training and the pipeline's sampling, which decodes with the fp32 VAE."""
    data = ["dataloaders=webdataset", f"dataloaders.urls='{shards}/{{00000..00001}}.tar'", "dataloaders.num_workers=0",
            "dataloaders.num_eval=2", "dataloaders.shuffle_buffer=8", "dataloaders.wds_tar_size=8"]  # fmt: skip
    cfg = make_cfg("experiment=sdxl_lora", f"model.pretrained={sdxl}", *data, "max_steps=2",
                   f"dataloaders.image_size={SIZE}", "dataloaders.batch_size=2", "eval.num_inference_steps=2",
                   "eval.samples_per_prompt=1", "eval.every_epochs=0", "trainer.grad_accum=1")  # fmt: skip
    metrics, objects = train(cfg)
    model = objects["model"]
    assert model.unet.dtype == model.text_encoder.dtype == torch.bfloat16 and model.vae.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert objects["trainer"].step == 2 and np.isfinite(metrics["train/final_loss"])
    assert (objects["run_dir"] / "grid_final.png").is_file()


def test_min_snr_weights_and_v_prediction(sdxl: Path, tmp_path: Path):
    abar = torch.tensor([0.999, 0.5, 0.01])
    snr = abar / (1 - abar)
    assert torch.allclose(min_snr_weights(abar, 5.0, "epsilon"), torch.clamp(snr, max=5) / snr)
    assert torch.allclose(min_snr_weights(abar, 5.0, "v_prediction"), torch.clamp(snr, max=5) / (snr + 1))
    v_sdxl = save_tiny_sdxl(tmp_path / "v", prediction_type="v_prediction")
    model = SDXLLoRA(str(v_sdxl), unet_dtype="float32", text_encoder_dtype="float32")
    latents = torch.randn(2, 4, 8, 8)
    seen = {}

    def recording_model(x, t, r, cond):
        seen["t"], seen["x"] = t, x
        return torch.zeros_like(x)

    recording_model.noise_scheduler = model.noise_scheduler  # type: ignore[attr-defined]
    recording_model.latents = lambda batch: batch["latents"]  # type: ignore[attr-defined]
    torch.manual_seed(0)
    out = SDXLDiffusionLoss(noise_offset=0.1)(recording_model, {"latents": latents, "cond": {}})  # type: ignore[arg-type]
    torch.manual_seed(0)
    noise = torch.randn_like(latents) + 0.1 * torch.randn(2, 4, 1, 1)  # the offset: one shift per sample and channel
    assert torch.allclose(seen["x"], model.noise_scheduler.add_noise(latents, noise, seen["t"]))
    v = model.noise_scheduler.get_velocity(latents, noise, seen["t"])
    assert torch.allclose(out.loss, (v**2).mean())  # zero prediction: the loss is the v target's power


def test_bad_weights_and_inputs_fail_in_one_line(sdxl: Path, tmp_path: Path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sdxl, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(SDXLWeightsError, match="lacks tokenizer_2"):
        load_components(str(broken))
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(1)}, sd15)
    with pytest.raises(SDXLWeightsError, match="not an SDXL base checkpoint.*v1"):
        load_components(str(sd15))
    other_base = tmp_path / "sd15_lora.safetensors"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora.down.weight": torch.zeros(4, 320), f"{key}.lora.up.weight": torch.zeros(320, 4)},
              other_base)  # fmt: skip
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    base = ["--pretrained", str(sdxl), "--steps", "1", "--image-size", "64", "--out-dir", str(tmp_path / "out")]
    assert generate.main([*base, "--prompt", "x", "--lora", str(other_base)]) == 2
    assert "another base model" in capsys.readouterr().err
    assert generate.main([*base, "--prompt-file", str(empty)]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main([*base, "--prompt", "x", "--image-size", "100x64"])
    assert "multiples of 8" in capsys.readouterr().err
