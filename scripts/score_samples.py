"""Score a folder of generated images: FID/KID against a reference, CLIP score against prompts.

    python scripts/score_samples.py outputs/samples/run/nfe2_euler_w1_seed0 --reference cifar10_train \\
        --mode legacy_tensorflow
    python scripts/score_samples.py samples/ --prompts prompts.txt --clip-pretrained /models/clip.bin

For samples made by any tool. The CLIP score pairs sample ``NNNNNN.png`` with prompt NNNNNN % P
of the prompt file (one prompt per line), the order DenoisingZoo writes text-conditioned samples
in. Scores are printed and written to ``--out`` (default ``<folder>/scores.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from evaluation.clip_score import CLIPScore, load_clip_scorer, read_prompts
from evaluation.errors import EvaluationError
from evaluation.fid_reference_stats import reference_statistics
from evaluation.fid_statistics import Statistics, fid, kid
from evaluation.inception_features import (
    MODES,
    FeatureExtractor,
    FeatureOptions,
    list_images,
    load_inception,
    resolution_of,
)

log = logging.getLogger("score_samples")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the images to score")
    parser.add_argument("--reference", help="statistics name, .npz, folder of images or cleanfid:<set>:<split>:<res>")
    parser.add_argument("--mode", default="clean", choices=MODES)
    parser.add_argument("--resolution", type=int, help="center-crop and resize images to this size first")
    parser.add_argument("--inception-path", help="local inception-2015-12-05.pt (default: clean-fid's /tmp copy)")
    parser.add_argument("--stats-dir", default="outputs/fid_stats")
    parser.add_argument("--prompts", type=Path, help="prompt file for the CLIP score")
    parser.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="open_clip model name")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag or local weights file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", type=Path, help="scores JSON (default <folder>/scores.json)")
    return parser.parse_args(argv)


def score(
    args: argparse.Namespace, extractor: FeatureExtractor | None = None, clip: CLIPScore | None = None
) -> dict[str, Any]:
    """The scores ``args`` ask for; ``extractor`` and ``clip`` replace the pretrained networks (tests)."""
    if not args.reference and not args.prompts:
        raise EvaluationError("nothing to score: pass --reference (FID/KID) and/or --prompts (CLIP score)")
    files = list_images(args.folder)
    scores: dict[str, Any] = {"folder": str(args.folder), "num_images": len(files)}
    if args.reference:
        extractor = extractor or load_inception(args.mode, args.inception_path, args.device)
        options = FeatureOptions(resolution=args.resolution, batch_size=args.batch_size, num_workers=args.num_workers)
        reference = reference_statistics(args.reference, extractor, Path(args.stats_dir), options)
        feats = options.extract(files, extractor)
        res = resolution_of(files, extractor.mode, args.resolution)  # checked against the reference's by fid()
        stats = Statistics.from_features(feats, extractor.mode, extractor.name, res, source=str(args.folder))
        scores.update({"fid": fid(stats, reference), "fid/mode": extractor.mode, "fid/reference": args.reference})
        if len(reference.feats) > 1:
            scores["kid"] = kid(stats, reference)
    if args.prompts:
        clip = clip or load_clip_scorer(args.clip_model, args.clip_pretrained, args.device)
        value, count = clip.score_folder(args.folder, read_prompts(args.prompts), args.batch_size)
        scores.update({"clip_score": value, "clip/num_images": count, "clip/model": args.clip_model})
    return scores


def main(
    argv: list[str] | None = None, extractor: FeatureExtractor | None = None, clip: CLIPScore | None = None
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    try:
        scores = score(args, extractor, clip)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.folder / "scores.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    for key, value in scores.items():
        print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
