"""Encode a caption folder once with SDXL's VAE and text encoders, for ``dataloaders=sdxl_cache``.

    python scripts/precompute_sdxl.py --folder data/my_dataset --pretrained /models/sdxl-base-1.0 \\
        --out data/my_dataset_sdxl512 --image-size 512 --device cuda

Each captioned ``name.jpg`` gets ``<out>/<name>.safetensors`` with its latents (centre crop at
``--image-size``), its first caption line's text embeddings and its size conditioning; see
``dataloaders/sdxl_cache.py``. Entries are written atomically and existing ones skipped, so a run
stopped at any point resumes; a cache made with other weights or another size is refused.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from adapters.sdxl import SDXLTokenizer, encode_images, encode_prompt, encoder_fingerprints
from adapters.sdxl_components import SDXLWeightsError, dtype_of, load_components
from dataloaders.caption_preprocess import DECODE_ERRORS, Preprocess, load_image, pick_caption
from dataloaders.captions import scan_caption_folder
from dataloaders.sdxl_cache import METADATA, entry_path, read_metadata, write_entry, write_metadata
from training.cli import positive_int
from training.errors import UserError

log = logging.getLogger("precompute_sdxl")


def precompute(args: argparse.Namespace) -> dict[str, int]:
    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        raise UserError(f"--folder {folder} is not a folder of name.jpg + name.txt pairs")
    if args.image_size % 8:
        raise UserError(f"--image-size {args.image_size} must be a multiple of 8 (the VAE downsamples 8x)")
    pairs, _ = scan_caption_folder(folder)
    if not pairs:
        raise UserError(f"no captioned images (name.jpg + name.txt) under {folder}")
    parts = load_components(args.pretrained, args.config)
    metadata = {"pretrained": args.pretrained, "image_size": args.image_size, **encoder_fingerprints(parts)}
    if (out / METADATA).is_file():
        old = read_metadata(out)
        differ = [k for k in metadata if k != "pretrained" and old.get(k) != metadata[k]]
        if differ:
            raise UserError(f"the cache {out} was made with other settings ({', '.join(differ)} differ); "
                            "choose another --out or delete it")  # fmt: skip
    write_metadata(out, metadata)
    device, dtype = torch.device(args.device), dtype_of(args.text_dtype)
    vae = parts.vae.to(device).eval()
    text_encoder, text_encoder_2 = (
        parts.text_encoder.to(device, dtype).eval(),
        parts.text_encoder_2.to(device, dtype).eval(),
    )
    tokenizer = SDXLTokenizer([parts.tokenizer, parts.tokenizer_2])
    preprocess = Preprocess(args.image_size).centred()
    todo = [(p, t) for p, t in pairs if not entry_path(out, p.relative_to(folder)).is_file()]
    counts = {"images": len(pairs), "cached_before": len(pairs) - len(todo), "written": 0, "corrupt": 0}
    torch.manual_seed(args.seed)  # the VAE's latent samples
    for start in tqdm(range(0, len(todo), args.batch_size), desc="encode", unit="batch", disable=None):
        batch, images, sizes, captions = [], [], [], []
        for path, text in todo[start : start + args.batch_size]:
            try:
                x, _, _, size = preprocess(load_image(path), random.Random(0))
            except DECODE_ERRORS as e:
                log.warning("skipping corrupt image %s (%s)", path, e)
                counts["corrupt"] += 1
                continue
            batch.append(path)
            images.append(x)
            sizes.append(size)
            captions.append(pick_caption(text, None))
        if not batch:
            continue
        with torch.no_grad():
            latents = encode_images(vae, torch.stack(images).to(device).float().div(127.5).sub(1))
            tokens, _ = tokenizer(captions)
            embeds, pooled = encode_prompt(text_encoder, text_encoder_2, tokens.to(device))
        for i, path in enumerate(batch):
            tensors = {"latents": latents[i].half(), "prompt_embeds": embeds[i].half(), "pooled": pooled[i].half(),
                       "sizes": sizes[i]}  # fmt: skip
            write_entry(entry_path(out, path.relative_to(folder)), {k: v.cpu() for k, v in tensors.items()},
                        captions[i])  # fmt: skip
            counts["written"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="captioned images: name.jpg + name.txt, any depth")
    p.add_argument("--pretrained", required=True, help="SDXL: diffusers folder, single .safetensors, or hub id")
    p.add_argument("--config", default=None, help="single-file checkpoints: folder or hub id with the configs")
    p.add_argument("--out", required=True, help="the cache folder (dataloaders.root of dataloaders=sdxl_cache)")
    p.add_argument("--image-size", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-dtype", default="float16" if torch.cuda.is_available() else "float32",
                   help="text encoders' dtype (the VAE stays float32)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seeds the VAE's latent samples")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = precompute(args)
    except (UserError, SDXLWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
