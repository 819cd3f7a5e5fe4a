"""Encode a caption folder once with SDXL's VAE and text encoders, for ``dataloaders=sdxl_cache``.

    python scripts/precompute_sdxl.py --folder data/my_dataset --pretrained /models/sdxl-base-1.0 \\
        --out data/my_dataset_sdxl512 --image-size 512 --device cuda

Each captioned ``name.jpg`` gets ``<out>/<name>.safetensors`` with its latents (centre crop at
``--image-size``), its first caption line's text embeddings and its size conditioning; see
``dataloaders/sdxl_cache.py``. Entries are written atomically and existing ones skipped, so a run
stopped at any point resumes; a cache made with other weights or another size is refused. The writer
is ``dataloaders/sdxl_cache_writer.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from dataloaders.sdxl_cache_writer import SDXLEncoding, precompute_sdxl_cache
from training.cli import exit_code, positive_int


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, type=Path, help="captioned images: name.jpg + name.txt, any depth")
    p.add_argument("--pretrained", required=True, help="SDXL: diffusers folder, single .safetensors, or hub id")
    p.add_argument("--config", default=None, help="single-file checkpoints: folder or hub id with the configs")
    p.add_argument("--out", required=True, type=Path,
                   help="the cache folder (dataloaders.root of dataloaders=sdxl_cache)")  # fmt: skip
    p.add_argument("--image-size", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-dtype", default="float16" if torch.cuda.is_available() else "float32",
                   help="text encoders' dtype (the VAE stays float32)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seeds the VAE's latent samples")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    encoding = SDXLEncoding(args.pretrained, args.config, args.image_size, args.batch_size, args.device,
                            args.text_dtype, args.seed)  # fmt: skip
    # ValueError: bad input or unusable SDXL weights (SDXLWeightsError)
    return exit_code(lambda: report(precompute_sdxl_cache(args.folder, args.out, encoding)), (ValueError,))


def report(counts: dict[str, int]) -> int:
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
