"""Encode a caption folder or WebDataset shards once with a CLIP model, for ``dataloaders.clip_cache``;
with ``--validate``, check such a cache against its data and the CLIP model a run will use.

    python scripts/precompute_clip.py --folder data/pokemon --model ViT-L-14 --pretrained openai
    python scripts/precompute_clip.py --shards '/data/laion/{00000..00099}.tar' --cache-dir data/clip_cache \\
        --model ViT-L-14 --pretrained openai --device cuda --batch-size 512 --workers 8
    python scripts/precompute_clip.py --validate --folder data/pokemon --model ViT-L-14 --pretrained openai

A folder gets ``name.clip`` beside each captioned ``name.jpg``; shards get
``<cache-dir>/<model>/<shard stem>.safetensors`` and ``metadata.json`` (see ``dataloaders/clip_cache.py``).
``--source text`` embeds each caption file's first line, ``--source image`` the image (white border
trimmed, shortest side resized and centre-cropped to the model's input). Embeddings are unit-norm,
stored float16. DataLoader workers read (and decode) while the main process encodes. Every file is
written to a temp file and renamed, so a run stopped at any point resumes: existing ``.clip`` files
and shards ``metadata.json`` lists are skipped (``--overwrite`` redoes them). The writer is
``dataloaders/clip_cache_writer.py``.

``--validate`` checks every embedding's model name, weights (with ``--pretrained``), source (with
``--source``) and dimension (the model's architecture, no weights read), NaN/inf and unit norm; for a
folder, that every captioned image has its ``.clip``; for shards, that ``metadata.json`` lists every
shard, that each shard file's embeddings match its keys and the listed count, and that every sample
with a caption (or an image, for image embeddings) has an embedding. It prints a report
(``dataloaders/clip_cache_check.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from adapters.clip_encoder import FrozenClip
from adapters.open_clip_loader import architecture_dim
from dataloaders.clip_cache import CacheInfo, shard_cache_root, stored_pretrained
from dataloaders.clip_cache_check import Expected, Report, validate_folder, validate_shards
from dataloaders.clip_cache_writer import ReadOptions, precompute_folder, precompute_shards
from training.cli import exit_code, positive_int

log = logging.getLogger("precompute_clip")

MODEL, PRETRAINED, SOURCE = "ViT-L-14", "openai", "text"  # what a precompute uses when not given


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 on success (with --validate: the cache is sound), 1 when shards could not be read "
        "(with --validate: anything is wrong), 2 on bad input.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--folder", type=Path, help="a caption folder (name.jpg + name.txt, any depth)")
    target.add_argument("--shards", help="WebDataset shards: a brace pattern, a glob or a folder of .tar files")
    p.add_argument("--cache-dir", type=Path, help="with --shards: the cache root (dataloaders.clip_cache.dir)")
    p.add_argument("--validate", action="store_true", help="check the cache instead of building it")
    p.add_argument("--model", help=f"an open_clip model name (default {MODEL}; required with --validate)")
    p.add_argument("--pretrained", help=f"an open_clip pretrained tag or a local weights file (default {PRETRAINED}; "
                   "unchecked by --validate when left out)")  # fmt: skip
    p.add_argument("--source", choices=("text", "image"), help=f"embed the captions or the images (default {SOURCE}; "
                   "unchecked by --validate when left out)")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per CLIP call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reader processes")
    p.add_argument("--overwrite", action="store_true", help="redo existing .clip files and cached shards")
    p.add_argument("--image-key", default="jpg;png;webp", help="shard image extensions, first present wins")
    p.add_argument("--caption-key", default="txt", help="shard caption extension")
    args = p.parse_args(argv)
    if args.validate:
        if args.model is None:
            p.error("--validate needs --model (the open_clip model the run uses: clip_cache.model_name)")
        if args.shards is not None and args.cache_dir is None:
            p.error("--shards needs --cache-dir")
        return args
    if args.shards is not None and args.cache_dir is None:
        p.error("--shards needs --cache-dir (where the embeddings go; dataloaders.clip_cache.dir)")
    args.model = args.model or MODEL
    args.pretrained = args.pretrained or PRETRAINED
    args.source = args.source or SOURCE
    return args


def run(args: argparse.Namespace) -> tuple[Counter, CacheInfo]:
    """Checks the input, then loads the model (only when there is work) and encodes."""
    info = CacheInfo(args.model, stored_pretrained(args.pretrained), architecture_dim(args.model), args.source)
    options = ReadOptions(args.batch_size, args.workers, args.overwrite, tuple(args.image_key.split(";")),
                          args.caption_key)  # fmt: skip

    def load() -> FrozenClip:
        return FrozenClip(args.model, args.pretrained, args.device)

    if args.folder is not None:
        return precompute_folder(args.folder, info, load, options), info
    return precompute_shards(args.shards, args.cache_dir, info, load, options), info


def summary(args: argparse.Namespace, counts: Counter, info: CacheInfo) -> str:
    what = f"{info.model_name} {info.dim}-d {info.source} embeddings"
    if args.folder is not None:
        return (
            f"ok: {counts['todo']} {what} written, {counts['done']} already there, "
            f"{counts['corrupt']} corrupt images skipped, in {args.folder}"
        )
    root = shard_cache_root(args.cache_dir, info.model_name)
    status = "ok" if not counts["failed_shards"] else f"{counts['failed_shards']} shards failed"
    return (
        f"{status}: {counts['written']} {what} written for {counts['shards']} shards, {counts['cached_shards']} "
        f"shards already cached, {counts['skipped']} samples skipped (corrupt), {counts['without_source']} "
        f"without a {'caption' if info.source == 'text' else 'image'}, in {root}"
    )


def validate(args: argparse.Namespace) -> Report:
    expected = Expected(args.model, args.pretrained, args.source)
    if args.folder is not None:
        return validate_folder(args.folder, expected)
    return validate_shards(args.shards, args.cache_dir, expected, tuple(args.image_key.split(";")), args.caption_key)


def precompute_command(args: argparse.Namespace) -> int:
    counts, info = run(args)
    print(summary(args, counts, info))
    return 1 if counts["failed_shards"] else 0


def validate_command(args: argparse.Namespace) -> int:
    report = validate(args)
    print(report.render("images" if args.folder is not None else "shards"))
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # ValueError: a folder, shards or cache that does not fit, an unknown model
    return exit_code(lambda: validate_command(args) if args.validate else precompute_command(args), (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
