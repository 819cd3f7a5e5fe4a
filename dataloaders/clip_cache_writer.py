"""Building the CLIP embedding cache that ``dataloaders.clip_cache`` reads (``scripts/precompute_clip.py``).

A caption folder gets ``name.clip`` beside each captioned ``name.jpg``; shards get
``<cache-dir>/<model>/<shard stem>.safetensors`` and ``metadata.json`` (the formats are described in
``dataloaders/clip_cache.py``). A text embedding is of each caption's first line, an image embedding of
the image with its white border trimmed, resized and centre-cropped to the model's input. DataLoader
workers read (and decode) while the main process encodes. Every file is written to a temp file and
renamed, so a run stopped at any point resumes: existing ``.clip`` files and shards ``metadata.json``
lists are skipped (``overwrite`` redoes them).
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from adapters.clip_encoder import FrozenClip
from adapters.open_clip_loader import CLIPImageTransform
from dataloaders.caption_preprocess import DECODE_ERRORS, load_image, pick_caption, trim_white_padding
from dataloaders.captions import scan_caption_folder
from dataloaders.clip_cache import (
    METADATA,
    CacheInfo,
    check_unique_stems,
    clip_path,
    mismatch,
    read_clip_info,
    read_metadata,
    shard_cache_root,
    shard_file,
    shard_stem,
    write_clip_file,
    write_json,
    write_shard_file,
)
from dataloaders.webdataset import resolve_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadOptions:
    """How the inputs are read: ``batch_size`` samples per CLIP call, ``workers`` reader processes,
    ``overwrite`` redoes what is cached; for shards, the image extensions (first present wins) and the
    caption extension."""

    batch_size: int = 256
    workers: int = 0
    overwrite: bool = False
    image_keys: tuple[str, ...] = ("jpg", "png", "webp")
    caption_key: str = "txt"


def clip_input(image: Image.Image, transform: CLIPImageTransform) -> Tensor:
    """RGB image -> (3, H, W) uint8 at the model's input size: white border trimmed, then the model's own
    resize (shortest side and centre crop, or squash); the encoder normalises."""
    image = trim_white_padding(image)
    th, tw = transform.size
    if transform.resize_mode == "squash":
        image = image.resize((tw, th), Image.Resampling.BICUBIC)
    else:
        scale = max(th / image.height, tw / image.width)
        size = (max(tw, round(image.width * scale)), max(th, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - tw) // 2, (image.height - th) // 2
        image = image.crop((left, top, left + tw, top + th))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def as_list(items: list[Any]) -> list[Any]:
    """DataLoader ``collate_fn``: the items as they are."""
    return items


def encode(clip: FrozenClip, source: str, texts: list[str], images: list[Tensor]) -> Tensor:
    """(n, D) unit-norm embeddings of the texts or of the uint8 images."""
    if source == "text":
        return clip.encode_text(texts)
    return clip.encode_image(torch.stack(images).to(clip.device).float().div(127.5).sub(1))


# ---- a caption folder ----


class FolderItems(Dataset):
    """Each captioned image -> its state: ``done`` (a fitting ``.clip``), ``stale`` (one built otherwise),
    ``corrupt``, or ``todo`` with the caption's first line or the image at the model's input size."""

    def __init__(self, pairs: list[tuple[Path, str]], info: CacheInfo, transform: CLIPImageTransform,
                 overwrite: bool):  # fmt: skip
        self.pairs, self.info, self.transform, self.overwrite = pairs, info, transform, overwrite

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, text = self.pairs[index]
        path = clip_path(image_path)
        item: dict[str, Any] = {"path": path, "text": pick_caption(text, None), "image": None, "why": None}
        if path.is_file() and not self.overwrite:
            item["why"] = mismatch(read_clip_info(path), self.info, path)
            return {**item, "state": "stale" if item["why"] else "done"}
        if self.info.source == "image":
            try:
                item["image"] = clip_input(load_image(image_path), self.transform)
            except DECODE_ERRORS:
                return {**item, "state": "corrupt"}
        return {**item, "state": "todo"}


def precompute_folder(folder: Path, info: CacheInfo, load: Callable[[], FrozenClip], options: ReadOptions) -> Counter:
    """``.clip`` files beside the captioned images under ``folder``; ``load`` builds the encoder (only
    when there is work). Counts per state: ``todo`` (written), ``done``, ``corrupt``."""
    root = folder.expanduser()
    if not root.is_dir():
        raise ValueError(f"--folder {folder} is not a folder")
    pairs, _ = scan_caption_folder(root)
    if not pairs:
        raise ValueError(f"no captioned images (name.jpg + name.txt) under {root}")
    clip = load()
    items = FolderItems(pairs, info, CLIPImageTransform.from_model(clip.model), options.overwrite)
    loader = DataLoader(items, batch_size=options.batch_size, num_workers=options.workers, collate_fn=as_list)
    counts: Counter = Counter()
    with tqdm(total=len(pairs), unit="img", desc="encoding", dynamic_ncols=True) as progress, logging_redirect_tqdm():
        for batch in loader:
            counts.update(item["state"] for item in batch)
            stale = next((item for item in batch if item["state"] == "stale"), None)
            if stale is not None:
                raise ValueError(f"{stale['why']}; pass --overwrite to rebuild the folder's .clip files")
            todo = [item for item in batch if item["state"] == "todo"]
            if todo:
                embeddings = encode(clip, info.source, [i["text"] for i in todo], [i["image"] for i in todo])
                for item, embedding in zip(todo, embeddings, strict=True):
                    write_clip_file(item["path"], embedding, info)
            progress.update(len(batch))
    return counts


# ---- WebDataset shards ----


class ShardItems(IterableDataset):
    """The shards dealt to the workers, each read in batches: keys with their first caption lines or images,
    the keys that could not be encoded (``skipped``), and a last item per shard (with the read error, if any)."""

    def __init__(self, shards: list[str], source: str, image_keys: tuple[str, ...], caption_key: str,
                 batch_size: int, transform: CLIPImageTransform):  # fmt: skip
        self.shards, self.source, self.batch_size, self.transform = shards, source, batch_size, transform
        self.image_keys, self.caption_key = image_keys, caption_key

    def _read(self, sample: dict) -> tuple[str, str | Tensor | None]:
        """("ok", the first caption line or the CLIP-sized image), ("without", None): no such field, or
        ("corrupt", None)."""
        if self.source == "text":
            text = sample.get(self.caption_key)
            if text is None:
                return "without", None
            return "ok", pick_caption(text.decode("utf-8", errors="replace"), None)
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            return "without", None
        try:
            return "ok", clip_input(load_image(data), self.transform)
        except DECODE_ERRORS:
            return "corrupt", None

    def _shard(self, url: str) -> Iterator[dict[str, Any]]:
        batch: dict[str, Any] = {"shard": url, "keys": [], "inputs": [], "skipped": [], "without": 0, "last": False}
        try:
            for sample in wds.tarfile_samples([{"url": url}], handler=wds.reraise_exception):
                state, value = self._read(sample)
                if state == "ok":
                    batch["keys"].append(sample["__key__"])
                    batch["inputs"].append(value)
                elif state == "corrupt":
                    batch["skipped"].append(sample["__key__"])
                else:
                    batch["without"] += 1
                if len(batch["keys"]) == self.batch_size:
                    yield batch
                    batch = {**batch, "keys": [], "inputs": [], "skipped": [], "without": 0}
        except (OSError, tarfile.TarError, ValueError) as e:  # a truncated or unreadable shard: reported, not cached
            yield {**batch, "last": True, "error": f"{type(e).__name__}: {e}"}
            return
        yield {**batch, "last": True, "error": None}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for url in mine:
            yield from self._shard(url)


def precompute_shards(
    urls: str, cache_dir: Path, info: CacheInfo, load: Callable[[], FrozenClip], options: ReadOptions
) -> Counter:
    """A shard file per shard of ``urls`` under ``cache_dir``'s folder for the model, listed in its
    ``metadata.json`` as each finishes; ``load`` builds the encoder (only when there is work). Counts:
    ``written``/``skipped`` samples, ``without_source``, ``shards``, ``cached_shards``, ``failed_shards``."""
    shards = resolve_shards(urls)
    if not shards:
        raise ValueError(f"--shards {urls!r} matches no .tar shard")
    check_unique_stems(shards)
    root = shard_cache_root(cache_dir, info.model_name)
    root.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(root)
    why = None if meta is None else mismatch(CacheInfo.from_metadata(meta, root / METADATA), info, root)
    if why and not options.overwrite:
        raise ValueError(f"{why}; pass --overwrite to rebuild it, or choose another --cache-dir")
    listed: dict[str, Any] = {} if meta is None or why else meta.get("shards", {})
    meta = {**info.metadata(), "dim": info.dim, "shards": listed}
    done = {stem for stem in listed if (root / f"{stem}.safetensors").is_file()}
    todo = [url for url in shards if options.overwrite or shard_stem(url) not in done]
    counts: Counter = Counter(cached_shards=len(shards) - len(todo))
    if counts["cached_shards"]:
        log.info("skipping %d shards already cached in %s", counts["cached_shards"], root)
    if not todo:
        return counts
    clip = load()
    reader = ShardItems(todo, info.source, options.image_keys, options.caption_key, options.batch_size,
                        CLIPImageTransform.from_model(clip.model))  # fmt: skip
    loader = DataLoader(reader, batch_size=None, num_workers=min(options.workers, len(todo)))
    pending: dict[str, dict[str, list]] = {}
    with tqdm(total=len(todo), unit="shard", desc="encoding", dynamic_ncols=True) as progress, logging_redirect_tqdm():
        for batch in loader:
            url = batch["shard"]
            part = pending.setdefault(url, {"keys": [], "embeddings": [], "skipped": []})
            if batch["keys"]:
                texts = batch["inputs"] if info.source == "text" else []
                images = batch["inputs"] if info.source == "image" else []
                part["embeddings"].append(encode(clip, info.source, texts, images).cpu())
                part["keys"] += batch["keys"]
            part["skipped"] += batch["skipped"]
            counts["without_source"] += batch["without"]
            if not batch["last"]:
                continue
            del pending[url]
            progress.update(1)
            if batch["error"]:
                log.warning("could not read %s (%s); not cached", url, batch["error"])
                counts["failed_shards"] += 1
                continue
            embeddings = torch.cat(part["embeddings"]) if part["embeddings"] else torch.zeros(0, info.dim)
            write_shard_file(shard_file(root, url), embeddings, part["keys"], info, part["skipped"])
            listed[shard_stem(url)] = {"shard": url, "count": len(part["keys"]), "skipped": len(part["skipped"])}
            write_json(root / METADATA, meta)
            counts.update(written=len(part["keys"]), skipped=len(part["skipped"]), shards=1)
            progress.set_postfix(embeddings=counts["written"])
    return counts
