"""Encode an image data set once into SD-VAE latents, for training in latent space (dataloaders=imagenet_latents).

    python scripts/precompute_latents.py --data imagenet --vae stabilityai/sd-vae-ft-ema --out data/imagenet_latents
    python scripts/precompute_latents.py --data folder --data-override dataloaders.root=PATH \\
        --data-override dataloaders.image_size=256 --vae /path/to/vae --out data/my_latents

Every image of the data set's training split (in file order: center-cropped, never randomly flipped)
and, unless ``--no-flip``, its horizontal flip is encoded to the posterior mean times the VAE's
scaling factor. Shards of ``--shard-size`` images go to ``OUT/shard_00000.safetensors`` ... (tensors
``latents``, ``labels``, ``image_index``, ``flipped``), each written to a temp file and renamed, then
recorded in ``OUT/manifest.json`` (also rewritten atomically). Run it again after a crash and it resumes:
shards the manifest lists as finished are skipped. The writer is ``dataloaders/latents.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.errors import ConfigCompositionException

from dataloaders.latents import EncodeOptions, LatentRecipe, precompute_latents
from training.cli import exit_code, positive_int
from training.compose import CONFIG_DIR, compose_config
from training.errors import UserError
from training.run import build


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the data set from the command line (a composed config), then encode; returns the final manifest."""
    if not (CONFIG_DIR / "dataloaders" / f"{args.data}.yaml").is_file():
        valid = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "dataloaders").glob("*.yaml")))
        raise UserError(f"unknown --data option '{args.data}'; valid options: {valid}")
    overrides = [f"dataloaders={args.data}", *args.data_override]
    try:
        cfg = compose_config([*overrides, "run_name=latents", f"paths.run_dir={args.out}"])
    except ConfigCompositionException as e:
        raise UserError(f"--data-override does not fit dataloaders={args.data}: {str(e).splitlines()[0]}") from e
    recipe = LatentRecipe(args.vae, not args.no_flip, args.dtype, args.shard_size, tuple(overrides))
    options = EncodeOptions(args.batch_size, cfg.dataloaders.num_workers, torch.device(args.device))
    return precompute_latents(build(cfg, "dataloaders"), int(cfg.dataloaders.image_size), recipe, args.out, options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # ValueError: a data set or VAE that does not fit, other settings in --out
    return exit_code(lambda: report(run(args), args.out), (UserError, ValueError))


def report(manifest: dict[str, Any], out: Path) -> int:
    count = sum(s["latents"] for s in manifest["shards"])
    shape = "x".join(map(str, manifest["latent_shape"]))
    shards = len(manifest["shards"])
    print(f"ok: {count} latents ({shape}, scaling {manifest['scaling_factor']:g}) in {shards} shards in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
