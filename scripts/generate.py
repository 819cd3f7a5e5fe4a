"""Generate images with SDXL (+ a LoRA) into a COCO-style folder that is itself a training set.

    python scripts/generate.py --pretrained /models/sdxl-base-1.0 --lora outputs/ckpts/sdxl_lora/run/last_lora \\
        --prompt-file captions.txt --shuffle --num-images 100 --batch-size 4 --image-size 768x512 --out-dir gen

Image i gets prompt ``prompts[i % len(prompts)]`` (the file's lines, shuffled with ``--seed`` if
``--shuffle``; they cycle when more images than prompts are asked for) and seed ``--seed + i``, so
every image is reproducible on its own, whatever the batch it was drawn in. Each batch holds
different prompts and gets a freshly built scheduler (a used one keeps its step state).
Writes ``00000.png``, ``00000.txt`` (the prompt) and ``00000.json`` (prompt, seed, settings).
``--lora`` takes a LoRA file or folder (diffusers or kohya format, loaded by diffusers'
``load_lora_weights``) or a training checkpoint (``last.pt``), whose LoRA weights are extracted first.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)
from torchvision.utils import save_image

from adapters.sdxl import sample
from adapters.sdxl_components import SDXLWeightsError, dtype_of, load_components
from adapters.sdxl_lora import (
    LORA_FILE,
    LoraFileError,
    check_fits,
    lora_base,
    mixed_naming,
    read_safetensors,
    save_peft_naming,
)
from models.fingerprint import weights_fingerprint
from training.cli import exit_code, positive_int
from training.errors import UserError
from training.inference import export_lora_checkpoint

log = logging.getLogger("generate")

SCHEDULERS: dict[str, Any] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
}


def image_size(text: str) -> tuple[int, int]:
    """``768x512`` (width x height) or ``512``; both sides multiples of 8 (the VAE's downsampling)."""
    try:
        sides = [int(s) for s in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r} is not WIDTHxHEIGHT or SIDE, e.g. 768x512") from None
    if len(sides) not in (1, 2) or any(s < 8 for s in sides):
        raise argparse.ArgumentTypeError(f"--image-size {text!r} is not WIDTHxHEIGHT or SIDE, e.g. 768x512")
    width, height = sides[0], sides[-1]
    if width % 8 or height % 8:
        raise argparse.ArgumentTypeError(
            f"--image-size {text}: both sides must be multiples of 8 (the VAE downsamples 8x), "
            f"e.g. {width // 8 * 8}x{height // 8 * 8}"
        )
    return width, height


def read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--prompt-file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {path} holds no prompt; put one prompt per line")
    return prompts


def image_prompts(prompts: list[str], num_images: int, shuffle: bool, seed: int) -> list[str]:
    """One prompt per image: the list (shuffled with ``seed``) repeated as often as needed."""
    order = list(prompts)
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(num_images)]


def lora_weights_file(source: Path, scratch: Path) -> Path:
    """The LoRA ``.safetensors`` to load: the file, the folder's ``pytorch_lora_weights.safetensors``,
    or the weights extracted from a training checkpoint (``.pt``) into ``scratch``."""
    if source.is_dir():
        source = source / LORA_FILE
    if source.suffix == ".pt":
        return export_lora_checkpoint(source, scratch, kohya=False)[0]
    if not source.is_file():
        raise UserError(f"--lora {source} does not exist; pass a LoRA .safetensors, its folder, or a last.pt")
    return source


def checked_lora(
    path: Path, pipe: StableDiffusionXLPipeline, pretrained: str, fingerprint: str | None, scratch: Path
) -> Path:
    """The file to hand to ``load_lora_weights``: ``path``, checked to fit this SDXL, or for a file that
    mixes two key namings (``mixed_naming``: diffusers would drop half of it) a renamed copy in ``scratch``."""
    tensors, metadata = read_safetensors(path)
    if any(k.startswith(("unet.", "text_encoder")) for k in tensors):  # diffusers' format: check shapes
        check_fits(path, tensors, {"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                                   "text_encoder_2": pipe.text_encoder_2})  # fmt: skip
    base = lora_base(metadata)
    if base is not None and base["unet_fingerprint"] != fingerprint:
        log.warning(
            "%s was trained on %s, whose UNet weights differ from %s's: applying it anyway "
            "(LoRAs often transfer to fine-tuned SDXL bases)", path, base["pretrained"], pretrained,
        )  # fmt: skip
    if not mixed_naming(tensors):
        return path
    log.info("%s mixes two LoRA key namings (an older export): loading a copy with them unified", path)
    renamed = scratch / f"unified_{path.name}"
    save_peft_naming(tensors, metadata, renamed)
    return renamed


def load_pipeline(args: argparse.Namespace, scratch: Path) -> StableDiffusionXLPipeline:
    parts = load_components(args.pretrained, args.config)
    # what our LoRA files record: the fp32 weights' fingerprint, so it is taken before the cast
    fingerprint = weights_fingerprint(parts.unet.named_parameters()) if args.lora is not None else None
    pipe = StableDiffusionXLPipeline(**vars(parts))
    dtype = dtype_of(args.dtype)
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.to(dtype)
    if args.lora is not None:
        path = lora_weights_file(Path(args.lora), scratch)
        loaded = checked_lora(path, pipe, args.pretrained, fingerprint, scratch)
        try:
            pipe.load_lora_weights(str(loaded), adapter_name="lora")
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"--lora {path} does not load onto this SDXL ({str(e).splitlines()[0]}); "
                            "was it trained on another base model?") from e  # fmt: skip
        pipe.set_adapters(["lora"], adapter_weights=[args.lora_scale])
    return pipe.to(args.device)


def generate(args: argparse.Namespace) -> list[Path]:
    width, height = args.image_size
    prompts = [args.prompt] if args.prompt is not None else read_prompt_file(Path(args.prompt_file))
    per_image = image_prompts(prompts, args.num_images, args.shuffle, args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = load_pipeline(args, Path(scratch))
    scheduler_config = pipe.scheduler.config
    settings = {"pretrained": args.pretrained, "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
                "scheduler": args.scheduler, "steps": args.steps, "guidance_scale": args.guidance_scale,
                "width": width, "height": height, "dtype": args.dtype}  # fmt: skip
    written = []
    for start in range(0, args.num_images, args.batch_size):
        index = list(range(start, min(args.num_images, start + args.batch_size)))
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(scheduler_config)  # fresh state every batch
        generators = [torch.Generator(args.device).manual_seed(args.seed + i) for i in index]
        images = sample(
            pipe, prompt=[per_image[i] for i in index], generator=generators, height=height, width=width,
            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        )  # fmt: skip
        for i, image in zip(index, images, strict=True):
            stem = out / f"{i:05d}"
            save_image(image, stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(per_image[i] + "\n", encoding="utf-8")
            record = {"index": i, "prompt": per_image[i], "seed": args.seed + i, **settings}
            stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
            written.append(stem.with_suffix(".png"))
        log.info("%d/%d images", index[-1] + 1, args.num_images)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="SDXL: diffusers folder, single .safetensors, or hub id")
    p.add_argument("--config", default=None, help="single-file checkpoints: folder or hub id with the configs")
    p.add_argument("--lora", default=None, help="LoRA .safetensors, its folder, or a training checkpoint last.pt")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (default 1)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt for every image")
    prompts.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--shuffle", action="store_true", help="shuffle the prompt file's lines with --seed")
    p.add_argument("--num-images", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--image-size", type=image_size, default=(1024, 1024), help="WIDTHxHEIGHT or SIDE (default 1024)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="euler")
    p.add_argument("--steps", type=positive_int, default=30, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                   help="UNet and text encoders (the VAE decodes in float32)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return exit_code(lambda: report(generate(args), args.out_dir), (UserError, SDXLWeightsError, LoraFileError))


def report(written: list[Path], out_dir: str) -> int:
    print(f"wrote {len(written)} images (+ .txt, .json) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
