"""A small fixed feature network standing in for Inception (whose weights cannot be downloaded
here), and image folders for the FID tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.inception_features import FeatureExtractor


def tiny_extractor(mode: str = "legacy_tensorflow", dims: int = 16) -> FeatureExtractor:
    """Mean-pooled 4x4 colour layout through a fixed random projection: smooth in the pixels,
    so noise moves the features, and fixed (seeded), so statistics are reproducible."""
    proj = torch.randn(3 * 4 * 4, dims, generator=torch.Generator().manual_seed(0)) / 4

    def net(x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x / 255, 4).flatten(1)
        return torch.tanh(2 * (pooled - 0.5) @ proj)

    return FeatureExtractor(net, f"test-pool4-proj{dims}", mode)


def digit_images(n: int, seed: int, size: int = 16, noise: float = 0.0) -> np.ndarray:
    """(n, size, size, 3) uint8: scikit-learn's digits tinted by a random colour, plus Gaussian noise."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images / 16.0
    picks = digits[rng.choice(len(digits), n)]
    up = torch.from_numpy(picks).float()[:, None]
    up = F.interpolate(up, size=(size, size), mode="bilinear").numpy()[:, 0]
    colour = rng.uniform(0.3, 1.0, size=(n, 1, 1, 3))
    images = up[..., None] * colour + noise * rng.standard_normal((n, size, size, 3))
    return (images.clip(0, 1) * 255).round().astype(np.uint8)


def write_folder(folder: Path, images: np.ndarray, grey: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(images):
        image = Image.fromarray(array)
        (image.convert("L") if grey else image).save(folder / f"{i:06d}.png")
    return folder
