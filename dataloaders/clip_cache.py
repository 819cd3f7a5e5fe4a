"""Precomputed CLIP embeddings for the captioned-image loaders: the file formats, the lookups workers
use, and ``ClipCache``, the main-process half that checks the cache against the configured CLIP
model and encodes what the cache lacks.

Formats (every file written to a temp file and renamed, so an interrupted run never leaves a broken one):

- a caption folder: ``name.clip`` beside ``name.jpg``, a safetensors file holding one (D,) float16
  unit-norm tensor ``embedding`` and the metadata ``model_name``, ``pretrained``, ``dim``, ``source``;
- WebDataset shards: ``<dir>/<cache_name(model)>/<shard stem>.safetensors`` per shard, holding
  ``embeddings`` (N, D) float16 with the sample keys, in order, as JSON in its metadata (``keys``;
  ``skipped``: keys that had the source field but could not be encoded, e.g. a corrupt image),
  plus ``metadata.json`` (model_name, pretrained, dim, source, and per shard stem its ``count``).
  A shard counts as cached once ``metadata.json`` lists it.

A text embedding is of the caption file's first line (the caption evaluation uses): a file with
several lines still trains on a random line's tokens, with the first line's CLIP embedding.
``scripts/precompute_clip.py`` builds a cache (``clip_cache_writer``) and, with ``--validate``, checks one
(``clip_cache_check``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from adapters.clip_encoder import FrozenClip
from adapters.open_clip_loader import architecture_dim, cache_name

log = logging.getLogger(__name__)

CLIP_SUFFIX = ".clip"
METADATA = "metadata.json"
SOURCES = ("text", "image")
ON_MISS = ("encode", "error")
PRECOMPUTE = "python scripts/precompute_clip.py"


@dataclass(frozen=True)
class CacheInfo:
    """What a cache was built with; a lookup refuses a cache whose info differs from the configured model's."""

    model_name: str
    pretrained: str
    dim: int
    source: str = "text"

    def metadata(self) -> dict[str, str]:
        """As safetensors metadata (strings only)."""
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any] | None, where: str | Path) -> CacheInfo:
        fields = ("model_name", "pretrained", "dim", "source")
        missing = [k for k in fields if not meta or k not in meta]
        if missing or meta is None:
            raise ValueError(f"{where} is not a CLIP cache file (no {', '.join(missing)} in its metadata); rebuild it")
        return cls(str(meta["model_name"]), str(meta["pretrained"]), int(meta["dim"]), str(meta["source"]))


def weights_label(pretrained: str) -> str:
    """A pretrained tag as it is; a local weights file by its file name, so a cache survives the file moving."""
    return Path(pretrained).name if "/" in pretrained or os.sep in pretrained else pretrained


def stored_pretrained(pretrained: str) -> str:
    """What a cache records: a tag, or the absolute path of a local weights file."""
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.is_file() else pretrained


def mismatch(found: CacheInfo, expected: CacheInfo, where: str | Path) -> str | None:
    """Why a cache built with ``found`` cannot serve ``expected`` (one clause), or None when it can."""
    if cache_name(found.model_name) != cache_name(expected.model_name) or found.dim != expected.dim:
        return (
            f"{where} was built with {found.model_name} ({found.dim}-d) but the configured CLIP model is "
            f"{expected.model_name} ({expected.dim}-d)"
        )
    if weights_label(found.pretrained) != weights_label(expected.pretrained):
        return (
            f"{where} was built with {found.model_name} weights {found.pretrained!r} but the configured ones are "
            f"{expected.pretrained!r}"
        )
    if found.source != expected.source:
        return f"{where} holds {found.source} embeddings but dataloaders.clip_cache.source={expected.source}"
    return None


def check_info(found: CacheInfo, expected: CacheInfo, where: str | Path, rebuild: str) -> None:
    reason = mismatch(found, expected, where)
    if reason:
        raise ValueError(f"{reason}; rebuild it: {rebuild} --overwrite")


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic: a temp file renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ---- a caption folder: name.clip beside name.jpg ----


def clip_path(image: Path) -> Path:
    return image.with_suffix(CLIP_SUFFIX)


def write_clip_file(path: Path, embedding: Tensor, info: CacheInfo) -> None:
    """One (D,) embedding, stored float16."""
    if embedding.shape != (info.dim,):
        raise ValueError(f"a .clip file holds one ({info.dim},) embedding, got shape {tuple(embedding.shape)}")
    _atomic_save({"embedding": embedding.detach().to("cpu", torch.float16).contiguous()}, path, info.metadata())


def read_clip_info(path: Path) -> CacheInfo:
    """The header only: what the file was built with."""
    with safe_open(str(path), "pt") as f:
        return CacheInfo.from_metadata(f.metadata(), path)


def read_clip_file(path: Path) -> tuple[Tensor, CacheInfo]:
    """((D,) float16 embedding, info)."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("embedding"), CacheInfo.from_metadata(f.metadata(), path)


# ---- WebDataset shards: a folder per model, a file per shard ----


def shard_stem(url: str) -> str:
    """``/data/laion/00012.tar`` -> ``00012``: the shard's cache file name (without ``.safetensors``)."""
    return Path(url).name.removesuffix(".tar")


def shard_cache_root(cache_dir: str | Path, model_name: str) -> Path:
    return Path(cache_dir).expanduser() / cache_name(model_name)


def shard_file(root: Path, url: str) -> Path:
    return root / f"{shard_stem(url)}.safetensors"


def check_unique_stems(shards: Iterable[str]) -> None:
    seen: dict[str, str] = {}
    for url in shards:
        other = seen.setdefault(shard_stem(url), url)
        if other != url:
            raise ValueError(f"shards {other} and {url} share the CLIP cache name {shard_stem(url)}; rename one")


def write_shard_file(path: Path, embeddings: Tensor, keys: list[str], info: CacheInfo, skipped: list[str]) -> None:
    """A shard's (N, D) embeddings, float16, with its N sample keys in order."""
    if embeddings.shape != (len(keys), info.dim):
        raise ValueError(f"{len(keys)} keys need ({len(keys)}, {info.dim}) embeddings, got {tuple(embeddings.shape)}")
    meta = {**info.metadata(), "keys": json.dumps(keys), "skipped": json.dumps(skipped)}
    _atomic_save({"embeddings": embeddings.detach().to("cpu", torch.float16).contiguous()}, path, meta)


@dataclass(frozen=True)
class ShardEmbeddings:
    embeddings: Tensor  # (N, D) float16
    keys: list[str]
    skipped: list[str]
    info: CacheInfo


def read_shard_file(path: Path) -> ShardEmbeddings:
    """A shard's embeddings and keys; a count that does not match its keys is an error naming the file."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        info = CacheInfo.from_metadata(meta, path)
        embeddings = f.get_tensor("embeddings")
    keys, skipped = json.loads(meta.get("keys", "[]")), json.loads(meta.get("skipped", "[]"))
    if len(embeddings) != len(keys):
        raise ValueError(
            f"{path} holds {len(embeddings)} embeddings for {len(keys)} sample keys: a broken cache file; "
            "delete it and run scripts/precompute_clip.py again"
        )
    return ShardEmbeddings(embeddings, keys, skipped, info)


def read_metadata(root: Path) -> dict[str, Any] | None:
    """A shard cache's ``metadata.json``; None when there is none."""
    path = root / METADATA
    return json.loads(path.read_text()) if path.is_file() else None


# ---- worker-side lookups (picklable, no model) ----


class ClipFound(NamedTuple):
    """What a worker found for one sample: the cached (D,) float16 embedding or None (a miss), where it
    looked (named in errors), and the text a miss encodes (the caption's first line)."""

    embedding: Tensor | None
    where: str
    text: str


def stack_found(found: list[ClipFound]) -> dict[str, Any]:
    """A chunk's CLIP part: ``embeddings`` (n, D) float16 with zero rows at the misses, which ``missing``
    lists by index with their ``where`` and ``text``; (n, 0) when every sample missed."""
    missing = [i for i, f in enumerate(found) if f.embedding is None]
    hits = [f.embedding for f in found if f.embedding is not None]
    if hits:
        zeros = torch.zeros_like(hits[0])
        embeddings = torch.stack([zeros if f.embedding is None else f.embedding for f in found])
    else:
        embeddings = torch.zeros(len(found), 0, dtype=torch.float16)
    return {
        "embeddings": embeddings,
        "missing": missing,
        "where": [found[i].where for i in missing],
        "texts": [found[i].text for i in missing],
    }


@dataclass(frozen=True)
class FolderLookup:
    """``name.clip`` beside ``name.jpg``; each file's header is checked against the configured model."""

    expected: CacheInfo
    rebuild: str

    def read(self, path: Path) -> Tensor:
        """A ``.clip`` file's (D,) float16 embedding, after checking it fits the configured model."""
        embedding, info = read_clip_file(path)
        check_info(info, self.expected, path, self.rebuild)
        if embedding.shape != (self.expected.dim,):
            raise ValueError(
                f"{path} holds a {tuple(embedding.shape)} embedding but the configured CLIP model "
                f"{self.expected.model_name} is {self.expected.dim}-d; rebuild it: {self.rebuild} --overwrite"
            )
        return embedding

    def __call__(self, image: Path, first_caption: str) -> ClipFound:
        path = clip_path(image)
        return ClipFound(self.read(path) if path.is_file() else None, str(path), first_caption)


class ShardLookup:
    """Cached embeddings of WebDataset samples by (shard, key); a shard's file is read on its first sample
    and the last few kept (a shuffle buffer mixes neighbouring shards)."""

    KEEP = 4

    def __init__(self, files: dict[str, tuple[Path, int]], expected: CacheInfo, rebuild: str):
        self.files = files  # shard url -> (cache file, count from metadata.json); absent: not cached
        self.expected = expected
        self.rebuild = rebuild
        self._tables: OrderedDict[str, tuple[Tensor, dict[str, int]] | None] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": OrderedDict()}  # workers start empty

    def _table(self, url: str) -> tuple[Tensor, dict[str, int]] | None:
        if url in self._tables:
            self._tables.move_to_end(url)
            return self._tables[url]
        table = self._load(url)
        self._tables[url] = table
        if len(self._tables) > self.KEEP:
            self._tables.popitem(last=False)
        return table

    def _load(self, url: str) -> tuple[Tensor, dict[str, int]] | None:
        if url not in self.files:
            return None
        path, count = self.files[url]
        shard = read_shard_file(path)
        check_info(shard.info, self.expected, path, self.rebuild)
        if len(shard.keys) != count or shard.embeddings.shape[1:] != (self.expected.dim,):
            raise ValueError(
                f"{path} holds {tuple(shard.embeddings.shape)} embeddings but {METADATA} lists {count} samples of "
                f"{self.expected.dim}-d for {url}; rebuild it: {self.rebuild} --overwrite"
            )
        return shard.embeddings, {key: i for i, key in enumerate(shard.keys)}

    def __call__(self, url: str, key: str, first_caption: str) -> ClipFound:
        table, where = self._table(url), f"{url} key {key}"
        row = None if table is None else table[1].get(key)
        return ClipFound(None if row is None else table[0][row], where, first_caption)  # type: ignore[index]


# ---- the main-process half ----


class Encoder(Protocol):
    dim: int

    def encode_text(self, captions: list[str]) -> Tensor: ...

    def encode_image(self, images: Tensor) -> Tensor: ...


class ClipCache:
    """Precomputed CLIP embeddings for a caption folder or WebDataset shards (Hydra: ``dataloaders.clip_cache``).

    ``model_name``/``pretrained``: the CLIP model the embeddings must come from (its width from
    ``architecture_dim``, no weights read); ``dir``: the shard cache root (``precompute_clip.py
    --cache-dir``; folders keep ``.clip`` files beside the images); ``source``: text or image
    embeddings; ``on_miss``: ``encode`` (embed what the cache lacks, counted as ``clip_miss``) or
    ``error``; ``encoder``: builds the encoder (a partial taking ``device``; default FrozenClip of
    model_name/pretrained), called on the first miss only, in the main process.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str = "openai",
        dir: str | None = None,
        source: str = "text",
        on_miss: str = "encode",
        encoder: Callable[..., Encoder] | None = None,
    ):
        if source not in SOURCES:
            raise ValueError(f"dataloaders.clip_cache.source={source!r}; use one of {', '.join(SOURCES)}")
        if on_miss not in ON_MISS:
            raise ValueError(f"dataloaders.clip_cache.on_miss={on_miss!r}; use one of {', '.join(ON_MISS)}")
        self.expected = CacheInfo(model_name, pretrained, architecture_dim(model_name), source)
        self.dir = dir
        self.on_miss = on_miss
        self.make_encoder = encoder or partial(FrozenClip, model_name=model_name, pretrained=pretrained)
        self._encoder: Encoder | None = None
        self.command = self._command("--folder DIR | --shards URLS --cache-dir DIR")  # made exact by the lookups

    @property
    def dim(self) -> int:
        return self.expected.dim

    def _command(self, target: str) -> str:
        e = self.expected
        return f"{PRECOMPUTE} {target} --model {e.model_name} --pretrained {e.pretrained} --source {e.source}"

    def folder_lookup(self, root: str | Path, pairs: list[tuple[Path, str]]) -> FolderLookup:
        """The lookup for a caption folder's pairs; the first ``.clip`` found is checked here, in the main process."""
        self.command = rebuild = self._command(f"--folder {root}")
        lookup = FolderLookup(self.expected, rebuild)
        first = next((clip_path(p) for p, _ in pairs if clip_path(p).is_file()), None)
        if first is None:
            self._nothing_cached(f"no {CLIP_SUFFIX} file beside the images under {root}", rebuild)
        else:
            lookup.read(first)
        return lookup

    def shard_lookup(self, urls: str, shards: list[str]) -> ShardLookup:
        """The lookup for these shards, from ``dir``'s ``metadata.json`` (checked here, in the main process)."""
        if self.dir is None:
            raise ValueError(
                "dataloaders.clip_cache.dir is null; set it to the --cache-dir given to scripts/precompute_clip.py"
            )
        check_unique_stems(shards)
        root = shard_cache_root(self.dir, self.expected.model_name)
        self.command = rebuild = self._command(f"--shards '{urls}' --cache-dir {self.dir}")
        meta = read_metadata(root)
        if meta is None:
            self._nothing_cached(f"no CLIP cache at {root} ({METADATA} missing)", rebuild)
            return ShardLookup({}, self.expected, rebuild)
        check_info(CacheInfo.from_metadata(meta, root / METADATA), self.expected, root, rebuild)
        listed = meta.get("shards", {})
        files = {url: (shard_file(root, url), int(listed[shard_stem(url)]["count"]))
                 for url in shards if shard_stem(url) in listed}  # fmt: skip
        uncached = len(shards) - len(files)
        if uncached:
            log.warning("%s: %d of %d shards have no cached CLIP embeddings", root, uncached, len(shards))
        return ShardLookup(files, self.expected, rebuild)

    def _nothing_cached(self, what: str, rebuild: str) -> None:
        if self.on_miss == "error":
            raise ValueError(f"{what} and dataloaders.clip_cache.on_miss=error; precompute them: {rebuild}")
        log.warning("%s: every CLIP embedding will be encoded during training; precompute them: %s", what, rebuild)

    def encoder(self, device: torch.device) -> Encoder:
        """The encoder, built on its first use."""
        if self._encoder is None:
            self._encoder = self.make_encoder(device=device)
            if self._encoder.dim != self.dim:
                raise ValueError(
                    f"dataloaders.clip_cache.encoder gives {self._encoder.dim}-d embeddings but "
                    f"{self.expected.model_name} is {self.dim}-d; make encoder.model_name the cache's model_name"
                )
            log.info("CLIP cache misses are encoded by %s (%s)", self.expected.model_name, self.expected.pretrained)
            if self.expected.source == "image":
                log.warning("CLIP image embeddings missing from the cache are encoded from the training crops, "
                            "not the full images scripts/precompute_clip.py encodes")  # fmt: skip
        return self._encoder

    def fill(self, part: dict[str, Any], images: Tensor) -> tuple[Tensor, int]:
        """A chunk's CLIP part (see ``stack_found``) -> ((n, D) float32 unit-norm on ``images``' device, misses).

        Misses are encoded (``on_miss=encode``: the caption's first line, or under ``source=image`` the
        training image in [-1, 1]) or an error naming the first of them and the precompute command.
        """
        device, missing = images.device, part["missing"]
        n = len(images)
        if missing and self.on_miss == "error":
            raise ValueError(
                f"no cached CLIP embedding for {part['where'][0]} ({len(missing)} of {n} in this batch) and "
                f"dataloaders.clip_cache.on_miss=error; precompute them: {self.command}, "
                "or set dataloaders.clip_cache.on_miss=encode"
            )
        cached = part["embeddings"]
        out = cached.to(device).float() if cached.shape[1] == self.dim else torch.zeros(n, self.dim, device=device)
        if missing:
            encoder = self.encoder(device)
            index = torch.tensor(missing, device=device)
            if self.expected.source == "text":
                new = encoder.encode_text(part["texts"])
            else:
                new = encoder.encode_image(images.index_select(0, index))
            out[index] = new.to(device, torch.float32)
        return F.normalize(out, dim=-1), len(missing)
