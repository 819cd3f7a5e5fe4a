"""Reference statistics for FID/KID: what ``eval.fid.reference`` names, loaded or computed once.

A reference is one of
- a statistics file ``*.npz`` written by ``scripts/fid_stats.py`` (or ``Statistics.save``);
- a name, looked up as ``<stats_dir>/<name>_<mode>.npz`` (``scripts/fid_stats.py cifar10_train``);
- a folder of images: its statistics are computed on first use and cached under ``stats_dir``;
- ``cleanfid:<dataset>:<split>:<resolution>``, clean-fid's published statistics (downloaded
  once when online), e.g. ``cleanfid:cifar10:train:32``, what torchcfm compares against.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.error
from pathlib import Path

import numpy as np
from cleanfid.features import get_reference_statistics

from evaluation.errors import EvaluationError
from evaluation.fid_statistics import Statistics
from evaluation.inception_features import INCEPTION_NAME, FeatureExtractor, FeatureOptions, list_images, resolution_of

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_OPTIONS = FeatureOptions()


def stats_path(stats_dir: Path, name: str, mode: str) -> Path:
    return stats_dir / f"{name}_{mode}.npz"


def folder_statistics(
    folder: Path,
    extractor: FeatureExtractor,
    name: str,
    stats_dir: Path,
    options: FeatureOptions = DEFAULT_OPTIONS,
    keep: int = 10_000,
) -> Statistics:
    """Statistics of every image under ``folder``, saved as ``<stats_dir>/<name>_<mode>.npz``; ``keep``
    features are stored beside them for KID.

    Feature chunks are kept in ``<name>_<mode>.partial/`` until the statistics are written, so an
    interrupted run resumes where it stopped.
    """
    files = list_images(folder)
    res = resolution_of(files, extractor.mode, options.resolution)
    out = stats_path(stats_dir, name, extractor.mode)
    partial = out.with_name(out.stem + ".partial")
    feats = options.extract(files, extractor, cache_dir=partial, desc=f"reference {name}")
    stats = Statistics.from_features(feats, extractor.mode, extractor.name, res, source=str(folder), keep=keep)
    stats.save(out)
    for chunk in partial.iterdir():
        chunk.unlink()
    partial.rmdir()
    log.info("saved reference statistics of %d images (%s, %s) to %s", stats.count, res, extractor.mode, out)
    return stats


def _cleanfid_statistics(spec: str, extractor: FeatureExtractor, stats_dir: Path) -> Statistics:
    """clean-fid's published statistics, converted once into our format (with their KID features)."""
    parts = spec.split(":")
    if len(parts) != 4 or not parts[3].isdigit():
        raise EvaluationError(
            f"reference '{spec}' should read cleanfid:<dataset>:<split>:<resolution>, e.g. cleanfid:cifar10:train:32"
        )
    _, dataset, split, res = parts
    name = f"cleanfid-{dataset}-{split}-{res}"
    cached = stats_path(stats_dir, name, extractor.mode)
    if cached.exists():
        return Statistics.load(cached)
    if extractor.name != INCEPTION_NAME:
        raise EvaluationError(f"clean-fid's statistics are Inception features; the extractor here is {extractor.name}")
    try:
        mu, sigma = get_reference_statistics(dataset, int(res), mode=extractor.mode, split=split)
    except (urllib.error.URLError, OSError) as e:
        raise EvaluationError(
            f"cannot fetch clean-fid's statistics {dataset}/{split}/{res} ({extractor.mode}): {e}; go online once, "
            f"or compute them from local data with scripts/fid_stats.py and pass eval.fid.reference=<name>"
        ) from e
    try:
        feats = get_reference_statistics(dataset, int(res), mode=extractor.mode, split=split, metric="KID")
    except (urllib.error.URLError, OSError) as e:  # clean-fid publishes KID features for fewer sets
        log.warning("clean-fid has no KID features for %s (%s): KID will be skipped", spec, e)
        feats = np.zeros((0, len(mu)), dtype=np.float32)
    stats = Statistics(
        mu=mu,
        sigma=sigma,
        feats=np.asarray(feats, dtype=np.float32),
        count=len(feats),  # 0: not published
        mode=extractor.mode,
        extractor=extractor.name,
        resolution=f"{res}x{res}",
        source=spec,
    )
    stats.save(cached)
    return stats


def reference_statistics(
    spec: str,
    extractor: FeatureExtractor,
    stats_dir: Path,
    options: FeatureOptions = DEFAULT_OPTIONS,
) -> Statistics:
    """The statistics ``spec`` names (see the module docstring); a folder's are computed with ``options``."""
    if spec.startswith("cleanfid:"):
        return _cleanfid_statistics(spec, extractor, stats_dir)
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        return Statistics.load(path)
    if path.is_dir():
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        name = f"folder-{path.resolve().name}-{digest}"
        cached = stats_path(stats_dir, name, extractor.mode)
        if cached.exists():
            stats = Statistics.load(cached)
            count = len(list_images(path))
            if stats.count == count and stats.extractor == extractor.name:
                return stats
            log.info("reference folder %s changed (%d images, cache has %d); recomputing", path, count, stats.count)
        return folder_statistics(path, extractor, name, stats_dir, options)
    if not NAME.match(spec):
        raise EvaluationError(f"reference '{spec}' is not a folder, an .npz file or a statistics name")
    cached = stats_path(stats_dir, spec, extractor.mode)
    if not cached.exists():
        raise EvaluationError(
            f"no reference statistics '{spec}' ({extractor.mode}) in {stats_dir}; compute them with "
            f"`python scripts/fid_stats.py {spec} --mode {extractor.mode}`, or pass a folder of reference images, "
            "an .npz file, or cleanfid:<dataset>:<split>:<res> as eval.fid.reference"
        )
    return Statistics.load(cached)
