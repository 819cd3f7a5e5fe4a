"""Precomputed VAE latents (``scripts/precompute_latents.py``) as a training set: batches of
{"x1": latents (B, C, h, w) float32, "cond": class labels (B,)}.

A latent folder holds ``manifest.json`` and shards ``shard_00000.safetensors`` ... with tensors
``latents`` (N, C, h, w), ``labels`` (N,), ``image_index`` (N,) (the image's position in the encoded
data set) and ``flipped`` (N,) (true for a horizontal-flip copy). Every shard is loaded into host
memory: ImageNet-256 with flips is 2.56M latents of 4x32x32, 8 KB each in float16, about 21 GB
(10.5 GB without flips); batches move to the training device one at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from dataloaders.base import HeldOut, TensorLoader
from models.vae import SDVAE, require_vae  # decodes samples for evaluation; the data set itself needs no VAE

MANIFEST = "manifest.json"
FIX = "re-run scripts/precompute_latents.py or fix dataloaders.*"


def read_manifest(root: Path) -> dict[str, Any]:
    """The folder's manifest; a missing one says how to make the latents."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in dataloaders.root={root}; make the latents once with "
            f"python scripts/precompute_latents.py --data imagenet --vae stabilityai/sd-vae-ft-ema --out {root}"
        )
    return json.loads(path.read_text())


def describe(shape: list[int] | tuple[int, ...], scaling_factor: float | None) -> str:
    scaling = "any scaling" if scaling_factor is None else f"scaling {scaling_factor:g}"
    return f"{'x'.join(str(s) for s in shape)} with {scaling}"


def load_split(path: Path, manifest: dict[str, Any], held_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train latents, train labels, eval latents as float32, eval labels): every latent of an image not
    ``held_out`` trains; held-out images give their unflipped latent to the eval set.

    The training tensor is allocated once and filled shard by shard: peak memory is the set plus one shard.
    """
    copies = 2 if manifest["flip"] else 1
    total = sum(int(shard["latents"]) for shard in manifest["shards"])
    dtype = getattr(torch, manifest["dtype"])
    train = torch.empty(total - copies * int(held_out.sum()), *manifest["latent_shape"], dtype=dtype)
    train_labels = torch.empty(len(train), dtype=torch.long)
    eval_latents, eval_labels, filled = [], [], 0
    for shard in manifest["shards"]:
        tensors = load_file(path / shard["file"])
        held = held_out[tensors["image_index"]]
        n = int((~held).sum())
        train[filled : filled + n] = tensors["latents"][~held]
        train_labels[filled : filled + n] = tensors["labels"][~held]
        filled += n
        pick = held & ~tensors["flipped"]
        eval_latents.append(tensors["latents"][pick])
        eval_labels.append(tensors["labels"][pick])
    return train, train_labels, torch.cat(eval_latents).float(), torch.cat(eval_labels)


class LatentLoader(TensorLoader):
    """``TensorLoader`` over host-resident latents: each batch moves to ``device``, latents as float32."""

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, seed: int, device: torch.device):
        super().__init__(tensors, batch_size, seed)
        self.device = device

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for batch in super().__iter__():
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            batch["x1"] = batch["x1"].float()
            yield batch


class LatentData:
    """The latents under ``root``, checked against what the model is built for.

    ``channels`` x ``image_size`` x ``image_size`` (the latent side, e.g. 256 / 8 = 32) must match the
    latents, and ``expected_scaling_factor`` (null: not checked) the scaling they were made with, else a
    one-line ``ValueError``. ``num_eval`` images chosen with ``data_seed`` are held out: their unflipped
    latents form ``eval_set`` and neither copy trains. ``vae`` decodes latents for evaluation
    (``decode``); null means the VAE named in the manifest, the one that encoded them.
    """

    kind = "latent"  # what it serves (training/compat.py checks models, losses and evaluators against it)

    def __init__(
        self,
        root: str,
        expected_scaling_factor: float | None = None,
        image_size: int = 32,
        channels: int = 4,
        num_classes: int = 0,
        num_eval: int = 1000,
        batch_size: int = 256,
        data_seed: int = 0,
        vae: str | None = None,
    ):
        path = Path(root).expanduser()
        manifest = read_manifest(path)
        self._validate(path, manifest, (channels, image_size, image_size), expected_scaling_factor, num_classes)
        num_images = int(manifest["num_images"])
        if not 0 < num_eval < num_images:
            raise ValueError(
                f"dataloaders.num_eval={num_eval} must be in [1, {num_images - 1}] for {num_images} images"
            )
        held_out = torch.zeros(num_images, dtype=torch.bool)
        held_out[torch.randperm(num_images, generator=torch.Generator().manual_seed(data_seed))[:num_eval]] = True
        self.train_set, self.train_labels, self.eval_set, self.eval_labels = load_split(path, manifest, held_out)
        self.shape: tuple[int, ...] = (channels, image_size, image_size)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.scaling_factor = float(manifest["scaling_factor"])
        self.vae = vae or manifest["vae"]
        require_vae(self.vae)  # the VAE loads only to decode, at evaluation: find a missing one now, not then
        self._decoder: SDVAE | None = None

    @staticmethod
    def _validate(
        path: Path, manifest: dict[str, Any], shape: tuple[int, ...], scaling: float | None, num_classes: int
    ) -> None:
        have = describe(manifest["latent_shape"], manifest["scaling_factor"])
        if tuple(manifest["latent_shape"]) != shape or (
            scaling is not None and not math.isclose(scaling, manifest["scaling_factor"], rel_tol=1e-6)
        ):
            raise ValueError(f"latents in {path} are {have} but the model expects {describe(shape, scaling)}; {FIX}")
        done = sum(int(shard["images"]) for shard in manifest["shards"])
        missing = [shard["file"] for shard in manifest["shards"] if not (path / shard["file"]).is_file()]
        if done != manifest["num_images"] or missing:
            raise ValueError(
                f"latents in {path} are incomplete ({done} of {manifest['num_images']} images encoded"
                f"{', missing ' + missing[0] if missing else ''}); finish them with scripts/precompute_latents.py "
                "(it resumes)"
            )
        if num_classes and num_classes != manifest["num_classes"]:
            raise ValueError(
                f"latents in {path} have {manifest['num_classes']} classes but dataloaders.num_classes={num_classes}; "
                f"set it to {manifest['num_classes']} or 0"
            )

    def train_loader(self, device: torch.device, seed: int) -> LatentLoader:
        tensors = {"x1": self.train_set}
        if self.num_classes:
            tensors["cond"] = self.train_labels
        return LatentLoader(tensors, self.batch_size, seed, device)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], on the latents' device.

        The VAE loads on first use (evaluation only), and must have the latents' scaling factor.
        """
        if self._decoder is None:
            decoder = SDVAE(pretrained=self.vae)
            if not math.isclose(decoder.scaling_factor, self.scaling_factor, rel_tol=1e-6):
                raise ValueError(
                    f"VAE {self.vae} has scaling {decoder.scaling_factor:g} but the latents were made with "
                    f"{self.scaling_factor:g}; set dataloaders.vae to the VAE that encoded them"
                )
            self._decoder = decoder
        return self._decoder.to(latents.device).decode(latents)

    def eval_inputs(self) -> HeldOut:
        return HeldOut(self.eval_set, self.num_classes, decode=self.decode)
