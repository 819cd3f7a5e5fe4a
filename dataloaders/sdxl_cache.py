"""A cache of SDXL's VAE latents and text embeddings, so LoRA training runs neither the VAE encoder nor
the two text encoders (``scripts/precompute_sdxl.py`` writes it).

Layout: ``<cache>/metadata.json`` (the weights it was encoded with, their fingerprints, the image
size) and one ``<relative path of the image>.safetensors`` per image: ``latents`` (4, S/8, S/8),
``prompt_embeds`` (77, 2048), ``pooled`` (1280) in fp16 and ``sizes`` (6) (see
``caption_preprocess.Preprocess``), with the caption in the file's metadata. Images are centre
crops and captions first lines: a cache trades crop and caption augmentation for speed, as
diffusers' SDXL scripts do. Files are written atomically, so an interrupted run resumes where it
stopped and never leaves a half file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dataloaders.base import HeldOut, HostTensorLoader

log = logging.getLogger(__name__)

METADATA = "metadata.json"
FIELDS = ("latents", "prompt_embeds", "pooled", "sizes")


def entry_path(cache: Path, relative: Path) -> Path:
    return cache / relative.with_suffix(".safetensors")


def write_entry(path: Path, tensors: dict[str, Tensor], caption: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"caption": caption})
    os.replace(tmp, path)


def read_entry(path: Path) -> tuple[dict[str, Tensor], str]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in FIELDS}, (f.metadata() or {}).get("caption", "")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"SDXL cache entry {path} is unreadable ({e}); delete it and rerun precompute_sdxl.py") from e


def write_metadata(cache: Path, metadata: dict[str, Any]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{METADATA}.tmp"
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / METADATA)


def read_metadata(cache: Path) -> dict[str, Any]:
    path = cache / METADATA
    if not path.is_file():
        raise ValueError(
            f"{cache} is not an SDXL cache (no {METADATA}); build it with "
            "python scripts/precompute_sdxl.py --folder IMAGES --pretrained SDXL --out CACHE"
        )
    return json.loads(path.read_text())


class SDXLCacheLoader(HostTensorLoader):
    """Shuffled batches of cached entries: ``{"latents", "cond": {"prompt_embeds", "pooled", "sizes"}}``."""

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, seed: int, device: torch.device):
        super().__init__({"x1": tensors["latents"], **{k: tensors[k] for k in FIELDS[1:]}}, batch_size, seed, device)

    def on_device(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        moved = {k: v.float() for k, v in batch.items()}
        return {"latents": moved.pop("x1"), "cond": moved}


class SDXLCacheData:
    """The entries of an SDXL cache (``scripts/precompute_sdxl.py``) as training data.

    ``image_size`` must be the size the cache was encoded at. ``num_eval`` entries chosen with
    ``seed`` are held out (``eval_captions`` for prompt grids). The whole cache is read into host
    memory (about 0.3 MB an image at 512 px), which suits LoRA data sets of up to a few thousand images.
    ``tokenizer`` is unused (the prompts are encoded already); the caption data sets' option is kept
    so that one experiment config composes with either.
    """

    kind = "sdxl_cache"  # what it serves (training/compat.py checks models, losses and evaluators against it)

    text_cached = True  # the text encoders never run: a text-encoder LoRA cannot train on this data

    def __init__(
        self,
        root: str,
        image_size: int = 512,
        batch_size: int = 1,
        num_eval: int = 4,
        seed: int = 0,
        test_run: int | None = None,
        channels: int = 3,
        num_classes: int = 0,
        tokenizer: Any = None,
    ):
        self.root = Path(root).expanduser()
        self.metadata = read_metadata(self.root)
        if self.metadata["image_size"] != image_size:
            raise ValueError(
                f"the SDXL cache {root} was encoded at {self.metadata['image_size']} px, not "
                f"dataloaders.image_size={image_size}; set it to {self.metadata['image_size']} or rebuild the cache"
            )
        files = sorted(p for p in self.root.rglob("*.safetensors") if not p.name.startswith("."))
        if len(files) < 2:
            raise ValueError(f"the SDXL cache {root} holds {len(files)} entries; run precompute_sdxl.py on more images")
        entries = [read_entry(p) for p in files]
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = min(num_eval, len(files) - 1)
        held, train = perm[:n_eval], sorted(perm[n_eval:])
        if test_run is not None:
            train = train[:test_run]
        if len(train) < batch_size:
            raise ValueError(f"{len(train)} cached training images but batch_size={batch_size}; lower batch_size")
        self.train = {k: torch.stack([entries[i][0][k] for i in train]) for k in FIELDS}
        self.eval_captions = [entries[i][1] for i in sorted(held)]
        self.eval_set = torch.stack([entries[i][0]["latents"] for i in sorted(held)]).float()
        self.shape: tuple[int, ...] = (3, image_size, image_size)
        self.num_classes = 0
        self.batch_size = batch_size
        log.info("SDXL cache %s: %d training entries, %d held out (encoded with %s)", root, len(train), n_eval,
                 self.metadata["pretrained"])  # fmt: skip

    def train_loader(self, device: torch.device, seed: int) -> SDXLCacheLoader:
        return SDXLCacheLoader(self.train, self.batch_size, seed, device)

    def eval_inputs(self) -> HeldOut:
        return HeldOut(self.eval_set, self.num_classes, captions=self.eval_captions)
