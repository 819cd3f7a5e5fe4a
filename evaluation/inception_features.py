"""Image features for FID and KID through clean-fid (Parmar et al. 2022): its Inception network, its
image loading and resizing.

What we add around clean-fid: feature extraction in chunks that resumes after an interruption, the
resolution the features saw (recorded in statistics files, ``fid_statistics``), and errors that name
the fix when the Inception weights or the images are not usable.

Modes: ``clean`` resizes every image to 299x299 with PIL bicubic before the network (clean-fid's
recommendation); ``legacy_tensorflow`` feeds images at their own size and resizes inside the
network like the original TensorFlow FID code. torchcfm and most CIFAR-10 papers report
``legacy_tensorflow`` against the CIFAR-10 train split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.fid import get_files_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.utils import EXTENSIONS
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from evaluation.errors import EvaluationError

log = logging.getLogger(__name__)

MODES = ("clean", "legacy_tensorflow")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_NAME = "inception-2015-12-05"
# clean-fid's own download location (a fixed temp folder); we look there first and download there.
CLEANFID_INCEPTION_DIR = Path("." if platform.system() == "Windows" else "/tmp")
IMAGE_SUFFIXES = {f".{e.lower()}" for e in EXTENSIONS if e.lower() != "npy"}


@dataclass(frozen=True)
class FeatureExtractor:
    """A network from images (B, 3, H, W), floats in [0, 255], to features (B, D).

    ``name`` goes into every statistics file made with it: statistics of different networks
    are never compared.
    """

    net: Callable[[torch.Tensor], torch.Tensor]
    name: str
    mode: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise EvaluationError(f"unknown FID mode '{mode}'; use one of {', '.join(MODES)}")
    return mode


def _inception_file(inception_path: str | Path | None) -> Path:
    """The weights file: the user's path, else clean-fid's temp copy, downloaded when online."""
    if inception_path is not None:
        path = Path(inception_path).expanduser()
        path = path / INCEPTION_FILE if path.is_dir() else path
        if not path.is_file():
            raise EvaluationError(
                f"eval.fid.inception_path={inception_path}: no file there; download {inception_url} and pass its path"
            )
        return path
    path = CLEANFID_INCEPTION_DIR / INCEPTION_FILE
    if path.is_file():
        return path
    log.info("downloading the FID Inception weights from %s to %s", inception_url, path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # a broken download never lands at `path`
        try:
            os.replace(check_download_inception(fpath=tmp), path)
        except (urllib.error.URLError, OSError) as e:
            raise EvaluationError(
                f"no FID Inception weights at {path} and no network to download them ({e}); "
                f"download {inception_url} on a machine that is online and pass eval.fid.inception_path=PATH"
            ) from e
    return path


def load_inception(
    mode: str = "clean", inception_path: str | Path | None = None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """clean-fid's TorchScript Inception (the TensorFlow FID weights); never another network."""
    check_mode(mode)
    path = _inception_file(inception_path)
    folder = path.parent
    if path.name != INCEPTION_FILE:  # clean-fid loads <folder>/inception-2015-12-05.pt; give it that name
        folder = Path(tempfile.mkdtemp(prefix="inception-"))
        (folder / INCEPTION_FILE).symlink_to(path.resolve())
    try:
        net = InceptionV3W(str(folder), download=False, resize_inside=mode == "legacy_tensorflow")
    except RuntimeError as e:
        raise EvaluationError(
            f"{path} is not the FID Inception TorchScript file ({str(e).splitlines()[0]}); download {inception_url}"
        ) from e
    device = torch.device(device)
    return FeatureExtractor(net.to(device).eval(), INCEPTION_NAME, mode, device)


# --- images ------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path."""
    if not folder.is_dir():
        raise EvaluationError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EvaluationError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}; check the path or generate samples first"
        )
    return files


def image_sizes(files: Sequence[Path]) -> Counter[tuple[int, int]]:
    """(width, height) counts from the file headers; an unreadable file is an error that names it."""
    sizes: Counter[tuple[int, int]] = Counter()
    for f in files:
        try:
            with Image.open(f) as im:
                sizes[im.size] += 1
        except (UnidentifiedImageError, OSError) as e:
            raise EvaluationError(f"unreadable image {f} ({type(e).__name__}); remove or replace it") from e
    return sizes


def resolution_of(files: Sequence[Path], mode: str, resolution: int | None) -> str:
    """The resolution the features see, as 'WxH' ('RxR' when images are cropped and resized to
    ``resolution``); mixed sizes are refused where the network would see them unresized."""
    if resolution is not None:
        return f"{resolution}x{resolution}"
    sizes = image_sizes(files)
    if len(sizes) > 1:
        found = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(4))
        if mode == "legacy_tensorflow":
            raise EvaluationError(
                f"images of mixed sizes ({found}); legacy_tensorflow feeds them unresized, so pass a resolution "
                "(center crop and resize) or use mode=clean"
            )
        log.warning("images of mixed sizes (%s); clean mode resizes each to 299x299", found)
        return "mixed"
    (w, h), _ = sizes.most_common(1)[0]
    return f"{w}x{h}"


def center_crop_resize(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """(H, W, 3) uint8 -> (size, size, 3): shorter side to ``size`` (bicubic), then a center crop,
    as reference sets such as ImageNet 256 are prepared."""

    def transform(image: np.ndarray) -> np.ndarray:
        im = Image.fromarray(image)
        scale = size / min(im.size)
        im = im.resize(
            (max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.Resampling.BICUBIC
        )
        left, top = (im.width - size) // 2, (im.height - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))

    return transform


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def features(
    files: Sequence[Path],
    extractor: FeatureExtractor,
    batch_size: int = 64,
    num_workers: int = 0,
    resolution: int | None = None,
    cache_dir: Path | None = None,
    chunk_size: int = 4096,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Features of ``files`` through clean-fid's loader (RGB conversion, resizing for the mode).

    With ``cache_dir``, every finished chunk of ``chunk_size`` images is kept there, so an
    interrupted extraction (an ImageNet reference, 50k samples) resumes at the first missing chunk.
    """
    transform = center_crop_resize(resolution) if resolution is not None else None
    if cache_dir is not None:
        _prepare_chunk_cache(cache_dir, files, extractor, resolution, chunk_size)
    parts = []
    bar = tqdm(total=len(files), desc=desc, unit="img", disable=not progress)
    for k, (start, stop) in enumerate(_chunks(len(files), chunk_size)):
        chunk_path = None if cache_dir is None else cache_dir / f"{k:05d}.npy"
        if chunk_path is not None and chunk_path.exists():
            part = np.load(chunk_path)
        else:
            part = get_files_features(
                [str(f) for f in files[start:stop]],
                extractor.net,
                num_workers=num_workers,
                batch_size=batch_size,
                device=extractor.device,
                mode=extractor.mode,
                custom_image_tranform=transform,
                verbose=False,
            ).astype(np.float32)
            if chunk_path is not None:
                _save_npy(chunk_path, part)
        parts.append(part)
        bar.update(stop - start)
    bar.close()
    return np.concatenate(parts)


@dataclass(frozen=True, kw_only=True)
class FeatureOptions:
    """How a set of images becomes features: center-cropped and resized to ``resolution`` (None: as
    they are), ``batch_size`` at a time through ``num_workers`` loader workers, with a progress bar
    when ``progress``. One object serves the reference statistics and the samples scored against them."""

    resolution: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True

    def extract(
        self, files: Sequence[Path], extractor: FeatureExtractor, cache_dir: Path | None = None, desc: str = "features"
    ) -> np.ndarray:
        """``features`` of ``files`` with these options."""
        return features(
            files,
            extractor,
            self.batch_size,
            self.num_workers,
            self.resolution,
            cache_dir,
            progress=self.progress,
            desc=desc,
        )


def _prepare_chunk_cache(
    cache_dir: Path, files: Sequence[Path], extractor: FeatureExtractor, resolution: int | None, chunk_size: int
) -> None:
    """Keep cached chunks only if they were made from the same files the same way."""
    key = hashlib.sha1(
        json.dumps([[str(f) for f in files], extractor.name, extractor.mode, resolution, chunk_size]).encode()
    ).hexdigest()
    stamp = cache_dir / "key.txt"
    if cache_dir.exists() and (not stamp.exists() or stamp.read_text() != key):
        log.info("feature cache %s was made from other files or settings; starting it over", cache_dir)
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    tmp.replace(path)
