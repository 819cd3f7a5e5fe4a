"""Checking a CLIP embedding cache (``dataloaders.clip_cache``) against its data and the CLIP model a run
will use (``scripts/precompute_clip.py --validate``).

Checks every embedding's model name, weights (when given), source (when given) and dimension (the
model's architecture, no weights read), NaN/inf and unit norm; for a folder, that every captioned
image has its ``.clip``; for shards, that ``metadata.json`` lists every shard, that each shard file's
embeddings match its keys and the listed count, and that every sample with a caption (or an image,
for image embeddings) has an embedding. The ``Report`` lists problems (the cache is wrong) and notes.
"""

from __future__ import annotations

import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from torch import Tensor

from adapters.open_clip_loader import architecture_dim
from dataloaders.caption_preprocess import DECODE_ERRORS, load_image
from dataloaders.captions import CAPTIONED_SUFFIXES, scan_caption_folder
from dataloaders.clip_cache import (
    CLIP_SUFFIX,
    METADATA,
    CacheInfo,
    clip_path,
    mismatch,
    read_clip_file,
    read_metadata,
    read_shard_file,
    shard_cache_root,
    shard_file,
    shard_stem,
)
from dataloaders.webdataset import resolve_shards

NORM_TOLERANCE = 1e-2  # float16 storage keeps norms within ~1e-3 of 1
EXAMPLES = 5


@dataclass
class Report:
    """Problems (each kind with where it was seen) and notes (worth knowing, not wrong)."""

    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def failed(self) -> bool:
        return any(self.problems.values())

    def render(self, what: str) -> str:
        lines = [f"checked {self.checked} {what}"]
        for title, table in (("problem", self.problems), ("note", self.notes)):
            for kind, places in table.items():
                if not places:
                    continue
                more = f" (+{len(places) - EXAMPLES} more)" if len(places) > EXAMPLES else ""
                lines.append(f"{title}: {kind}: {len(places)}{more}")
                lines += [f"    {place}" for place in places[:EXAMPLES]]
        total = sum(map(len, self.problems.values()))
        lines.append(f"FAILED: {total} problems" if total else "ok: the cache is complete and fits the model")
        return "\n".join(lines)


@dataclass(frozen=True)
class Expected:
    """The CLIP model a run will use: its open_clip name, and the weights and source to check (None:
    unchecked, each file's own value is taken)."""

    model: str
    pretrained: str | None = None
    source: str | None = None


class Checker:
    """Compares what each file was built with to the configured model; unchecked fields take the file's value."""

    def __init__(self, model: str, pretrained: str | None, source: str | None, report: Report):
        self.model, self.pretrained, self.source = model, pretrained, source
        self.dim = architecture_dim(model)
        self.report = report

    def info(self, found: CacheInfo, where: str | Path) -> bool:
        expected = CacheInfo(self.model, self.pretrained or found.pretrained, self.dim, self.source or found.source)
        reason = mismatch(found, expected, where)
        if reason:
            self.report.problems["built for another model"].append(reason)
        return reason is None

    def embeddings(self, x: Tensor, where: str) -> None:
        """(N, D) or (D,) embeddings: width, NaN/inf, unit norm."""
        if x.shape[-1] != self.dim:
            self.report.problems["wrong dimension"].append(f"{where}: {x.shape[-1]}-d, {self.model} is {self.dim}-d")
            return
        x = x.float().reshape(-1, self.dim)
        finite = torch.isfinite(x).all(dim=-1)
        if not finite.all():
            self.report.problems["NaN or inf"].append(f"{where}: {int((~finite).sum())} rows")
        norms = x[finite].norm(dim=-1)
        off = (norms - 1).abs() > NORM_TOLERANCE
        if off.any():
            example = f"e.g. norm {norms[off][0]:.3f}"
            self.report.problems["not unit-norm"].append(f"{where}: {int(off.sum())} rows, {example}")


def validate_folder(folder: Path, expected: Expected) -> Report:
    """The ``.clip`` files beside the captioned images under ``folder``."""
    root = folder.expanduser()
    if not root.is_dir():
        raise ValueError(f"--folder {folder} is not a folder")
    pairs, _ = scan_caption_folder(root)
    report = Report()
    checker = Checker(expected.model, expected.pretrained, expected.source, report)
    for image, _ in pairs:
        path = clip_path(image)
        report.checked += 1
        if not path.is_file():
            if checker.source == "image" and not decodable(image):
                report.notes["corrupt images (no embedding possible)"].append(str(image))
            else:
                report.problems[f"images without {CLIP_SUFFIX}"].append(str(image))
            continue
        embedding, info = read_clip_file(path)
        checker.source = checker.source or info.source  # the first file's source, when unchecked, for the rest
        if checker.info(info, path):
            checker.embeddings(embedding, str(path))
    images = {image.with_suffix("") for image in root.rglob("*") if image.suffix.lower() in CAPTIONED_SUFFIXES}
    orphans = [str(p) for p in root.rglob(f"*{CLIP_SUFFIX}") if p.with_suffix("") not in images]
    report.notes[f"{CLIP_SUFFIX} files without an image"] += orphans
    return report


def decodable(image: Path) -> bool:
    try:
        load_image(image)
    except DECODE_ERRORS:
        return False
    return True


def shard_keys(url: str, field_keys: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(every key, the keys with one of ``field_keys``) of a shard's samples."""
    keys, with_field = set(), set()
    for sample in wds.tarfile_samples([{"url": url}], handler=wds.reraise_exception):
        keys.add(sample["__key__"])
        if any(k in sample for k in field_keys):
            with_field.add(sample["__key__"])
    return keys, with_field


def validate_shards(
    urls: str, cache_dir: Path, expected: Expected, image_keys: tuple[str, ...], caption_key: str
) -> Report:
    """The cache of the shards ``urls`` under ``cache_dir``, against the shards' samples (a sample counts
    if it has ``caption_key``, or for image embeddings one of ``image_keys``)."""
    shards = resolve_shards(urls)
    if not shards:
        raise ValueError(f"--shards {urls!r} matches no .tar shard")
    root = shard_cache_root(cache_dir, expected.model)
    report = Report()
    checker = Checker(expected.model, expected.pretrained, expected.source, report)
    meta = read_metadata(root)
    if meta is None:
        report.problems[f"no {METADATA}"].append(f"{root} (build it with scripts/precompute_clip.py)")
        return report
    if not checker.info(CacheInfo.from_metadata(meta, root / METADATA), root / METADATA):
        return report
    checker.source = checker.source or str(meta["source"])
    listed = meta.get("shards", {})
    field_keys = (caption_key,) if checker.source == "text" else image_keys
    for url in shards:
        report.checked += 1
        path = shard_file(root, url)
        if shard_stem(url) not in listed or not path.is_file():
            report.problems[f"shards not cached (or not listed in {METADATA})"].append(url)
            continue
        try:
            cached = read_shard_file(path)
        except ValueError as e:
            report.problems["embeddings not matching their keys"].append(str(e).split(";")[0])
            continue
        if len(cached.keys) != int(listed[shard_stem(url)]["count"]):
            report.problems[f"counts not matching {METADATA}"].append(
                f"{path}: {len(cached.keys)} embeddings, {METADATA} lists {listed[shard_stem(url)]['count']}"
            )
        if not checker.info(cached.info, path):
            continue
        checker.embeddings(cached.embeddings, str(path))
        try:
            keys, with_field = shard_keys(url, field_keys)
        except (OSError, tarfile.TarError, ValueError) as e:
            report.problems["unreadable shards"].append(f"{url}: {e}")
            continue
        missing = sorted(with_field - set(cached.keys) - set(cached.skipped))
        report.problems["samples without embeddings"] += [f"{url} key {key}" for key in missing]
        report.problems["embeddings of keys not in the shard"] += [f"{path} key {k}" for k in set(cached.keys) - keys]
        report.notes["samples skipped when precomputing (corrupt)"] += [f"{url} key {k}" for k in cached.skipped]
    unused = sorted(set(listed) - {shard_stem(url) for url in shards})
    report.notes[f"shards in {METADATA} not matched by --shards"] += unused
    return report
