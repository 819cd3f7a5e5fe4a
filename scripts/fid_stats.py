"""Precompute FID/KID reference statistics, cached by name for ``eval.fid.reference=<name>``.

    python scripts/fid_stats.py --list
    python scripts/fid_stats.py cifar10_train --mode legacy_tensorflow     # torchvision CIFAR-10, 32x32
    python scripts/fid_stats.py imagenet256 --root /data/imagenet/train --device cuda
    python scripts/fid_stats.py path/to/images --name faces64 --resolution 64

Registered sets read the data folders the dataloaders configs use (``--root`` overrides);
any folder of images works with ``--name``. Statistics go to ``<stats-dir>/<name>_<mode>.npz``
with the mode, network and resolution they were made with. Features are kept in chunks while
they are computed, so an interrupted run (ImageNet takes a while) resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from evaluation.errors import EvaluationError
from evaluation.fid_reference_stats import NAME, folder_statistics, stats_path
from evaluation.inception_features import MODES, FeatureExtractor, FeatureOptions, load_inception
from evaluation.sample_folder_writer import sample_path, save_png
from training.cli import exit_code
from training.errors import UserError

log = logging.getLogger("fid_stats")


@dataclass(frozen=True)
class Registered:
    root: str
    resolution: int | None
    about: str


REGISTERED = {
    "cifar10_train": Registered("data/cifar10", None, "CIFAR-10 train split (50k, 32x32) via torchvision"),
    "celeba64": Registered("data/celeba/img_align_celeba", 64, "CelebA aligned faces, center-cropped to 64x64"),
    "imagenet256": Registered("data/imagenet/train", 256, "ImageNet train split, center-cropped to 256x256"),
}


def export_cifar10(root: Path, out: Path, download: bool) -> Path:
    """CIFAR-10's train images as PNGs (once; an interrupted export continues), for clean-fid's loader."""
    from torchvision.datasets import CIFAR10

    try:
        data = CIFAR10(str(root), train=True, download=download)
    except RuntimeError as e:
        raise UserError(f"no CIFAR-10 at {root} ({e}); pass --download when online, or --root to where it is") from None
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(data.data):
        path = sample_path(out, i)
        if not path.exists():
            save_png(image, path)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="a registered name (see --list) or a folder of images")
    parser.add_argument("--name", help="cache name for a folder (default: the registered name)")
    parser.add_argument("--root", help="where a registered set's images are (default: its dataloaders path)")
    parser.add_argument("--mode", default="clean", choices=MODES)
    parser.add_argument("--resolution", type=int, help="center-crop and resize every image to this size first")
    parser.add_argument("--inception-path", help="local inception-2015-12-05.pt (default: clean-fid's /tmp copy)")
    parser.add_argument("--stats-dir", default="outputs/fid_stats", help="where statistics are cached")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image loader workers")
    parser.add_argument("--keep", type=int, default=10_000, help="features stored for KID")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10")
    parser.add_argument("--overwrite", action="store_true", help="recompute statistics that already exist")
    parser.add_argument("--list", action="store_true", help="list the registered sets and cached statistics")
    return parser.parse_args(argv)


def list_sets(stats_dir: Path) -> str:
    lines = ["registered sets:"]
    lines += [f"  {name:<14} {r.about} (default root {r.root})" for name, r in REGISTERED.items()]
    cached = sorted(stats_dir.glob("*.npz")) if stats_dir.is_dir() else []
    lines += (
        [f"cached in {stats_dir}:"] + [f"  {p.name}" for p in cached] if cached else [f"nothing cached in {stats_dir}"]
    )
    return "\n".join(lines)


def run(args: argparse.Namespace, extractor: FeatureExtractor | None = None) -> Path:
    """Statistics for ``args``; ``extractor`` replaces Inception (tests)."""
    stats_dir = Path(args.stats_dir)
    if args.source in REGISTERED:
        entry = REGISTERED[args.source]
        name, resolution = args.name or args.source, args.resolution or entry.resolution
        root = Path(args.root or entry.root)
        if args.source == "cifar10_train":
            root = export_cifar10(root, stats_dir / "images" / "cifar10_train", args.download)
    else:
        root, name, resolution = Path(args.source), args.name, args.resolution
        if not root.is_dir():
            raise UserError(f"'{args.source}' is neither a registered set ({', '.join(REGISTERED)}) nor a folder")
        if not name:
            raise UserError(f"name the statistics of {root}: add --name NAME (then eval.fid.reference=NAME)")
    if not NAME.match(name):
        raise UserError(f"--name {name!r} may hold only letters, digits, '_', '.' and '-'")
    out = stats_path(stats_dir, name, args.mode)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to recompute it")
    extractor = extractor or load_inception(args.mode, args.inception_path, args.device)
    options = FeatureOptions(resolution=resolution, batch_size=args.batch_size, num_workers=args.num_workers)
    folder_statistics(root, extractor, name, stats_dir, options, keep=args.keep)
    return out


def main(argv: list[str] | None = None, extractor: FeatureExtractor | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    if args.list:
        print(list_sets(Path(args.stats_dir)))
        return 0
    if not args.source:
        print("error: give a registered set or a folder (see --list)", file=sys.stderr)
        return 2
    return exit_code(lambda: report(run(args, extractor), args.mode), (UserError, EvaluationError))


def report(out: Path, mode: str) -> int:
    print(f"statistics: {out} (use eval.fid.reference={out.name.removesuffix(f'_{mode}.npz')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
