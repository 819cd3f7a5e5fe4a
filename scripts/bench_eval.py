"""Evaluation throughput: seconds per 1000 images for features and sample generation, and the
overhead of our FID wrapper over calling clean-fid directly.

    python scripts/bench_eval.py                          # CPU, 128 images, 3 repeats (~3 min on 2 cores)
    python scripts/bench_eval.py --device cuda --images 2000
    python scripts/bench_eval.py --images 32 --repeats 1  # smoke run

Three tables:

``features``: ``evaluation.inception_features.features`` over a folder of 32x32 PNGs (CIFAR-sized, made from
scikit-learn's digits) in both modes. The network is clean-fid's Inception when its weights are
at ``--inception-path`` or clean-fid's /tmp copy; without them (offline), torchvision's
Inception-v3 with random weights stands in: the same architecture and input size, so the same
cost, and the table says which one ran. Only timings come from it, never a score.

``overhead``: FID between two folders, ours (reference statistics computed and saved, features of
the samples, ``fid``) against clean-fid's ``compute_fid(fdir1, fdir2, custom_feat_extractor=...)``
with the same network, batch size and loader settings. Ours also scans the image headers and
writes a statistics file. Run side by side, alternating which goes first; the ratio is the
median over repeats of ours / clean-fid, target <= 1.05. A cheap network (a pooled random
projection) is timed too: there the fixed costs of the wrapper weigh most, an upper bound.

``sampling``: ``write_samples`` with ``ImageSampler`` (a UNet of the digits experiment's size,
random weights, Euler) at NFE 1 and 10: seconds per 1000 samples, and how much of it is PNG writing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from cleanfid.fid import compute_fid
from PIL import Image

from evaluation.errors import EvaluationError
from evaluation.fid_reference_stats import reference_statistics
from evaluation.fid_statistics import Statistics, fid
from evaluation.inception_features import FeatureExtractor, FeatureOptions, features, list_images, load_inception
from evaluation.sample_folder_writer import write_samples
from evaluation.sample_generation import ImageSampler
from models.unet import UNet
from solvers.fixed_step import Euler
from training.benchmark import markdown_table, median, side_by_side, time_repeats, timed, verdict

log = logging.getLogger("bench_eval")


def random_inception(mode: str, device: torch.device) -> FeatureExtractor:
    """Inception-v3 (torchvision) with random weights: the FID network's cost, not its features."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    net = net.eval().to(device)

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        if mode == "legacy_tensorflow":  # clean-fid resizes inside the network in this mode
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return net((x - 128) / 128)

    return FeatureExtractor(forward, "inception-v3-random-weights", mode, device)


def pooled_projection(mode: str, device: torch.device) -> FeatureExtractor:
    proj = torch.randn(3 * 8 * 8, 64, generator=torch.Generator().manual_seed(0)).to(device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.adaptive_avg_pool2d(x / 255, 8).flatten(1) @ proj)

    return FeatureExtractor(forward, "pooled-projection", mode, device)


def network(mode: str, device: torch.device, inception_path: str | None) -> tuple[FeatureExtractor, str]:
    try:
        return load_inception(mode, inception_path, device), "clean-fid Inception (real weights)"
    except EvaluationError:
        return random_inception(mode, device), "Inception-v3, random weights (weights not available here)"


def make_folder(folder: Path, n: int, seed: int) -> Path:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = torch.from_numpy(load_digits().images / 16.0).float()[:, None]
    picks = F.interpolate(digits[rng.choice(len(digits), n)], size=(32, 32), mode="bilinear")[:, 0].numpy()
    colour = rng.uniform(0.3, 1.0, size=(n, 1, 1, 3))
    images = (picks[..., None] * colour * 255).round().astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


def ours_fid(reference: Path, samples: Path, extractor: FeatureExtractor, batch_size: int, stats_dir: Path) -> float:
    shutil.rmtree(stats_dir, ignore_errors=True)  # computed from the folder every time, as on first use
    options = FeatureOptions(batch_size=batch_size, progress=False)
    ref = reference_statistics(str(reference), extractor, stats_dir, options)
    feats = options.extract(list_images(samples), extractor)
    return fid(Statistics.from_features(feats, extractor.mode, extractor.name, ref.resolution), ref)


def cleanfid_fid(reference: Path, samples: Path, extractor: FeatureExtractor, batch_size: int) -> float:
    return float(
        compute_fid(
            str(samples),
            str(reference),
            mode=extractor.mode,
            custom_feat_extractor=extractor.net,
            num_workers=0,
            batch_size=batch_size,
            device=extractor.device,
            verbose=False,
        )
    )


def bench_features(args: argparse.Namespace, folder: Path, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    files = list_images(folder)
    for mode in ("clean", "legacy_tensorflow"):
        extractor, label = network(mode, device, args.inception_path)
        run = partial(features, files, extractor, args.batch_size, progress=False)
        features(files[: args.batch_size], extractor, args.batch_size, progress=False)  # warm-up
        seconds, _ = time_repeats(run, args.repeats)
        rows.append({"mode": mode, "network": label, "s_per_1000": 1000 * median(seconds) / len(files)})
    return rows


def bench_overhead(
    args: argparse.Namespace, reference: Path, samples: Path, device: torch.device, tmp: Path
) -> list[dict[str, Any]]:
    rows = []
    for extractor in (network("clean", device, args.inception_path)[0], pooled_projection("clean", device)):
        ours = partial(ours_fid, reference, samples, extractor, args.batch_size, tmp / "stats")
        theirs = partial(cleanfid_fid, reference, samples, extractor, args.batch_size)
        times, scores = side_by_side({"ours": ours, "theirs": theirs}, args.repeats)  # alternating which goes first
        rows.append(
            {
                "network": extractor.name,
                "ours_s": median(times["ours"]),
                "cleanfid_s": median(times["theirs"]),
                "ratio": median(a / b for a, b in zip(times["ours"], times["theirs"], strict=True)),
                "same_fid": bool(np.allclose(scores["ours"], scores["theirs"], rtol=1e-6, atol=1e-6)),
            }
        )
    return rows


def generate_all(sampler: ImageSampler, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        sampler(start, min(n, start + batch))


def bench_sampling(args: argparse.Namespace, device: torch.device, tmp: Path) -> list[dict[str, Any]]:
    model = UNet(
        in_channels=1,
        image_size=16,
        channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[8],
        norm_groups=8,
        dropout=0.0,
    )
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for nfe in (1, 10):
        sampler = ImageSampler(model, Euler(), nfe, (1, 16, 16), device, seed=0)
        sampler(0, 8)  # warm-up
        write, generate = [], []
        for r in range(args.repeats):
            folder = tmp / f"samples_{nfe}_{r}"
            write.append(timed(partial(write_samples, folder, args.images, args.sample_batch, sampler, {}, False))[0])
            generate.append(timed(partial(generate_all, sampler, args.images, args.sample_batch))[0])
        w, g = median(write), median(generate)
        rows.append(
            {"nfe": nfe, "params": params, "s_per_1000": 1000 * w / args.images, "png_share": max(0.0, (w - g) / w)}
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="images per folder and samples per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="feature batch size")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inception-path", help="local inception-2015-12-05.pt (default: clean-fid's /tmp copy)")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # timing runs: small-sample FID warnings are expected
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        reference = make_folder(tmp / "reference", args.images, seed=0)
        samples = make_folder(tmp / "samples", args.images, seed=1)
        results = {
            "features": bench_features(args, reference, device),
            "overhead": bench_overhead(args, reference, samples, device, tmp),
            "sampling": bench_sampling(args, device, tmp),
        }
    print(f"\nfeatures ({args.images} 32x32 PNGs, batch {args.batch_size}, {args.device})")
    rows = [[row["mode"], row["network"], f"{row['s_per_1000']:.1f}"] for row in results["features"]]
    print(markdown_table(["mode", "network", "s / 1000 images"], rows, "llr"))
    print(f"\nFID of two folders of {args.images} images: ours / clean-fid's compute_fid (median of {args.repeats})")
    rows = [[row["network"], f"{row['ours_s']:.2f}", f"{row['cleanfid_s']:.2f}", f"{row['ratio']:.3f}",
             row["same_fid"], verdict(row["ratio"], 1.05)] for row in results["overhead"]]  # fmt: skip
    print(markdown_table(["network", "ours s", "clean-fid s", "ratio", "same FID", "target <= 1.05"], rows, "lrrrll"))
    params = results["sampling"][0]["params"] / 1e6
    print(f"\nsample generation to PNG (UNet 16x16x1, {params:.2f}M params, Euler, batch {args.sample_batch})")
    rows = [[row["nfe"], f"{row['s_per_1000']:.2f}", f"{100 * row['png_share']:.0f}%"] for row in results["sampling"]]
    print(markdown_table(["NFE", "s / 1000 samples", "PNG writing share"], rows, "rrr"))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
