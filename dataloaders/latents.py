"""Precomputed VAE latents as a training set: batches of {"x1": latents (B, C, h, w) float32, "cond":
class labels (B,)}; and their writer (``precompute_latents``, run by ``scripts/precompute_latents.py``).

A latent folder holds ``manifest.json`` and shards ``shard_00000.safetensors`` ... with tensors
``latents`` (N, C, h, w), ``labels`` (N,), ``image_index`` (N,) (the image's position in the encoded
data set) and ``flipped`` (N,) (true for a horizontal-flip copy). Every shard is loaded into host
memory: ImageNet-256 with flips is 2.56M latents of 4x32x32, 8 KB each in float16, about 21 GB
(10.5 GB without flips); batches move to the training device one at a time.

The writer encodes every image of a data set's training split (in file order: center-cropped, never
randomly flipped) and, with ``flip``, its horizontal flip, to the posterior mean times the VAE's
scaling factor. Each shard is written to a temp file and renamed, then recorded in the manifest (also
rewritten atomically); a rerun after a crash resumes: shards the manifest lists as finished are skipped.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from adapters.vae import SDVAE, require_vae  # decodes samples for evaluation; the data set itself needs no VAE
from dataloaders.base import HeldOut, HostTensorLoader

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FIX = "re-run scripts/precompute_latents.py or fix dataloaders.*"
# a resumed run must agree with the manifest on these, or its shards would not fit together
SETTINGS = ("vae", "scaling_factor", "shift_factor", "latent_shape", "image_size", "num_images", "num_classes",
            "flip", "dtype", "shard_size")  # fmt: skip


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


class LatentLoader(HostTensorLoader):
    """``HostTensorLoader`` over host-resident latents: each batch's latents become float32 on ``device``."""

    def on_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        batch["x1"] = batch["x1"].float()
        return batch


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


# ---- the writer ----


@dataclass(frozen=True)
class LatentRecipe:
    """How latents are made: the VAE (an AutoencoderKL folder or hub id), horizontal-flip copies, the
    stored dtype, images per shard, and the data set's config overrides (recorded in the manifest)."""

    vae: str
    flip: bool = True
    dtype: str = "float16"
    shard_size: int = 10000
    data: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncodeOptions:
    """How the encoding runs: images per VAE call (twice that with flips), reader processes, device."""

    batch_size: int = 64
    num_workers: int = 0
    device: torch.device = torch.device("cpu")


def fixed_order_images(data: Any) -> Dataset:
    """All images of a folder-backed data object's training split in file order, without random flips.

    ``data.train`` may be a shuffled ``Subset`` of the folder; its underlying data set, with the
    ``RandomHorizontalFlip`` taken out of its transform, is the deterministic view encoded here.
    """
    train = getattr(data, "train", None)
    if not isinstance(train, Dataset):
        raise ValueError(
            f"{type(data).__name__} is not a folder-backed image set; use --data imagenet, folder, celeba or cifar10"
        )
    images = train.dataset if isinstance(train, Subset) else train
    steps = images.transform.transforms  # type: ignore[attr-defined]
    images.transform = transforms.Compose([s for s in steps if not isinstance(s, transforms.RandomHorizontalFlip)])  # type: ignore[attr-defined]
    return images


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def start_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue: the existing one when its settings agree, a new one when there is none."""
    path = out / MANIFEST
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        manifest = {**settings, "shards": []}
        write_json(path, manifest)
        return manifest
    manifest = json.loads(path.read_text())
    diffs = [f"{key}: {manifest.get(key)} -> {settings[key]}" for key in SETTINGS if manifest.get(key) != settings[key]]
    if diffs:
        raise ValueError(
            f"{out} holds latents made with other settings ({'; '.join(diffs)}); "
            "pass the original options to resume, or choose another --out"
        )
    manifest["shards"] = [s for s in manifest["shards"] if (out / s["file"]).is_file()]
    return manifest


def encode_shard(
    vae: SDVAE, images: Dataset, indices: range, flip: bool, dtype: torch.dtype, options: EncodeOptions,
    progress: tqdm,
) -> dict[str, Tensor]:  # fmt: skip
    """The shard's tensors: latents of every image, then of every flip (same labels and image_index)."""
    loader = DataLoader(Subset(images, indices), batch_size=options.batch_size, shuffle=False,
                        num_workers=options.num_workers)  # fmt: skip
    latents, flips, labels = [], [], []
    for x, y in loader:
        x = x.to(options.device)
        z = vae.encode(torch.cat([x, x.flip(-1)]) if flip else x).to(dtype).cpu()  # (B or 2B, C, h, w)
        latents.append(z[: len(x)])
        flips.append(z[len(x) :])
        labels.append(torch.as_tensor(y, dtype=torch.long))
        progress.update(len(x))
    copies = 2 if flip else 1
    index = torch.arange(indices.start, indices.stop)
    return {
        "latents": torch.cat(latents + flips).contiguous(),
        "labels": torch.cat(labels).repeat(copies),
        "image_index": index.repeat(copies),
        "flipped": torch.arange(copies).repeat_interleave(len(index)).bool(),
    }


def precompute(
    images: Dataset, vae: SDVAE, out: Path, settings: dict[str, Any], options: EncodeOptions
) -> dict[str, Any]:
    """Encode the shards the manifest in ``out`` does not list as finished; returns the final manifest."""
    manifest = start_manifest(out, settings)
    num_images, shard_size = settings["num_images"], settings["shard_size"]
    finished = {s["file"] for s in manifest["shards"]}
    todo = [k for k in range(-(-num_images // shard_size)) if f"shard_{k:05d}.safetensors" not in finished]
    if finished:
        log.info("skipping %d finished shards in %s", len(finished), out)
    done = sum(s["images"] for s in manifest["shards"])
    vae.to(options.device)
    progress = tqdm(total=num_images, initial=done, unit="img", desc="encoding", dynamic_ncols=True)
    with progress, logging_redirect_tqdm():
        for k in todo:
            indices = range(k * shard_size, min((k + 1) * shard_size, num_images))
            tensors = encode_shard(vae, images, indices, settings["flip"], getattr(torch, settings["dtype"]), options,
                                   progress)  # fmt: skip
            name = f"shard_{k:05d}.safetensors"
            tmp = out / f"{name}.tmp"
            save_file(tensors, str(tmp))
            tmp.replace(out / name)
            manifest["shards"] = sorted(
                [*manifest["shards"], {"file": name, "images": len(indices), "latents": len(tensors["latents"])}],
                key=lambda s: s["file"],
            )
            write_json(out / MANIFEST, manifest)
            log.info("wrote %s (%d images, %d latents)", name, len(indices), len(tensors["latents"]))
    return manifest


def precompute_latents(
    data: Any, image_size: int, recipe: LatentRecipe, out: Path, options: EncodeOptions
) -> dict[str, Any]:
    """Encode the training images of ``data`` (a folder-backed image set at ``image_size``) into ``out``,
    resuming what a previous run with the same settings finished; returns the final manifest."""
    images = fixed_order_images(data)
    vae = SDVAE(pretrained=recipe.vae)
    probe = vae.to(options.device).encode(images[0][0][None].to(options.device))  # the latent shape, before any shard
    settings = {
        "vae": str(Path(recipe.vae).resolve()) if Path(recipe.vae).is_dir() else recipe.vae,  # what decodes them later
        "scaling_factor": vae.scaling_factor,
        "shift_factor": vae.shift_factor,
        "latent_shape": list(probe.shape[1:]),
        "image_size": image_size,
        "num_images": len(images),  # type: ignore[arg-type]
        "num_classes": int(data.num_classes),
        "flip": recipe.flip,
        "dtype": recipe.dtype,
        "shard_size": recipe.shard_size,
        "data": list(recipe.data),
    }
    return precompute(images, vae, out, settings, options)
