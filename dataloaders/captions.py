"""Captioned images for text-to-image models (GLIDE): batches of

    {"x1": (B, 3, S, S) in [-1, 1], "cond": {"tokens": (B, ctx) long, "mask": (B, ctx) bool,
                                             "low_res": (B, 3, L, L) in [-1, 1]  (upsampler only),
                                             "clip": (B, D) float32 unit-norm  (with a CLIP cache only)}}

The data objects know nothing of models: the tokenizer is any callable
``tokenizer(captions) -> (tokens, mask)`` with an int attribute ``truncated``, passed in (Hydra
builds it from the config's ``tokenizer`` node).

Tokenizing happens in the main process, on each batch's captions: the tokenizer's ``truncated``
count then lives in one object and is exact (a copy in each worker would count in vain), and
tokenizing a batch of captions costs far less than a GLIDE step. Workers do the heavy part:
decoding, trimming, cropping, resizing, and they send uint8 images (4x less to copy than float).
With a CLIP cache (``dataloaders.clip_cache``, see ``dataloaders.clip_cache``) workers also read each
sample's cached embedding; the main process encodes the misses, so the CLIP model lives in one process.
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dataloaders.base import DataError, HeldOut, check, process_shard, rank_batches, rank_slice
from dataloaders.caption_preprocess import (
    DECODE_ERRORS,
    Preprocess,
    collate_records,
    load_image,
    make_chunk,
    mix_seed,
    pick_caption,
)
from dataloaders.clip_cache import ClipCache, ClipFound, FolderLookup, stack_found

log = logging.getLogger(__name__)

CAPTIONED_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

# stats keys that mean a sample was dropped (the others are information: seen, upscaled, ...)
SKIP_REASONS = ("corrupt", "missing_image", "missing_caption", "filtered", "unreadable")
CORRUPT_ALLOWANCE = 10  # corrupt samples an epoch may skip whatever max_corrupt says (small test sets)


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (a 1-process run's choices); other ranks draw their own."""
    return seed if rank == 0 else mix_seed(seed, rank)


class Tokenizer(Protocol):
    truncated: int

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]: ...


def _to_model_range(x: Tensor) -> Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def check_rgb_unlabelled(channels: int, num_classes: int) -> None:
    check(channels == 3, f"captioned images are loaded as RGB: dataloaders.channels must be 3, got {channels}")
    check(num_classes == 0, f"captions, not class labels: dataloaders.num_classes must be 0, got {num_classes}")


@dataclass(eq=False)
class CaptionLoader:
    """The main-process half shared by the caption data sets: chunks from workers → batch dicts.

    ``chunks(epoch)`` yields worker chunks (see ``caption_preprocess.make_chunk``); this class adds
    their counts to ``stats`` (reset each epoch), drops chunks smaller than ``batch_size`` (the tail
    of a worker's stream, kept only for its counts), replaces captions by "" with probability
    ``uncond_p`` (classifier-free guidance), tokenizes, moves to ``device`` and logs the epoch's
    counts at its end. Every random choice is a function of (seed, epoch), so ``set_epoch`` resumes.
    With ``stop_at_length`` (resampled streams, which never end) an epoch is ``length`` batches.
    With ``clip`` (a CLIP cache) it adds ``cond["clip"]``, encoding what the cache lacks (``clip_miss``).
    """

    chunks: Callable[[int], Iterable[dict]]
    length: int
    batch_size: int
    tokenizer: Tokenizer
    device: torch.device
    seed: int
    uncond_p: float
    name: str
    stop_at_length: bool = False
    clip: ClipCache | None = None
    max_corrupt: float = 0.05  # the fraction of corrupt or unreadable samples an epoch may skip
    epoch: int = field(default=0, init=False)
    stats: Counter = field(default_factory=Counter, init=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _to_device(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[dict]:
        self.stats = Counter()
        truncated_before = self.tokenizer.truncated
        drop = random.Random(mix_seed(self.seed, self.epoch, "uncond"))
        n = 0
        for chunk in self.chunks(self.epoch):
            self.stats.update(chunk["counts"])
            captions = chunk["captions"]
            if len(captions) < self.batch_size:
                continue
            captions = ["" if drop.random() < self.uncond_p else c for c in captions]
            tokens, mask = self.tokenizer(captions)
            self.stats["truncated"] = self.tokenizer.truncated - truncated_before
            cond = {"tokens": self._to_device(tokens), "mask": self._to_device(mask),
                    "sizes": self._to_device(chunk["sizes"])}  # fmt: skip
            if chunk["low_res"] is not None:
                cond["low_res"] = _to_model_range(self._to_device(chunk["low_res"]))
            x1 = _to_model_range(self._to_device(chunk["images"]))
            if self.clip is not None:
                cond["clip"], misses = self.clip.fill(chunk["clip"], x1)
                self.stats["clip_miss"] += misses
            yield {"x1": x1, "cond": cond}
            n += 1
            if self.stop_at_length and n >= self.length:
                break
        bad = self.stats["corrupt"] + self.stats["unreadable"]
        if bad > max(CORRUPT_ALLOWANCE, self.max_corrupt * (self.stats["seen"] + self.stats["unreadable"])):
            raise DataError(
                f"{self.name}: {bad} corrupt or unreadable of {self.stats['seen']} samples read in epoch "
                f"{self.epoch} ({self.describe()}), over dataloaders.max_corrupt={self.max_corrupt}; "
                "re-create the damaged shards or raise dataloaders.max_corrupt"
            )
        if n == 0:
            raise DataError(
                f"{self.name}: epoch {self.epoch} made no batch of {self.batch_size} ({self.describe()}); "
                "lower batch_size or num_workers, or loosen the filters"
            )
        log.info("%s epoch %d: %d batches; %s", self.name, self.epoch, n, self.describe())

    def describe(self) -> str:
        skipped = ", ".join(f"{k} {self.stats[k]}" for k in SKIP_REASONS if self.stats[k])
        clip = "" if self.clip is None else f", CLIP cache misses {self.stats['clip_miss']}"
        return (
            f"read {self.stats['seen']}, skipped ({skipped or 'none'}), "
            f"upscaled {self.stats['upscaled']}, empty captions {self.stats['empty_caption']}, "
            f"truncated captions {self.stats['truncated']}{clip}"
        )


@dataclass(eq=False)
class CaptionPairs(Dataset):
    """(image path, caption text) pairs → records; a corrupt image is counted and replaced by the next.

    ``rng_seed`` makes each item's crop and caption line a function of (seed, epoch, index);
    ``clip`` adds each image's cached CLIP embedding (``record["clip"]``).
    """

    pairs: list[tuple[Path, str]]
    preprocess: Preprocess
    rng_seed: int
    clip: FolderLookup | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        counts: Counter = Counter()
        for i in range(index, index + len(self.pairs)):
            path, text = self.pairs[i % len(self.pairs)]
            counts["seen"] += 1
            try:
                image = load_image(path)
            except DECODE_ERRORS as e:
                counts["corrupt"] += 1
                log.warning("skipping corrupt image %s (%s)", path, e)
                continue
            rng = random.Random(mix_seed(self.rng_seed, i))
            x, low_res, upscaled, sizes = self.preprocess(image, rng)
            caption = pick_caption(text, rng)
            counts["upscaled"] += int(upscaled)
            counts["empty_caption"] += int(not caption)
            record: dict[str, Any] = {"image": x, "low_res": low_res, "caption": caption, "counts": counts,
                                      "sizes": sizes}  # fmt: skip
            if self.clip is not None:
                record["clip"] = self.clip(path, pick_caption(text, None))
            return record
        raise ValueError(f"every image of the {len(self.pairs)} pairs failed to decode; check the files")


def scan_caption_folder(root: Path) -> tuple[list[tuple[Path, str]], Counter]:
    """Every ``name.{jpg,jpeg,png,webp}`` below root (any depth) with its ``name.txt``, sorted by path.

    Counts: images, missing_caption (image without .txt, skipped), empty_caption (kept: it trains
    unconditionally).
    """
    counts: Counter = Counter()
    pairs = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in CAPTIONED_SUFFIXES and p.is_file()):
        counts["images"] += 1
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            counts["missing_caption"] += 1
            continue
        text = caption_file.read_text(encoding="utf-8", errors="replace")
        counts["empty_caption"] += int(not text.strip())
        pairs.append((path, text))
    return pairs, counts


@dataclass(eq=False, kw_only=True)
class CaptionedData(ABC):
    """What the captioned data sets share: their options, checks, crops, held-out batch and training loader.

    A data set declares its source (``root``, ``urls``) and ``tokenizer`` as its two positional fields, reads the
    source in ``__post_init__`` (after this class's), keeps ``num_eval`` held-out samples with ``_keep_held_out``,
    and says what a CLIP cache holds for them (``_held_out_clip``) and how an epoch's worker chunks are made
    (``_chunks``). Options: ``image_size`` (and an upsampler's ``low_res_size``), ``min_crop_scale``,
    ``crop_jitter``, ``trim_threshold`` (see ``caption_preprocess.Preprocess``); ``uncond_p`` (see
    ``CaptionLoader``); ``test_run=N`` trains on N samples only; ``seed`` picks the held-out samples and is mixed
    with the run's seed for crops and order; ``clip_cache``: CLIP embeddings, batches gain ``cond["clip"]``.
    """

    kind: ClassVar[str] = "captioned"  # what it serves (training/compat.py checks the other pieces against it)

    image_size: int = 64
    low_res_size: int | None = None
    channels: int = 3
    num_classes: int = 0
    batch_size: int = 4
    num_workers: int = 0
    num_eval: int = 8
    uncond_p: float = 0.0
    min_crop_scale: float = 0.9
    crop_jitter: float = 0.1
    trim_threshold: int = 245
    test_run: int | None = None
    seed: int = 0
    clip_cache: ClipCache | None = None

    if TYPE_CHECKING:  # a field of each data set, declared there to come second, after its source

        @property
        def tokenizer(self) -> Tokenizer: ...

    def __post_init__(self) -> None:
        check_rgb_unlabelled(self.channels, self.num_classes)
        self.preprocess = Preprocess(
            self.image_size, self.low_res_size, self.min_crop_scale, self.crop_jitter, self.trim_threshold
        )
        self.shape: tuple[int, ...] = (3, self.image_size, self.image_size)
        self.length = 0  # training batches an epoch: set by the data set once it has read its source

    @property
    @abstractmethod
    def name(self) -> str:
        """The data set in messages and logs (``captions ROOT``)."""

    @abstractmethod
    def _held_out_clip(self) -> list[ClipFound] | None:
        """What the CLIP cache holds for each held-out sample; None without a cache."""

    @abstractmethod
    def _chunks(
        self, device: torch.device, run_seed: int, shard: slice, rank: int, world: int
    ) -> Callable[[int], DataLoader]:
        """Epoch -> the DataLoader of this rank's worker chunks (``shard`` of each global batch)."""

    def _keep_held_out(self, records: list[dict]) -> None:
        """The held-out records (centre crops, first caption lines) as ``eval_set`` (n, 3, S, S) in [-1, 1],
        ``eval_captions``, ``eval_sizes`` (n, 6) (SDXL's size conditioning) and, for an upsampler, ``eval_low_res``."""
        images, lows, captions, sizes = ([r[k] for r in records] for k in ("image", "low_res", "caption", "sizes"))
        chunk = make_chunk(images, lows, captions, Counter(), self.shape, sizes)
        self.eval_set = _to_model_range(chunk["images"])
        self.eval_captions: list[str] = chunk["captions"]
        self.eval_sizes: Tensor = chunk["sizes"]
        self.eval_low_res = None if chunk["low_res"] is None else _to_model_range(chunk["low_res"])

    def eval_batch(self, device: torch.device) -> dict:
        """The held-out samples as one batch: ``{"x1": eval_set, "cond": {"tokens", "mask", "sizes", ["low_res"],
        ["clip"]}}``; with a CLIP cache, what it lacks is encoded or refused per its ``on_miss``."""
        truncated = self.tokenizer.truncated
        tokens, mask = self.tokenizer(self.eval_captions)
        self.tokenizer.truncated = truncated  # held-out captions stay out of the training epochs' counts
        x1 = self.eval_set.to(device)
        cond = {"tokens": tokens.to(device), "mask": mask.to(device), "sizes": self.eval_sizes.to(device)}
        if self.eval_low_res is not None:
            cond["low_res"] = self.eval_low_res.to(device)
        found = self._held_out_clip()
        if self.clip_cache is not None and found is not None:
            cond["clip"], _ = self.clip_cache.fill(stack_found(found), x1)
        return {"x1": x1, "cond": cond}

    def train_loader(self, device: torch.device, seed: int) -> CaptionLoader:
        """``batch_size`` is the global batch: under torch.distributed each rank loads its slice."""
        run_seed = mix_seed(self.seed, seed)
        shard, (rank, world) = rank_slice(self.batch_size), process_shard()
        chunks = self._chunks(device, run_seed, shard, rank, world)
        return CaptionLoader(chunks, self.length, shard.stop - shard.start, self.tokenizer, device,
                             rank_seed(run_seed, rank), self.uncond_p, self.name, clip=self.clip_cache)  # fmt: skip

    def eval_inputs(self) -> HeldOut:
        return HeldOut(self.eval_set, self.num_classes, captions=self.eval_captions)


@dataclass(eq=False)
class CaptionFolderData(CaptionedData):
    """A folder of ``name.jpg|png|webp`` + ``name.txt`` pairs (recursive) for text-to-image training.

    A caption file may hold several captions, one a line: each visit picks one at random. Images
    without a caption file are skipped and counted (``counts["missing_caption"]``), empty captions
    counted (``counts["empty_caption"]``) and kept. ``num_eval`` pairs chosen with ``seed`` are
    held out: ``eval_set`` (centre crops in [-1, 1]), ``eval_captions`` (first lines) and, for an
    upsampler, ``eval_low_res``. ``test_run=N`` trains on only the first N remaining pairs.
    ``clip_cache``: CLIP embeddings from ``name.clip`` files beside the images (batches gain ``cond["clip"]``).
    The other options: see ``CaptionedData``.
    """

    root: str
    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        super().__post_init__()
        root = self.root
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"dataloaders.root={root} is not a folder; point it to the image+caption pairs")
        pairs, self.counts = scan_caption_folder(path)
        check(
            self.counts["images"] > 0,
            f"no images ({', '.join(sorted(CAPTIONED_SUFFIXES))}) under dataloaders.root={root}; "
            "put name.jpg + name.txt pairs there",
        )
        check(
            bool(pairs),
            f"none of the {self.counts['images']} images under dataloaders.root={root} has a caption file; "
            "add name.txt next to each name.jpg",
        )
        if self.counts["missing_caption"]:
            log.warning("%s: skipped %d images without a .txt caption", root, self.counts["missing_caption"])
        if self.counts["empty_caption"]:
            log.warning("%s: %d caption files are empty (kept, trained unconditionally)", root,
                        self.counts["empty_caption"])  # fmt: skip

        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_eval = min(self.num_eval, len(pairs) - 1)
        self.train_pairs = [pairs[i] for i in sorted(perm[n_eval:])][: self.test_run]
        check(
            len(self.train_pairs) >= self.batch_size,
            f"{len(self.train_pairs)} training pairs but batch_size={self.batch_size}; lower batch_size (or num_eval)",
        )
        self.length = len(self.train_pairs) // self.batch_size
        self._hold_out([pairs[i] for i in sorted(perm[:n_eval])])
        self.clip_lookup = None if self.clip_cache is None else self.clip_cache.folder_lookup(root, pairs)

    @property
    def name(self) -> str:
        return f"captions {self.root}"

    def _hold_out(self, pairs: list[tuple[Path, str]]) -> None:
        """Centre crops and first caption lines of the held-out pairs; corrupt images are left out."""
        centred, rng = self.preprocess.centred(), random.Random(0)
        records, self.eval_paths = [], []
        for path, text in pairs:
            try:
                image = load_image(path)
            except DECODE_ERRORS as e:
                log.warning("leaving corrupt image %s out of eval_set (%s)", path, e)
                continue
            x, low_res, _, sizes = centred(image, rng)
            records.append({"image": x, "low_res": low_res, "caption": pick_caption(text, None), "sizes": sizes})
            self.eval_paths.append(path)
        self._keep_held_out(records)

    def _held_out_clip(self) -> list[ClipFound] | None:
        lookup, pairs = self.clip_lookup, zip(self.eval_paths, self.eval_captions, strict=True)
        return None if lookup is None else [lookup(path, caption) for path, caption in pairs]

    def _chunks(
        self, device: torch.device, run_seed: int, shard: slice, rank: int, world: int
    ) -> Callable[[int], DataLoader]:
        def chunks(epoch: int) -> DataLoader:
            epoch_seed = mix_seed(run_seed, epoch)
            perm = torch.randperm(len(self.train_pairs), generator=torch.Generator().manual_seed(epoch_seed))
            return DataLoader(
                CaptionPairs(self.train_pairs, self.preprocess, rng_seed=epoch_seed, clip=self.clip_lookup),
                batch_sampler=[idx.tolist() for idx in rank_batches(perm, self.batch_size, self.length, shard)],
                generator=torch.Generator().manual_seed(mix_seed(epoch_seed, rank)), num_workers=self.num_workers,
                collate_fn=collate_records, pin_memory=device.type == "cuda", persistent_workers=False,
            )  # fmt: skip

        return chunks
