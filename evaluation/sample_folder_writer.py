"""Samples for evaluation as a folder of numbered PNGs, written batch by batch, resumable.

50k samples never sit in memory, and an interrupted evaluation continues at the first missing
file. ``samples.json`` in the folder records what produced the samples (checkpoint, solver, NFE,
guidance scale, seed); samples from other settings are never mixed in.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from evaluation.errors import EvaluationError

log = logging.getLogger(__name__)

MANIFEST = "samples.json"
SAMPLE = re.compile(r"^\d{6}\.png$")


def sample_path(folder: Path, i: int) -> Path:
    return folder / f"{i:06d}.png"


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8, rounded like torchvision's save_image."""
    return images.float().clamp(0, 1).mul(255).add(0.5).floor().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    """Atomic, so a file that exists is a complete image."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def _open_folder(folder: Path, settings: dict[str, Any]) -> None:
    """Create the folder, or check that the samples already there were made with ``settings``."""
    manifest = folder / MANIFEST
    ours = [p for p in folder.iterdir() if SAMPLE.match(p.name)] if folder.exists() else []
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if previous == settings:
            return
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        log.warning("%s holds samples of other settings (%s); replacing them", folder, ", ".join(changed))
        for p in ours:
            p.unlink()
    elif folder.exists() and any(folder.iterdir()):
        raise EvaluationError(
            f"{folder} is not empty and has no {MANIFEST}, so it was not written by DenoisingZoo; "
            "pick another eval.fid.sample_dir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def write_samples(
    folder: Path,
    num_samples: int,
    batch_size: int,
    generate: Callable[[int, int], Tensor],
    settings: dict[str, Any],
    progress: bool = True,
) -> list[Path]:
    """Files ``000000.png ...`` for samples ``[0, num_samples)``; ``generate(start, stop)`` returns
    those samples as (B, C, H, W) in [0, 1] and must give sample i the same way whatever the batch.

    Generation starts at the first missing index, so asking for 50k after 10k reuses the 10k.
    """
    _open_folder(folder, settings)
    present = {p.name for p in folder.iterdir() if SAMPLE.match(p.name)}
    done = 0
    while done < num_samples and sample_path(folder, done).name in present:
        done += 1
    if done:
        log.info("%s: %d of %d samples already there, resuming", folder, done, num_samples)
    with tqdm(total=num_samples, initial=done, desc=f"sampling {folder.name}", unit="img", disable=not progress) as bar:
        for start in range(done, num_samples, batch_size):
            stop = min(num_samples, start + batch_size)
            for i, array in enumerate(to_uint8(generate(start, stop)), start=start):
                save_png(array, sample_path(folder, i))
            bar.update(stop - start)
    return [sample_path(folder, i) for i in range(num_samples)]
