"""Captioned images from WebDataset tar shards (LAION and img2dataset layouts): the same batches as
``dataloaders.captions`` (see there), read with the ``webdataset`` library.

Each sample is ``KEY.jpg`` (``image_key``; "jpg;png;webp" tries each), ``KEY.txt`` (``caption_key``)
and optionally ``KEY.json`` (``metadata_key``: LAION's width, height, pwatermark, punsafe,
similarity). Nothing a shard holds crashes training: unreadable shards, corrupt images, samples
without an image or a caption, and samples failing the LAION filters are skipped and counted.

Counting with workers: each DataLoader worker counts what it skipped and sends the counts along
with its next batch (a worker's last, incomplete batch is sent too, for its counts, and dropped by
the main process). The main process adds them into ``loader.stats`` (reset each epoch, readable
during it) and logs them at the end of the epoch, so counts are exact whatever ``num_workers``.

Order: shards are shuffled per (seed, epoch) and dealt to ranks and workers; samples pass a
shuffle buffer seeded per (seed, epoch, rank, worker); each sample's crop is seeded by (seed,
epoch, shard, key). Epoch ``e`` is the same stream for a given ``num_workers``, so ``set_epoch``
resumes. With ``resampled`` each worker draws shards with replacement, forever, and an epoch is
``len(loader)`` batches: shards x ``wds_tar_size`` // batch_size (only an estimate otherwise,
for progress bars, as tar files do not say how many samples they hold).

With a CLIP cache (``clip_cache``) each worker reads a shard's cached embeddings when it opens the
shard (``<dir>/<model>/<shard stem>.safetensors``) and sends them along with the images.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, fields, replace
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.utils import pytorch_worker_info

from dataloaders.base import check
from dataloaders.caption_preprocess import DECODE_ERRORS, Preprocess, load_image, make_chunk, mix_seed, pick_caption
from dataloaders.captions import CaptionedData, CaptionLoader, Tokenizer
from dataloaders.clip_cache import ClipFound, ShardLookup

log = logging.getLogger(__name__)


def resolve_shards(urls: str) -> list[str]:
    """A brace pattern (``/data/{00000..00099}.tar``), a glob, a folder of .tar files, or remote URLs
    (``http://``, ``pipe:``) → the shard list. Local paths that do not exist are left out."""
    path = Path(urls).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.tar"))
    if any(c in urls for c in "*?["):
        return sorted(wds.utils.glob_with_braces(str(path)))
    expanded = expand_urls(urls)
    local = [u for u in expanded if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).expanduser().is_file()]
    if missing and len(missing) < len(expanded):
        log.warning("%d of the %d shards of %s do not exist (first: %s); reading the others",
                    len(missing), len(expanded), urls, missing[0])  # fmt: skip
    return [u for u in expanded if u not in set(missing)]


@dataclass(kw_only=True, eq=False)
class LaionFilter:
    """LAION metadata thresholds; a field a sample's json lacks (or holds as null) is not checked.

    Sizes are the stored image's ``width``/``height`` (img2dataset), else ``original_width``/...
    ``WebDatasetData`` takes these fields as its options (``dataloaders.min_width``, ...).
    """

    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 2.0
    max_pwatermark: float = 0.5
    max_punsafe: float = 0.5
    min_similarity: float = 0.28

    @classmethod
    def of(cls, options: LaionFilter) -> LaionFilter:
        """The thresholds of ``options`` (a data set that takes them as options) alone, for the workers."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})

    def passes(self, meta: dict) -> bool:
        width = _number(meta, "width", "original_width")
        height = _number(meta, "height", "original_height")
        if width is not None and width < self.min_width or height is not None and height < self.min_height:
            return False
        if width and height and max(width / height, height / width) > self.max_aspect_ratio:
            return False
        pwatermark, punsafe = _number(meta, "pwatermark"), _number(meta, "punsafe")
        similarity = _number(meta, "similarity")
        return not (
            pwatermark is not None
            and pwatermark > self.max_pwatermark
            or punsafe is not None
            and punsafe > self.max_punsafe
            or similarity is not None
            and similarity < self.min_similarity
        )


def _number(meta: dict, *keys: str) -> float | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, int | float) and not math.isnan(value):
            return float(value)
    return None


@dataclass(frozen=True)
class SampleReader:
    """One raw shard sample (a dict of bytes) → a record, or the name of the reason it is skipped.

    ``check`` is the cheap part (keys, metadata), run before the shuffle buffer so that dropped
    samples never occupy it; ``decode`` decodes and preprocesses the image.
    """

    image_keys: tuple[str, ...]
    caption_key: str
    metadata_key: str
    laion_filter: LaionFilter | None  # None: laion_no_filter
    preprocess: Preprocess

    def check(self, sample: dict) -> str | None:
        if not any(k in sample for k in self.image_keys):
            return "missing_image"
        if self.caption_key not in sample:
            return "missing_caption"
        if self.laion_filter is None or self.metadata_key not in sample:
            return None
        try:
            meta = json.loads(sample[self.metadata_key])
        except ValueError:
            return None  # unreadable metadata: nothing to filter on
        return None if not isinstance(meta, dict) or self.laion_filter.passes(meta) else "filtered"

    def decode(self, sample: dict, rng: random.Random | None) -> dict | str:
        image_bytes = next(sample[k] for k in self.image_keys if k in sample)
        try:
            image = load_image(image_bytes)
        except DECODE_ERRORS:
            return "corrupt"
        x, low_res, upscaled, sizes = self.preprocess(image, rng or random.Random(0))
        caption = pick_caption(sample[self.caption_key].decode("utf-8", errors="replace"), rng)
        counts = Counter(upscaled=int(upscaled), empty_caption=int(not caption))
        return {"image": x, "low_res": low_res, "caption": caption, "counts": counts, "sizes": sizes}

    def __call__(self, sample: dict, rng: random.Random | None) -> dict | str:
        return self.check(sample) or self.decode(sample, rng)

    def first_caption(self, sample: dict) -> str:
        """The caption file's first line: what a CLIP cache holds the text embedding of."""
        return pick_caption(sample[self.caption_key].decode("utf-8", errors="replace"), None)


# a worker stops after this many corrupt images in a row (a resampled stream would never end)
MAX_CORRUPT_IN_A_ROW = 1000


@dataclass(eq=False)
class ShardStream(IterableDataset):
    """The worker side of one epoch: shards → samples → checks → shuffle buffer → records → chunks
    with counts (and, with ``clip``, each sample's cached CLIP embedding)."""

    shards: list[str]
    reader: SampleReader
    batch_size: int
    epoch_seed: int
    resampled: bool
    shuffle_buffer: int
    limit: int | None  # test_run: at most this many samples in all (one shard, so one worker reads)
    exclude: frozenset[tuple[str, str]]  # (shard, key) of the held-out samples
    clip: ShardLookup | None = None

    def _urls(self, rank: int, world: int, worker: int, workers: int, passed: Counter) -> Iterator[dict]:
        if not self.resampled:
            order = list(self.shards)
            random.Random(self.epoch_seed).shuffle(order)
            for url in order[rank * workers + worker :: world * workers]:
                yield {"url": url}
            return
        rng = random.Random(mix_seed(self.epoch_seed, rank, worker, "shards"))
        before, barren = -1, 0
        while barren < 2 * len(self.shards) + 8:  # stop a worker whose shards hold nothing usable
            barren = barren + 1 if passed["n"] == before else 0
            before = passed["n"]
            yield {"url": rng.choice(self.shards)}
        log.warning("worker %d: %d shards in a row held no usable sample; stopping it", worker, barren)

    def _checked(self, samples: Iterator[dict], counts: Counter, passed: Counter) -> Iterator[dict]:
        for sample in samples:
            if (sample["__url__"], sample["__key__"]) in self.exclude:
                continue
            counts["seen"] += 1
            reason = self.reader.check(sample)
            if reason is not None:
                counts[reason] += 1
                continue
            passed["n"] += 1
            yield sample

    def _decoded(self, samples: Iterator[dict], counts: Counter) -> Iterator[dict]:
        corrupt_in_a_row = 0
        for sample in samples:
            record = self.reader.decode(sample, random.Random(mix_seed(self.epoch_seed, sample["__url__"],
                                                                       sample["__key__"])))  # fmt: skip
            if isinstance(record, str):
                counts[record] += 1
                corrupt_in_a_row += 1
                if corrupt_in_a_row >= MAX_CORRUPT_IN_A_ROW:
                    log.warning("%d corrupt images in a row; stopping this worker", corrupt_in_a_row)
                    return
                continue
            corrupt_in_a_row = 0
            counts.update(record["counts"])
            if self.clip is not None:
                record["clip"] = self.clip(sample["__url__"], sample["__key__"], self.reader.first_caption(sample))
            yield record

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = pytorch_worker_info()
        counts: Counter = Counter()  # what happened since the last chunk sent
        passed: Counter = Counter()  # samples through the checks, for the barren-shard guard

        def unreadable(exn: Exception) -> bool:
            counts["unreadable"] += 1
            log.warning("skipping unreadable shard data: %s", exn)
            return True

        urls = self._urls(rank, world, worker, workers, passed)
        samples = self._checked(wds.tarfile_samples(urls, handler=unreadable), counts, passed)
        shuffle_rng = random.Random(mix_seed(self.epoch_seed, rank, worker, "buffer"))
        samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=shuffle_rng)(samples)
        images: list[Tensor] = []
        low_res: list[Tensor | None] = []
        captions: list[str] = []
        sizes: list[Tensor] = []
        found: list[ClipFound] | None = None if self.clip is None else []
        for record in islice(self._decoded(samples, counts), self.limit):
            images.append(record["image"])
            low_res.append(record["low_res"])
            captions.append(record["caption"])
            sizes.append(record["sizes"])
            if found is not None:
                found.append(record["clip"])
            if len(images) == self.batch_size:
                yield make_chunk(images, low_res, captions, counts, tuple(images[0].shape), sizes, found)
                images, low_res, captions, sizes = [], [], [], []
                found = None if found is None else []
                counts.clear()
        shape = (3, self.reader.preprocess.image_size, self.reader.preprocess.image_size)
        yield make_chunk(images, low_res, captions, counts, shape, sizes, found)  # the tail: counts, maybe images


@dataclass(eq=False)
class WebDatasetData(CaptionedData, LaionFilter):
    """Captioned images in WebDataset shards, e.g. LAION via img2dataset.

    ``urls``: a brace pattern (``/data/laion/{00000..00099}.tar``), a glob, or a folder of .tar
    files. LAION metadata filters (``LaionFilter``'s thresholds, options of this data set) apply unless
    ``laion_no_filter`` (they slow nothing much, but a custom data set has no such metadata).
    ``eval_set``/``eval_captions`` (and ``eval_low_res`` for an upsampler) are the first ``num_eval``
    usable samples of the first shard, centre-cropped; they are left out of training. ``test_run=N``:
    train on the first N samples of the first shard. ``clip_cache``: CLIP embeddings from a shard cache
    (batches gain ``cond["clip"]``). ``max_corrupt``: the fraction of an epoch's samples that may be
    corrupt or unreadable. The other options: see ``CaptionedData``.
    """

    urls: str
    tokenizer: Tokenizer
    _: KW_ONLY
    num_workers: int = 4
    image_key: str = "jpg"
    caption_key: str = "txt"
    metadata_key: str = "json"
    laion_no_filter: bool = False
    resampled: bool = False
    wds_tar_size: int = 10000
    shuffle_buffer: int = 1000
    max_corrupt: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        max_corrupt, urls = self.max_corrupt, self.urls
        check(0 <= max_corrupt <= 1, f"dataloaders.max_corrupt must be a fraction in [0, 1], got {max_corrupt}")
        self.shards = resolve_shards(urls)
        check(
            bool(self.shards),
            f"dataloaders.urls={urls!r} matches no .tar shard; point it to existing shards "
            "(a brace pattern like /data/laion/{00000..00099}.tar, a glob, or a folder of .tar files)",
        )
        laion_filter = None if self.laion_no_filter else LaionFilter.of(self)
        self.reader = SampleReader(tuple(self.image_key.split(";")), self.caption_key, self.metadata_key, laion_filter,
                                   self.preprocess)  # fmt: skip
        self.clip_lookup = None if self.clip_cache is None else self.clip_cache.shard_lookup(urls, self.shards)
        self._take_eval()
        samples = self.test_run if self.test_run is not None else len(self.shards) * self.wds_tar_size
        self.length = samples // self.batch_size
        check(self.length > 0, f"{samples} samples make no batch of batch_size={self.batch_size}; lower batch_size")

    @property
    def name(self) -> str:
        return f"webdataset {self.urls}"

    def _take_eval(self) -> None:
        """The first ``num_eval`` usable samples of the first shard, centre-cropped, in order."""
        centred, num_eval = replace(self.reader, preprocess=self.preprocess.centred()), self.num_eval
        records, keys = [], []
        if num_eval > 0:
            for sample in wds.tarfile_samples([{"url": self.shards[0]}], handler=wds.warn_and_continue):
                record = centred(sample, rng=None)
                if isinstance(record, dict):
                    records.append(record)
                    keys.append((sample["__url__"], sample["__key__"]))
                if len(records) == num_eval:
                    break
        if len(records) < num_eval:
            log.warning("%s holds only %d usable samples for eval_set (num_eval=%d)", self.shards[0], len(records),
                        num_eval)  # fmt: skip
        self._keep_held_out(records)
        self.eval_keys = frozenset(keys)
        self.eval_order = keys  # (shard, key) of eval_set's rows

    def _held_out_clip(self) -> list[ClipFound] | None:
        lookup, pairs = self.clip_lookup, zip(self.eval_order, self.eval_captions, strict=True)
        return None if lookup is None else [lookup(url, key, caption) for (url, key), caption in pairs]

    def train_loader(self, device: torch.device, seed: int) -> CaptionLoader:
        """``batch_size`` is the global batch: each of N ranks reads its own shards (dealt by
        ``pytorch_worker_info``) in batches of ``batch_size / N``. Ranks must make the same number of
        batches, which only resampled streams (cut at ``len``) guarantee."""
        loader = super().train_loader(device, seed)
        return replace(loader, stop_at_length=self.resampled, max_corrupt=self.max_corrupt)

    def _chunks(
        self, device: torch.device, run_seed: int, shard: slice, rank: int, world: int
    ) -> Callable[[int], DataLoader]:
        check(
            world == 1 or self.resampled,
            f"webdataset in {world} processes needs dataloaders.resampled=true: shards dealt to ranks end at "
            "different times, and a rank that runs out would hang the others",
        )
        shards = self.shards[:1] if self.test_run is not None else self.shards
        per_rank = shard.stop - shard.start

        def chunks(epoch: int) -> DataLoader:
            stream = ShardStream(shards, self.reader, per_rank, mix_seed(run_seed, epoch), self.resampled,
                                 self.shuffle_buffer, self.test_run, self.eval_keys, self.clip_lookup)  # fmt: skip
            return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                              pin_memory=device.type == "cuda", persistent_workers=False)  # fmt: skip

        return chunks
