"""FID, KID and energy distance on Inception features for a model's samples (``eval.fid``).

Samples go to disk first (numbered PNGs, resumable, see ``sample_folder_writer``), then through the same
clean-fid loader as the reference images: generated and reference images are quantised to 8 bits
and resized the same way, as in the papers' protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evaluation.energy_distance import energy_distance
from evaluation.errors import EvaluationError
from evaluation.fid_reference_stats import reference_statistics
from evaluation.fid_statistics import Statistics, fid, kid
from evaluation.inception_features import (
    FeatureExtractor,
    FeatureOptions,
    check_mode,
    load_inception,
    resolution_of,
)
from evaluation.sample_folder_writer import write_samples

log = logging.getLogger(__name__)

Generate = Callable[[int, int], Tensor]


@dataclass(kw_only=True, eq=False)
class FIDEval:
    """Scores ``num_samples`` generated images per NFE budget against ``reference``; off when
    ``num_samples`` is 0.

    ``reference`` is a statistics name, an .npz file, a folder of images or
    ``cleanfid:<dataset>:<split>:<res>`` (see ``fid_reference_stats``). ``extractor`` replaces the
    Inception network only where the weights cannot exist (tests); results made with it carry
    its name and are never compared with Inception statistics.
    """

    num_samples: int = 0
    nfe: list[int] | None = None
    reference: str | None = None
    mode: str = "clean"
    inception_path: str | None = None
    kid: bool = True
    batch_size: int = 250
    feature_batch_size: int = 64
    num_workers: int = 0
    seed: int = 0
    resolution: int | None = None
    energy_distance_samples: int = 2000
    stats_dir: str = "outputs/fid_stats"
    sample_dir: str = "outputs/samples"
    progress: bool = True
    extractor: FeatureExtractor | None = None
    _reference: Statistics | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise EvaluationError(f"eval.fid.num_samples must be >= 0 (0 = off), got {self.num_samples}")
        if self.num_samples and not self.reference:
            raise EvaluationError(
                "eval.fid.num_samples > 0 needs eval.fid.reference (a statistics name, an .npz file, a folder of "
                "images, or cleanfid:<dataset>:<split>:<res>)"
            )
        self.nfe = None if self.nfe is None else list(self.nfe)
        self.mode = check_mode(self.mode)

    @property
    def enabled(self) -> bool:
        return self.num_samples > 0

    @property
    def feature_options(self) -> FeatureOptions:
        """How the reference folder and the samples become features: the same for both."""
        return FeatureOptions(
            resolution=self.resolution,
            batch_size=self.feature_batch_size,
            num_workers=self.num_workers,
            progress=self.progress,
        )

    def load_extractor(self, device: torch.device) -> FeatureExtractor:
        if self.extractor is None:
            self.extractor = load_inception(self.mode, self.inception_path, device)
        return self.extractor

    def reference_stats(self, device: torch.device) -> Statistics:
        if self._reference is None:
            assert self.reference is not None
            self._reference = reference_statistics(
                self.reference, self.load_extractor(device), Path(self.stats_dir), self.feature_options
            )
        return self._reference

    def settings(self) -> dict[str, Any]:
        """What goes into metrics.json beside the scores."""
        return {
            "fid/num_samples": self.num_samples,
            "fid/seed": self.seed,
            "fid/mode": self.mode,
            "fid/reference": self.reference,
        }

    def __call__(
        self, generators: Mapping[str, Generate], settings: dict[str, Any], device: torch.device
    ) -> dict[str, float]:
        """Scores per budget key (``eval/fid@nfe10``, ``eval/kid@nfe10``, ...) for the samples each
        ``generators[key]`` makes; ``settings`` (checkpoint, solver, guidance) label the sample folders."""
        reference = self.reference_stats(device)
        extractor = self.load_extractor(device)
        metrics: dict[str, float] = {}
        for key, generate in generators.items():
            solver = str(settings.get("solver", "solver")).split("(")[0]
            folder = Path(self.sample_dir) / f"{key}_{solver}_w{settings.get('guidance_scale', 1.0):g}_seed{self.seed}"
            files = write_samples(
                folder,
                self.num_samples,
                self.batch_size,
                generate,
                {**settings, "budget": key, "seed": self.seed},
                self.progress,
            )
            feats = self.feature_options.extract(files, extractor, desc=f"features {key}")
            resolution = resolution_of(files[:1], self.mode, self.resolution)  # one model: one sample size
            stats = Statistics.from_features(feats, self.mode, extractor.name, resolution, source=str(folder))
            metrics[f"eval/fid@{key}"] = fid(stats, reference)
            if self.kid and len(reference.feats) > 1:
                metrics[f"eval/kid@{key}"] = kid(stats, reference, seed=self.seed)
            elif self.kid:
                log.warning("reference %s stores no features: KID skipped", self.reference)
            if self.energy_distance_samples and len(reference.feats) > 1:
                n = self.energy_distance_samples
                metrics[f"eval/energy_distance_features@{key}"] = energy_distance(
                    torch.from_numpy(feats[:n]).to(device), torch.from_numpy(reference.feats[:n]).to(device)
                )
            log.info("%s: FID %.4g over %d samples in %s", key, metrics[f"eval/fid@{key}"], len(files), folder)
        return metrics
