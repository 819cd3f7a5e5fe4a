"""Encode a caption folder or WebDataset shards once with a CLIP model, for ``dataloaders.clip_cache``.

    python scripts/precompute_clip.py --folder data/pokemon --model ViT-L-14 --pretrained openai
    python scripts/precompute_clip.py --shards '/data/laion/{00000..00099}.tar' --cache-dir data/clip_cache \\
        --model ViT-L-14 --pretrained openai --device cuda --batch-size 512 --workers 8

A folder gets ``name.clip`` beside each captioned ``name.jpg``; shards get
``<cache-dir>/<model>/<shard stem>.safetensors`` and ``metadata.json`` (see ``dataloaders/clip_cache.py``).
``--source text`` embeds each caption file's first line, ``--source image`` the image (white border
trimmed, shortest side resized and centre-cropped to the model's input). Embeddings are unit-norm,
stored float16. DataLoader workers read (and decode) while the main process encodes. Every file is
written to a temp file and renamed, so a run stopped at any point resumes: existing ``.clip`` files
and shards ``metadata.json`` lists are skipped (``--overwrite`` redoes them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
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
from adapters.open_clip_loader import architecture_dim
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
    stored_pretrained,
    write_clip_file,
    write_json,
    write_shard_file,
)
from dataloaders.webdataset import resolve_shards
from evaluation.clip_score import CLIPImageTransform
from training.cli import positive_int
from training.errors import UserError

log = logging.getLogger("precompute_clip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 on success, 1 when shards could not be read, 2 on bad input.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--folder", type=Path, help="a caption folder (name.jpg + name.txt, any depth)")
    target.add_argument("--shards", help="WebDataset shards: a brace pattern, a glob or a folder of .tar files")
    p.add_argument("--cache-dir", type=Path, help="with --shards: the cache root (dataloaders.clip_cache.dir)")
    p.add_argument("--model", default="ViT-L-14", help="an open_clip model name")
    p.add_argument("--pretrained", default="openai", help="an open_clip pretrained tag or a local weights file")
    p.add_argument("--source", choices=("text", "image"), default="text", help="embed the captions or the images")
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per CLIP call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reader processes")
    p.add_argument("--overwrite", action="store_true", help="redo existing .clip files and cached shards")
    p.add_argument("--image-key", default="jpg;png;webp", help="shard image extensions, first present wins")
    p.add_argument("--caption-key", default="txt", help="shard caption extension")
    args = p.parse_args(argv)
    if args.shards is not None and args.cache_dir is None:
        p.error("--shards needs --cache-dir (where the embeddings go; dataloaders.clip_cache.dir)")
    return args


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


def precompute_folder(args: argparse.Namespace, info: CacheInfo, load: Callable[[], FrozenClip]) -> Counter:
    root = args.folder.expanduser()
    if not root.is_dir():
        raise UserError(f"--folder {args.folder} is not a folder")
    pairs, _ = scan_caption_folder(root)
    if not pairs:
        raise UserError(f"no captioned images (name.jpg + name.txt) under {root}")
    clip = load()
    items = FolderItems(pairs, info, CLIPImageTransform.from_model(clip.model), args.overwrite)
    loader = DataLoader(items, batch_size=args.batch_size, num_workers=args.workers, collate_fn=as_list)
    counts: Counter = Counter()
    with tqdm(total=len(pairs), unit="img", desc="encoding", dynamic_ncols=True) as progress, logging_redirect_tqdm():
        for batch in loader:
            counts.update(item["state"] for item in batch)
            stale = next((item for item in batch if item["state"] == "stale"), None)
            if stale is not None:
                raise UserError(f"{stale['why']}; pass --overwrite to rebuild the folder's .clip files")
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


def precompute_shards(args: argparse.Namespace, info: CacheInfo, load: Callable[[], FrozenClip]) -> Counter:
    shards = resolve_shards(args.shards)
    if not shards:
        raise UserError(f"--shards {args.shards!r} matches no .tar shard")
    check_unique_stems(shards)
    root = shard_cache_root(args.cache_dir, info.model_name)
    root.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(root)
    why = None if meta is None else mismatch(CacheInfo.from_metadata(meta, root / METADATA), info, root)
    if why and not args.overwrite:
        raise UserError(f"{why}; pass --overwrite to rebuild it, or choose another --cache-dir")
    listed: dict[str, Any] = {} if meta is None or why else meta.get("shards", {})
    meta = {**info.metadata(), "dim": info.dim, "shards": listed}
    done = {stem for stem in listed if (root / f"{stem}.safetensors").is_file()}
    todo = [url for url in shards if args.overwrite or shard_stem(url) not in done]
    counts: Counter = Counter(cached_shards=len(shards) - len(todo))
    if counts["cached_shards"]:
        log.info("skipping %d shards already cached in %s", counts["cached_shards"], root)
    if not todo:
        return counts
    clip = load()
    reader = ShardItems(todo, info.source, tuple(args.image_key.split(";")), args.caption_key, args.batch_size,
                        CLIPImageTransform.from_model(clip.model))  # fmt: skip
    loader = DataLoader(reader, batch_size=None, num_workers=min(args.workers, len(todo)))
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


def run(args: argparse.Namespace) -> tuple[Counter, CacheInfo]:
    """Checks the input, then loads the model (only when there is work) and encodes."""
    info = CacheInfo(args.model, stored_pretrained(args.pretrained), architecture_dim(args.model), args.source)

    def load() -> FrozenClip:
        return FrozenClip(args.model, args.pretrained, args.device)

    if args.folder is not None:
        return precompute_folder(args, info, load), info
    return precompute_shards(args, info, load), info


def summary(args: argparse.Namespace, counts: Counter, info: CacheInfo) -> str:
    what = f"{info.model_name} {info.dim}-d {info.source} embeddings"
    if args.folder is not None:
        return (
            f"ok: {counts['todo']} {what} written, {counts['done']} already there, "
            f"{counts['corrupt']} corrupt images skipped, in {args.folder}"
        )
    root = shard_cache_root(args.cache_dir, info.model_name)
    status = "ok" if not counts["failed_shards"] else f"{counts['failed_shards']} shards failed"
    return (
        f"{status}: {counts['written']} {what} written for {counts['shards']} shards, {counts['cached_shards']} "
        f"shards already cached, {counts['skipped']} samples skipped (corrupt), {counts['without_source']} "
        f"without a {'caption' if info.source == 'text' else 'image'}, in {root}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts, info = run(args)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(args, counts, info))
    return 1 if counts["failed_shards"] else 0


if __name__ == "__main__":
    sys.exit(main())
