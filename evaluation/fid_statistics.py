"""Statistics of image features and the distances between two of them: FID (Fréchet distance of
the Gaussians) and KID (Kernel Inception Distance), clean-fid's formulas.

A statistics file records how its features were made (mode, feature network, resolution), so unlike
statistics are refused instead of compared.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cleanfid.fid import frechet_distance, kernel_distance

from evaluation.errors import EvaluationError

log = logging.getLogger(__name__)


@dataclass
class Statistics:
    """Mean and covariance of features (for FID) and a subset of the features (for KID).

    ``mode``, ``extractor`` and ``resolution`` say how the features were made; two statistics are
    compared only if they agree on all three.
    """

    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray
    count: int
    mode: str
    extractor: str
    resolution: str
    source: str = ""

    @classmethod
    def from_features(
        cls, feats: np.ndarray, mode: str, extractor: str, resolution: str, source: str = "", keep: int = 10_000
    ) -> Statistics:
        """``keep`` features (a fixed random subset) are stored for KID; all of them make mu, sigma."""
        feats = np.asarray(feats, dtype=np.float64)
        if len(feats) < 2:
            raise EvaluationError(f"{len(feats)} image(s) from {source or 'the input'}: FID needs at least 2")
        kept = feats
        if len(feats) > keep:
            kept = feats[np.sort(np.random.default_rng(0).choice(len(feats), keep, replace=False))]
        return cls(
            mu=feats.mean(axis=0),
            sigma=np.cov(feats, rowvar=False),
            feats=kept.astype(np.float32),
            count=len(feats),
            mode=mode,
            extractor=extractor,
            resolution=resolution,
            source=source,
        )

    def save(self, path: Path) -> None:
        """Atomic: an interrupted save never leaves a half-written statistics file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: getattr(self, k) for k in ("count", "mode", "extractor", "resolution", "source")}
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, feats=self.feats, meta=json.dumps(meta))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Statistics:
        if not path.is_file():
            raise EvaluationError(f"no statistics file {path}")
        try:
            with np.load(path) as data:
                meta = json.loads(str(data["meta"]))
                return cls(mu=data["mu"], sigma=data["sigma"], feats=data["feats"], **meta)
        except (KeyError, ValueError, OSError) as e:
            raise EvaluationError(
                f"{path} is not a DenoisingZoo statistics file ({e}); make it with scripts/fid_stats.py"
            ) from e

    def check_comparable(self, other: Statistics) -> None:
        for key in ("extractor", "mode", "resolution"):
            a, b = getattr(self, key), getattr(other, key)
            if a != b and "mixed" not in (a, b):
                raise EvaluationError(
                    f"statistics differ in {key}: {a} ({self.source or 'samples'}) vs {b} "
                    f"({other.source or 'reference'}); "
                    f"recompute the reference with scripts/fid_stats.py using {key} {a}"
                )


def _warn_if_few(stats: Statistics) -> None:
    dims = len(stats.mu)
    if 0 < stats.count < dims:  # 0: count unknown (published statistics)
        log.warning(
            "%d images from %s for %d-dim features: the covariance is rank-deficient and the FID estimate is "
            "biased upward; compare only like-sized runs (50000 samples is the standard)",
            stats.count,
            stats.source or "the samples",
            dims,
        )


def fid(samples: Statistics, reference: Statistics) -> float:
    """Fréchet distance between the two Gaussians (clean-fid's stable formula)."""
    samples.check_comparable(reference)
    _warn_if_few(samples)
    _warn_if_few(reference)
    return float(frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma))


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """clean-fid's KID draws subsets from numpy's global generator; fix it, and restore it after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kid(samples: Statistics, reference: Statistics, seed: int = 0, num_subsets: int = 100) -> float:
    """Kernel Inception Distance (unbiased MMD², cubic kernel), clean-fid's subset estimator with a fixed seed."""
    samples.check_comparable(reference)
    if len(samples.feats) < 2 or len(reference.feats) < 2:
        raise EvaluationError("KID needs stored features on both sides; recompute the statistics with fid_stats.py")
    with _numpy_seed(seed):
        return float(kernel_distance(samples.feats, reference.feats, num_subsets=num_subsets))
