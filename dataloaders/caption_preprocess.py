"""Image preprocessing shared by the captioned-image loaders (a caption folder, WebDataset shards).

Every image goes through the same steps, on PIL images at full resolution:

    to_rgb → trim_white_padding → random_center_crop → resize to image_size (and low_res_size)

Trimming comes before resizing: after a downsample to 64x64 a white border blends into the content
and can no longer be found (the GLIDE fine-tuning notes measured the wrong order).

Images whose crop is smaller than ``image_size`` are upscaled (bicubic) rather than dropped, and
counted as ``upscaled``: LAION shards are already filtered by size through their metadata, and a
caption folder is usually curated, so dropping would silently lose the few small images a user
chose; the count in each epoch's log tells when a data set is mostly upscaled.

The worker side of the loaders turns samples into *records* (one image, its caption, and counts of
what happened on the way) and stacks records into *chunks*; counts ride with the chunks to the main
process, which is how skips counted in DataLoader workers reach the loader's ``stats``.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dataloaders.clip_cache import ClipFound, stack_found

# what PIL raises on a truncated, corrupt or hostile file
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

WHITE = (255, 255, 255)


def mix_seed(*parts: object) -> int:
    """A 63-bit seed that is a function of ``parts`` only (not of PYTHONHASHSEED or the process)."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def load_image(source: bytes | Path) -> Image.Image:
    """Decode an image file (bytes from a shard or a path) fully, so a corrupt file fails here."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB; transparent pixels (RGBA, LA, palette with transparency) become white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def trim_white_padding(image: Image.Image, threshold: int = 245) -> Image.Image:
    """Crop away border rows and columns whose pixels are all near-white (every channel >= threshold).

    Works on the full-resolution RGB image. An all-white image is returned unchanged.
    """
    content = np.any(np.asarray(image, dtype=np.uint8) < threshold, axis=2)  # (H, W): a pixel with some colour
    rows, cols = np.flatnonzero(np.any(content, axis=1)), np.flatnonzero(np.any(content, axis=0))
    if rows.size == 0:
        return image
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return image if box == (0, 0, *image.size) else image.crop(box)


def crop_box(
    size: tuple[int, int], rng: random.Random, min_scale: float = 0.9, jitter: float = 0.1
) -> tuple[int, int, int, int]:
    """A square crop near the centre of a ``(width, height)`` image, as (left, top, right, bottom):
    side = short side x U(min_scale, 1); the crop's centre moves off the image centre by up to
    ``jitter`` x half the slack on each axis.

    ``min_scale=1, jitter=0`` is the plain centre crop (what evaluation uses).
    """
    width, height = size
    side = max(1, round(min(width, height) * rng.uniform(min_scale, 1.0)))
    slack_x, slack_y = width - side, height - side
    left = round(slack_x / 2 * (1 + jitter * rng.uniform(-1.0, 1.0)))
    top = round(slack_y / 2 * (1 + jitter * rng.uniform(-1.0, 1.0)))
    return left, top, left + side, top + side


def random_center_crop(
    image: Image.Image, rng: random.Random, min_scale: float = 0.9, jitter: float = 0.1
) -> Image.Image:
    return image.crop(crop_box(image.size, rng, min_scale, jitter))


def _to_uint8_chw(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


@dataclass(frozen=True)
class Preprocess:
    """trim → crop → resize, to ``image_size`` and, for an upsampler, also to ``low_res_size``.

    Both sizes come from the same full-resolution crop with PIL's bicubic filter, which
    antialiases when it shrinks.
    """

    image_size: int
    low_res_size: int | None = None
    min_crop_scale: float = 0.9
    crop_jitter: float = 0.1
    trim_threshold: int = 245

    def __post_init__(self) -> None:
        if self.low_res_size is not None and not 0 < self.low_res_size < self.image_size:
            raise ValueError(
                f"low_res_size={self.low_res_size} must be below image_size={self.image_size} (e.g. 64 for 256)"
            )
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale={self.min_crop_scale} must lie in (0, 1]; 1 keeps the whole short side")

    def centred(self) -> Preprocess:
        """The deterministic variant for held-out images: full short side, no jitter."""
        return replace(self, min_crop_scale=1.0, crop_jitter=0.0)

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[Tensor, Tensor | None, bool, Tensor]:
        """RGB image → ((3, S, S) uint8, (3, L, L) uint8 or None, whether the crop was upscaled, sizes).

        ``sizes`` (6,) is SDXL's size conditioning: the trimmed image's (height, width), the crop's
        top-left corner (y, x) in output pixels, and the output (height, width).
        """
        trimmed = trim_white_padding(image, self.trim_threshold)
        box = crop_box(trimmed.size, rng, self.min_crop_scale, self.crop_jitter)
        crop = trimmed.crop(box)
        upscaled = crop.width < self.image_size
        size = (self.image_size, self.image_size)
        x = _to_uint8_chw(crop.resize(size, Image.Resampling.BICUBIC))
        scale = self.image_size / crop.width
        sizes = torch.tensor([trimmed.height, trimmed.width, round(box[1] * scale), round(box[0] * scale),
                              self.image_size, self.image_size], dtype=torch.float32)  # fmt: skip
        if self.low_res_size is None:
            return x, None, upscaled, sizes
        low = (self.low_res_size, self.low_res_size)
        return x, _to_uint8_chw(crop.resize(low, Image.Resampling.BICUBIC)), upscaled, sizes


def pick_caption(text: str, rng: random.Random | None) -> str:
    """One caption from a caption file's text: a random non-empty line (the first when ``rng`` is None)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] if rng is None else lines[rng.randrange(len(lines))]


def make_chunk(
    images: list[Tensor], low_res: list[Tensor | None], captions: list[str], counts: Counter, shape: tuple[int, ...],
    sizes: list[Tensor], clip: list[ClipFound] | None = None,
) -> dict:  # fmt: skip
    """Worker-side batch: uint8 images (n, 3, S, S) (n may be 0), low-res or None, captions, counts,
    size conditioning (n, 6) (see ``Preprocess``), and with a CLIP cache what it held for each image
    (``clip_cache.stack_found``; else None).

    A plain dict so the DataLoader can pin its tensors; counts are what the worker saw since its
    previous chunk.
    """
    stacked = torch.stack(images) if images else torch.empty((0, *shape), dtype=torch.uint8)
    lows = None if not low_res or low_res[0] is None else torch.stack(low_res)  # type: ignore[arg-type]
    found = None if clip is None else stack_found(clip)
    stacked_sizes = torch.stack(sizes) if sizes else torch.empty((0, 6))
    return {"images": stacked, "low_res": lows, "captions": captions, "counts": dict(counts), "clip": found,
            "sizes": stacked_sizes}  # fmt: skip


def collate_records(records: list[dict]) -> dict:
    """DataLoader ``collate_fn`` for map-style caption data sets: records → one chunk."""
    counts: Counter = Counter()
    for record in records:
        counts.update(record["counts"])
    images = [r["image"] for r in records]
    shape = tuple(images[0].shape) if images else (3, 0, 0)
    clip = [r["clip"] for r in records] if records and "clip" in records[0] else None
    return make_chunk(images, [r["low_res"] for r in records], [r["caption"] for r in records], counts, shape,
                      [r["sizes"] for r in records], clip)  # fmt: skip
