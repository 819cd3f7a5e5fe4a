"""Building the SDXL latent and text cache that ``dataloaders.sdxl_cache`` reads (``scripts/precompute_sdxl.py``).

Each captioned ``name.jpg`` gets ``<out>/<name>.safetensors`` with its latents (centre crop at the
image size), its first caption line's text embeddings and its size conditioning, and ``metadata.json``
records the weights (with their fingerprints) and the image size. Entries are written atomically and
existing ones skipped, so a run stopped at any point resumes; a cache made with other weights or
another size is refused. Apart from the reader, so that reading a cache never imports diffusers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adapters.sdxl import SDXLTokenizer, encode_images, encode_prompt, encoder_fingerprints
from adapters.sdxl_components import dtype_of, load_components
from dataloaders.caption_preprocess import DECODE_ERRORS, Preprocess, load_image, pick_caption
from dataloaders.captions import scan_caption_folder
from dataloaders.sdxl_cache import METADATA, entry_path, read_metadata, write_entry, write_metadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SDXLEncoding:
    """What encodes the cache: the SDXL weights (diffusers folder, single .safetensors or hub id; ``config``
    for single files), the image size, images per batch, the device, the text encoders' dtype (the VAE
    stays float32) and the seed of the VAE's latent samples."""

    pretrained: str
    config: str | None = None
    image_size: int = 512
    batch_size: int = 8
    device: str = "cpu"
    text_dtype: str = "float32"
    seed: int = 0


def precompute_sdxl_cache(folder: Path, out: Path, encoding: SDXLEncoding) -> dict[str, int]:
    """Encode the captioned images under ``folder`` that ``out`` lacks; returns the counts of ``images``,
    ``cached_before``, ``written`` and ``corrupt`` (skipped)."""
    if not folder.is_dir():
        raise ValueError(f"--folder {folder} is not a folder of name.jpg + name.txt pairs")
    if encoding.image_size % 8:
        raise ValueError(f"--image-size {encoding.image_size} must be a multiple of 8 (the VAE downsamples 8x)")
    pairs, _ = scan_caption_folder(folder)
    if not pairs:
        raise ValueError(f"no captioned images (name.jpg + name.txt) under {folder}")
    parts = load_components(encoding.pretrained, encoding.config)
    metadata = {"pretrained": encoding.pretrained, "image_size": encoding.image_size, **encoder_fingerprints(parts)}
    if (out / METADATA).is_file():
        old = read_metadata(out)
        differ = [k for k in metadata if k != "pretrained" and old.get(k) != metadata[k]]
        if differ:
            raise ValueError(f"the cache {out} was made with other settings ({', '.join(differ)} differ); "
                             "choose another --out or delete it")  # fmt: skip
    write_metadata(out, metadata)
    device, dtype = torch.device(encoding.device), dtype_of(encoding.text_dtype)
    vae = parts.vae.to(device).eval()
    text_encoder, text_encoder_2 = (
        parts.text_encoder.to(device, dtype).eval(),
        parts.text_encoder_2.to(device, dtype).eval(),
    )
    tokenizer = SDXLTokenizer([parts.tokenizer, parts.tokenizer_2])
    preprocess = Preprocess(encoding.image_size).centred()
    todo = [(p, t) for p, t in pairs if not entry_path(out, p.relative_to(folder)).is_file()]
    counts = {"images": len(pairs), "cached_before": len(pairs) - len(todo), "written": 0, "corrupt": 0}
    torch.manual_seed(encoding.seed)  # the VAE's latent samples
    for start in tqdm(range(0, len(todo), encoding.batch_size), desc="encode", unit="batch", disable=None):
        batch, images, sizes, captions = [], [], [], []
        for path, text in todo[start : start + encoding.batch_size]:
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
