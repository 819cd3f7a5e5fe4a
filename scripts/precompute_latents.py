"""Encode an image data set once into SD-VAE latents, for training in latent space (dataloaders=imagenet_latents).

    python scripts/precompute_latents.py --data imagenet --vae stabilityai/sd-vae-ft-ema --out data/imagenet_latents
    python scripts/precompute_latents.py --data folder --data-override dataloaders.root=PATH \\
        --data-override dataloaders.image_size=256 --vae /path/to/vae --out data/my_latents

Every image of the data set's training split (in file order: center-cropped, never randomly flipped)
and, unless ``--no-flip``, its horizontal flip is encoded to the posterior mean times the VAE's
scaling factor. Shards of ``--shard-size`` images go to ``OUT/shard_00000.safetensors`` ... (tensors
``latents``, ``labels``, ``image_index``, ``flipped``), each written to a temp file and renamed, then
recorded in ``OUT/manifest.json`` (also rewritten atomically). Run it again after a crash and it resumes:
shards the manifest lists as finished are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.errors import ConfigCompositionException
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataloaders.latents import MANIFEST
from models.vae import SDVAE
from training.cli import positive_int
from training.compose import CONFIG_DIR, compose_config
from training.errors import UserError
from training.train import build

log = logging.getLogger("precompute_latents")

# a resumed run must agree with the manifest on these, or its shards would not fit together
SETTINGS = ("vae", "scaling_factor", "shift_factor", "latent_shape", "image_size", "num_images", "num_classes",
            "flip", "dtype", "shard_size")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Encode a data set's training images (and their horizontal flips) with an SD VAE into "
        "sharded safetensors files plus manifest.json; resumes an interrupted run.",
        epilog="Exit status: 0 on success, 2 on bad input (unknown data set, unusable VAE, other settings in --out).",
    )
    p.add_argument("--data", required=True, help="a configs/dataloaders option: imagenet, folder, celeba, cifar10")
    p.add_argument("--data-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, repeatable: --data-override dataloaders.root=PATH")  # fmt: skip
    p.add_argument("--vae", required=True, help="an AutoencoderKL folder or hub id: stabilityai/sd-vae-ft-ema")
    p.add_argument("--out", required=True, type=Path, help="output folder (shards and manifest.json)")
    p.add_argument("--shard-size", type=positive_int, default=10000, help="images per shard (each with its flip)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per VAE call (twice that with flips)")
    p.add_argument("--no-flip", action="store_true", help="do not add horizontal-flip copies")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def fixed_order_images(data: Any) -> Dataset:
    """All images of a folder-backed data object's training split in file order, without random flips.

    ``data.train`` may be a shuffled ``Subset`` of the folder; its underlying data set, with the
    ``RandomHorizontalFlip`` taken out of its transform, is the deterministic view encoded here.
    """
    train = getattr(data, "train", None)
    if not isinstance(train, Dataset):
        raise UserError(
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
        raise UserError(
            f"{out} holds latents made with other settings ({'; '.join(diffs)}); "
            "pass the original options to resume, or choose another --out"
        )
    manifest["shards"] = [s for s in manifest["shards"] if (out / s["file"]).is_file()]
    return manifest


def encode_shard(
    vae: SDVAE, images: Dataset, indices: range, batch_size: int, num_workers: int, flip: bool, dtype: torch.dtype,
    device: torch.device, progress: tqdm,
) -> dict[str, Tensor]:  # fmt: skip
    """The shard's tensors: latents of every image, then of every flip (same labels and image_index)."""
    loader = DataLoader(Subset(images, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    latents, flips, labels = [], [], []
    for x, y in loader:
        x = x.to(device)
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
    images: Dataset, vae: SDVAE, out: Path, settings: dict[str, Any], batch_size: int, num_workers: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Encode the shards the manifest in ``out`` does not list as finished; returns the final manifest."""
    manifest = start_manifest(out, settings)
    num_images, shard_size = settings["num_images"], settings["shard_size"]
    finished = {s["file"] for s in manifest["shards"]}
    todo = [k for k in range(-(-num_images // shard_size)) if f"shard_{k:05d}.safetensors" not in finished]
    if finished:
        log.info("skipping %d finished shards in %s", len(finished), out)
    done = sum(s["images"] for s in manifest["shards"])
    vae.to(device)
    progress = tqdm(total=num_images, initial=done, unit="img", desc="encoding", dynamic_ncols=True)
    with progress, logging_redirect_tqdm():
        for k in todo:
            indices = range(k * shard_size, min((k + 1) * shard_size, num_images))
            tensors = encode_shard(vae, images, indices, batch_size, num_workers, settings["flip"],
                                   getattr(torch, settings["dtype"]), device, progress)  # fmt: skip
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the data set and the VAE from the command line, then encode; returns the final manifest."""
    if not (CONFIG_DIR / "dataloaders" / f"{args.data}.yaml").is_file():
        valid = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "dataloaders").glob("*.yaml")))
        raise UserError(f"unknown --data option '{args.data}'; valid options: {valid}")
    overrides = [f"dataloaders={args.data}", *args.data_override]
    try:
        cfg = compose_config([*overrides, "run_name=latents", f"paths.run_dir={args.out}"])
    except ConfigCompositionException as e:
        raise UserError(f"--data-override does not fit dataloaders={args.data}: {str(e).splitlines()[0]}") from e
    data = build(cfg, "dataloaders")
    images = fixed_order_images(data)
    try:
        vae = SDVAE(pretrained=args.vae)
    except ValueError as e:
        raise UserError(str(e)) from e
    device = torch.device(args.device)
    probe = vae.to(device).encode(images[0][0][None].to(device))  # the latent shape, known before any shard
    settings = {
        "vae": str(Path(args.vae).resolve()) if Path(args.vae).is_dir() else args.vae,  # what decodes them later
        "scaling_factor": vae.scaling_factor,
        "shift_factor": vae.shift_factor,
        "latent_shape": list(probe.shape[1:]),
        "image_size": int(cfg.dataloaders.image_size),
        "num_images": len(images),  # type: ignore[arg-type]
        "num_classes": int(data.num_classes),
        "flip": not args.no_flip,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "data": overrides,
    }
    return precompute(images, vae, args.out, settings, args.batch_size, cfg.dataloaders.num_workers, device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = sum(s["latents"] for s in manifest["shards"])
    shape = "x".join(map(str, manifest["latent_shape"]))
    shards = len(manifest["shards"])
    print(f"ok: {count} latents ({shape}, scaling {manifest['scaling_factor']:g}) in {shards} shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
