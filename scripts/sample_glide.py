"""Text to image with GLIDE: the 64x64 base model, then optionally the 64->256 upsampler.

    python scripts/sample_glide.py --prompts prompts.txt --base base.pt --vocab-dir /models/glide
    python scripts/sample_glide.py --prompts prompts.txt --base outputs/ckpts/glide_base/ft/last.pt \\
        --upsample upsample.pt --guidance-scale 3 --base-sampler dpmpp_2m --base-respacing 50 --device cuda

``--base``/``--upsample`` take OpenAI's released ``base.pt``/``upsample.pt`` or a DenoisingZoo
checkpoint of a fine-tuning run (its EMA weights). Each prompt of the file (one per line) gets
``--samples`` images; the grid (one row per prompt) goes to ``--out``, the single images beside it.
The upsampler sees the base samples quantised to 8 bits, as GLIDE feeds it, and samples with its
noise scaled by ``--upsample-temp`` (GLIDE's 0.997).

A base with a CLIP adapter (a ``glide_clip_phase*`` run's checkpoint, or ``--adapter`` an adapter file
put on the base weights it was trained on) is conditioned on the CLIP embedding of each prompt, or of
``--clip-image`` (image-conditioned use), from the open_clip model the adapter names with
``--clip-pretrained`` weights:

    python scripts/sample_glide.py --prompts prompts.txt --base base.pt --vocab-dir /models/glide \
        --adapter outputs/ckpts/glide_base_clip/clip2/last.adapter_ema.safetensors --clip-pretrained openai
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from hydra.utils import instantiate
from PIL import Image
from torch import Tensor
from torchvision.utils import save_image

from adapters.clip_encoder import FrozenClip
from adapters.glide_clip import GlideClipUNet, read_adapter_description
from evaluation.clip_score import read_prompts
from evaluation.errors import EvaluationError
from evaluation.sample_generation import sample
from models.glide import GlideUNet
from models.glide_tokenizer import GlideTokenizer
from solvers.diffusion import DiffusionSampler
from training.checkpoint import FORMAT, check_state
from training.cli import exit_code
from training.compose import compose_config
from training.errors import UserError
from training.inference import model_from_state

log = logging.getLogger("sample_glide")

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_a")


def load_glide(path: Path, which: str, device: torch.device, adapter: Path | None = None) -> GlideUNet:
    """OpenAI's released weights (a bare state dict) or a DenoisingZoo checkpoint; with ``adapter``, the
    bare base weights carry that CLIP adapter (the model built as the adapter's description says)."""
    if not path.is_file():
        raise UserError(f"--{which}: no file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)  # read once: released files are 1.5 GB
    if isinstance(state, dict) and state.get("format") == FORMAT:
        if adapter is not None:
            raise UserError(f"--adapter goes with bare base weights; the checkpoint {path} already holds its model")
        model = model_from_state(check_state(state, path, f"--{which} checkpoint"), path)
    else:
        try:
            if adapter is None:
                model = instantiate(compose_config([f"model=glide_{which}", "model.from_scratch=true"]).model)
                model.load_weights(state, str(path))
            else:
                model = adapter_model(adapter)
                model.load_weights(state, str(path))
                model.base_source = str(path)
                model.load_adapter(adapter)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
    if not isinstance(model, GlideUNet) or model.super_res != (which == "upsample"):
        found = (
            type(model).__name__
            if not isinstance(model, GlideUNet)
            else ("an upsampler" if model.super_res else "a base model")
        )
        raise UserError(f"--{which} {path} holds {found}; pass the GLIDE {which} model there")
    return model.to(device).eval()


def adapter_model(adapter: Path) -> GlideClipUNet:
    """A GLIDE base with a fresh CLIP adapter shaped as ``adapter``'s description says (base architecture,
    CLIP model, tokens), ready for the base weights and then the adapter file."""
    meta = read_adapter_description(adapter)
    options = dict(meta["base"]["architecture"])
    options["channel_mult"] = ",".join(map(str, options["channel_mult"]))
    options["attention_resolutions"] = ",".join(map(str, options["attention_resolutions"]))
    return GlideClipUNet(
        from_scratch=True, clip_model_name=meta["clip"]["model_name"], adapter_tokens=meta["adapter"]["tokens"],
        adapter_hidden=meta["adapter"]["hidden"], gate_max=meta["adapter"]["gate_max"],
        adapter_warmup_steps=meta["adapter"]["warmup_steps"], **options,
    )  # fmt: skip


def clip_condition(model: GlideClipUNet, args: argparse.Namespace, prompts: list[str]) -> Tensor:
    """(N, D) CLIP embeddings of the prompts, or of ``--clip-image`` for every sample."""
    clip = FrozenClip(model.clip_model_name, args.clip_pretrained, device=args.device)
    if args.clip_image is None:
        return clip.encode_text(prompts)
    if not args.clip_image.is_file():
        raise UserError(f"--clip-image: no file {args.clip_image}")
    with Image.open(args.clip_image) as image:
        pixels = TF.pil_to_tensor(image.convert("RGB")).float() / 127.5 - 1
    return clip.encode_image(pixels[None]).expand(len(prompts), -1)


def quantise(images: Tensor) -> Tensor:
    """[-1, 1] -> 8-bit levels -> [-1, 1]: what the upsampler saw in training (decoded images)."""
    return ((images + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, required=True, help="one prompt per line")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--upsample", type=Path, help="also upsample to 256x256")
    parser.add_argument(
        "--vocab-dir", help="folder with GLIDE's encoder.json/vocab.bpe or GPT-2's vocab.json/merges.txt"
    )
    parser.add_argument(
        "--adapter", type=Path, help="a CLIP adapter file (*.adapter.safetensors) for bare --base weights"
    )
    parser.add_argument("--clip-pretrained", default="openai", help="the adapter's CLIP weights: open_clip tag or file")
    parser.add_argument("--clip-image", type=Path, help="condition the adapter on this image's CLIP embedding")
    parser.add_argument("--samples", type=int, default=4, help="images per prompt")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--base-sampler", default="ddpm", choices=SAMPLERS)
    parser.add_argument("--base-respacing", default="100")
    parser.add_argument("--upsample-sampler", default="ddpm", choices=SAMPLERS)
    parser.add_argument("--upsample-respacing", default="fast27")
    parser.add_argument("--upsample-temp", type=float, default=0.997)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("glide_samples.png"))
    return parser.parse_args(argv)


@torch.no_grad()
def run(args: argparse.Namespace) -> Tensor:
    device = torch.device(args.device)
    prompts = [p for p in read_prompts(args.prompts) for _ in range(args.samples)]
    base = load_glide(args.base, "base", device, args.adapter)
    tokens, mask = GlideTokenizer(args.vocab_dir, text_ctx=base.text_ctx)(prompts)
    cond = {"tokens": tokens.to(device), "mask": mask.to(device)}
    base_cond = (
        {**cond, "clip": clip_condition(base, args, prompts).to(device)} if isinstance(base, GlideClipUNet) else cond
    )
    g = torch.Generator().manual_seed(args.seed)
    size = base.image_size
    noise = torch.randn(len(prompts), 3, size, size, generator=g).to(device)
    sampler = DiffusionSampler(args.base_sampler, args.base_respacing, noise_schedule="squaredcos_cap_v2")
    images = sample(base, sampler, noise, 0, cond=base_cond, guidance_scale=args.guidance_scale,
                    generator=torch.Generator(device).manual_seed(args.seed))[0].x  # fmt: skip
    del base
    if args.upsample is not None:
        upsampler = load_glide(args.upsample, "upsample", device)
        big = upsampler.image_size
        noise = torch.randn(len(prompts), 3, big, big, generator=g).to(device) * args.upsample_temp
        sampler = DiffusionSampler(args.upsample_sampler, args.upsample_respacing, noise_schedule="linear")
        up_cond = {**cond, "low_res": quantise(images)}
        images = sample(upsampler, sampler, noise, 0, cond=up_cond,
                        generator=torch.Generator(device).manual_seed(args.seed + 1))[0].x  # fmt: skip
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    return exit_code(lambda: save(run(args), args), (UserError, EvaluationError, ValueError))


def save(images: torch.Tensor, args: argparse.Namespace) -> int:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, args.out, nrow=args.samples)
    folder = args.out.with_suffix("")
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, folder / f"{i:06d}.png")
    print(f"wrote {args.out} and {len(images)} images in {folder}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
