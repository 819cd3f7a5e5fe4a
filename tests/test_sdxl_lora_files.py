"""Every LoRA file this project writes loads exactly in diffusers, for every ``lora_target``.

The modes come from ``adapters/sdxl_lora.UNET_TARGETS``, so a new mode is covered without a test edit.
For each, a LoRA on the UNet and both text encoders is trained one step through ``train(cfg)`` on the
tiny SDXL (tests/sdxl_helpers.py), exported by ``scripts/export.py --lora --format both``, and loaded by
diffusers' own ``load_lora_weights`` into a fresh pipeline with no project code on the loading side:
the UNet's and the text encoders' outputs must equal the trained model's to the last bit (fp32), the
LoRA must move them, and no LoRA layer may be dropped. ``scripts/generate.py --lora`` must draw the
trained model's image from either file, and from a file in the mixed naming older exports wrote.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torchvision.utils import save_image

from adapters.sdxl import sample
from adapters.sdxl_lora import KOHYA_FILE, LORA_FILE, UNET_TARGETS
from models.fingerprint import with_digest
from scripts import export, generate
from tests.test_sdxl_lora import SIZE, captioned, folder_data, sdxl  # noqa: F401  (fixtures)
from training.train import train

PROMPT = "a red square"
FORMATS = {"diffusers": LORA_FILE, "kohya": KOHYA_FILE}


@pytest.fixture(scope="module", params=list(UNET_TARGETS))
def exported(
    request: pytest.FixtureRequest,
    sdxl: Path,  # noqa: F811
    captioned: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """One training step of a LoRA on ``lora_target=<mode>`` and both text encoders (a large learning
    rate, so every lora_B leaves zero), and its files written by ``scripts/export.py``."""
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp(f"lora-{request.param}")
    cfg = tiny_config(tmp, ["experiment=sdxl_lora", f"model.pretrained={sdxl}", "model.unet_dtype=float32",
                            "model.text_encoder_dtype=float32", "model.activation_checkpointing=false",
                            "precision=fp32", *folder_data(captioned), f"dataloaders.image_size={SIZE}",
                            "dataloaders.batch_size=2", "eval.every_epochs=0", "eval.num_inference_steps=2",
                            "eval.samples_per_prompt=1", "trainer.grad_accum=1",
                            "checkpoint.archive_every_epochs=0", "max_steps=1", "optimizer.lr=0.05",
                            f"model.lora_target={request.param}", "model.text_encoder_lora=true",
                            "loss.cond_dropout=0"])  # fmt: skip
    _, objects = train(cfg)
    out = tmp / "exported"
    assert export.main([str(objects["checkpoint"]), "--lora", "--out-dir", str(out), "--format", "both"]) == 0
    return {"model": objects["model"].eval(), "out": out}


def unet_inputs(unet: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        },
    }


@torch.no_grad()
def outputs(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The UNet's prediction on fixed inputs and the text encoders' embeddings (per token, pooled)."""
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    return {"unet": pipe.unet(**unet_inputs(pipe.unet)).sample, "text_encoders": embeds, "pooled": pooled}


def lora_layers(module: torch.nn.Module) -> set[str]:
    return {name.split(".lora_A.")[0] for name, _ in module.named_parameters() if ".lora_A." in name}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_lora_file_loads_exactly_in_diffusers(exported: dict, sdxl: Path, fmt: str, capfd):  # noqa: F811
    model = exported["model"]
    want = outputs(model.pipeline())
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl))  # diffusers alone from here on
    base = outputs(pipe)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(exported["out"] / FORMATS[fmt]))
    logged = capfd.readouterr().err.lower()
    got = outputs(pipe)
    for part in ("unet", "text_encoder", "text_encoder_2"):  # every trained layer arrived
        assert lora_layers(getattr(pipe, part)) == lora_layers(getattr(model, part)), part
    for name, value in got.items():
        assert (value - want[name]).abs().max().item() == 0, (fmt, name)  # exact in fp32
        assert (base[name] - want[name]).abs().max().item() > 1e-2, name  # and the LoRA does move it
    dropped = [str(w.message) for w in caught if "unexpected" in str(w.message) or "inconsistency" in str(w.message)]
    assert not dropped and "unexpected keys" not in logged and "missing keys" not in logged, (dropped, logged)


def older_export(file: Path, out: Path) -> Path:
    """The diffusers file as this project wrote it before the namings were unified: the UNet keys through
    ``convert_state_dict_to_diffusers``, which renames attention layers only (mixed, for ``lora_target=all``)."""
    with safe_open(str(file), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    unet = convert_state_dict_to_diffusers({k: v for k, v in tensors.items() if k.startswith("unet.")})
    older = {**{k: v for k, v in tensors.items() if not k.startswith("unet.")}, **unet}
    save_file(older, out, metadata=with_digest(older, metadata))
    return out


def test_generate_draws_the_trained_models_image_from_every_file(exported: dict, sdxl: Path, tmp_path: Path):  # noqa: F811
    model = exported["model"]
    g = [torch.Generator().manual_seed(5)]
    images = sample(model.pipeline(), prompt=[PROMPT], generator=g, height=SIZE, width=SIZE, num_inference_steps=2,
                    guidance_scale=5.0)  # fmt: skip
    save_image(images[0], tmp_path / "want.png")
    want = np.asarray(Image.open(tmp_path / "want.png"))
    files = [exported["out"] / LORA_FILE, exported["out"] / KOHYA_FILE]
    files.append(older_export(files[0], tmp_path / "older.safetensors"))
    for i, file in enumerate(files):
        out = tmp_path / f"gen{i}"
        argv = ["--pretrained", str(sdxl), "--prompt", PROMPT, "--seed", "5", "--steps", "2", "--image-size",
                str(SIZE), "--lora", str(file), "--out-dir", str(out), "--dtype", "float32"]  # fmt: skip
        assert generate.main(argv) == 0
        got = np.asarray(Image.open(out / "00000.png"))
        assert np.array_equal(got, want), (file.name, np.abs(got.astype(int) - want).max())
