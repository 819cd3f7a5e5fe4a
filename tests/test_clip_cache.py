"""The CLIP embedding cache end to end: precompute_clip.py on a caption folder and on WebDataset shards,
the loaders' cond["clip"], misses, refusals of a cache built otherwise, precompute_clip.py --validate, eval_batch.

Tiny CLIP models of the real families (tests/clip_helpers.py) stand in for ViT-L-14 and ViT-B-32."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from adapters.clip_encoder import FrozenClip
from dataloaders.caption_preprocess import load_image
from dataloaders.captions import CaptionFolderData
from dataloaders.clip_cache import (
    METADATA,
    CacheInfo,
    ClipCache,
    read_clip_file,
    read_shard_file,
    shard_cache_root,
    write_clip_file,
)
from dataloaders.clip_cache_writer import clip_input
from dataloaders.webdataset import WebDatasetData
from scripts import precompute_clip
from tests.clip_helpers import register_tiny_clip, tiny_clip_weights
from tests.test_caption_data import STAND_IN, WordTokenizer, encode, photos, shards, variants  # noqa: F401

CPU = torch.device("cpu")
FP16 = 2e-3  # float16 storage of unit-norm embeddings


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster than two on a busy machine (see tests/test_clip_score.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny:
    """A registered tiny CLIP, its weights file and the encoder a run would build."""

    def __init__(self, tmp: Path, family: str, dim: int):
        self.name = register_tiny_clip(tmp, family, dim)
        self.weights = str(tiny_clip_weights(tmp, self.name))
        self.clip = FrozenClip(self.name, self.weights)

    def args(self) -> list[str]:
        return ["--model", self.name, "--pretrained", self.weights, "--device", "cpu"]

    def cache(self, **kw) -> ClipCache:
        return ClipCache(self.name, self.weights, **kw)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Tiny:
    """The configured model (ViT-L-14 family, 24-d)."""
    return Tiny(tmp_path_factory.mktemp("clip_l"), "ViT-L-14", 24)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Tiny:
    """Another model (ViT-B-32 family, 16-d)."""
    return Tiny(tmp_path_factory.mktemp("clip_b"), "ViT-B-32", 16)


CAPTIONS = ["a red temple at dusk", "two flowers in a vase\na second caption line", "a grey roof",
            "pink petals close up", "a small flower", "a square crop of petals", "a tower on its side"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(photos, tmp_path_factory) -> Path:  # noqa: F811
    """7 captioned images (one with two caption lines, three in sub/) and one image without a caption."""
    root = tmp_path_factory.mktemp("clip_folder")
    images = variants(photos)
    for i, caption in enumerate(CAPTIONS):
        where = root / ("sub" if i % 2 else "")
        where.mkdir(exist_ok=True)
        image = images[[0, 1, 2, 3, 9, 10, 4][i]].resize((48, 40))
        (where / f"img{i}.jpg").write_bytes(encode(image))
        (where / f"img{i}.txt").write_text(caption)
    (root / "lonely.jpg").write_bytes(encode(images[0].resize((40, 40))))
    return root


def precompute(*args: str) -> int:
    return precompute_clip.main([*args, "--workers", "0", "--batch-size", "3"])


def validate(*args: str) -> int:
    return precompute_clip.main(["--validate", *args])


@pytest.fixture(scope="module")
def cached_folder(folder: Path, large: Tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cached") / "folder"
    shutil.copytree(folder, root)
    assert precompute_clip.main(["--folder", str(root), *large.args(), "--workers", "2", "--batch-size", "3"]) == 0
    return root


@pytest.fixture(scope="module")
def cache_dir(shards: Path, large: Tiny, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("clip_cache")
    argv = ["--shards", str(shards / "{00000..00001}.tar"), "--cache-dir", str(out), *large.args()]
    assert precompute_clip.main([*argv, "--workers", "2", "--batch-size", "3"]) == 0  # the prefetching reader
    return out


def first_lines(root: Path) -> dict[str, str]:
    """Every caption line of the folder -> its file's first line (what the cache embeds)."""
    lines = {}
    for path in root.rglob("*.txt"):
        text = path.read_text().splitlines()
        lines.update({line: text[0] for line in text})
    return lines


def check_clip(batch: dict, large: Tiny, lines: dict[str, str]) -> list[str]:
    """cond["clip"] is the first line's embedding of each sample's caption (found through its tokens)."""
    clip = batch["cond"]["clip"]
    assert clip.shape == (len(batch["x1"]), 24) and clip.dtype == torch.float32
    assert torch.allclose(clip.norm(dim=-1), torch.ones(len(clip)), atol=1e-5)
    tokens = {tuple(WordTokenizer()([line])[0][0].tolist()): line for line in lines}
    captions = [tokens[tuple(row.tolist())] for row in batch["cond"]["tokens"]]
    expected = large.clip.encode_text([lines[c] for c in captions])
    assert torch.allclose(clip, expected, atol=FP16), (clip - expected).abs().max()
    return captions


def folder_data(root: Path, cache: ClipCache | None, **kw) -> CaptionFolderData:
    args = {"tokenizer": WordTokenizer(), "image_size": 16, "batch_size": 2, "num_eval": 2, "num_workers": 0, **kw}
    return CaptionFolderData(str(root), clip_cache=cache, **args)


def wds_data(shards: Path, cache: ClipCache | None, **kw) -> WebDatasetData:  # noqa: F811
    args = {"tokenizer": WordTokenizer(), "image_size": 16, "batch_size": 2, "num_eval": 2, "num_workers": 0,
            "shuffle_buffer": 16, **kw}  # fmt: skip
    return WebDatasetData(str(shards / "{00000..00001}.tar"), clip_cache=cache, **args)


def shard_lines(shards: Path) -> dict[str, str]:  # noqa: F811
    import webdataset as wds

    samples = wds.tarfile_samples([{"url": str(p)} for p in sorted(shards.glob("*.tar"))])
    return {s["txt"].decode(): s["txt"].decode() for s in samples if "txt" in s}


# ---- precompute ----


def test_precompute_folder_writes_a_unit_norm_clip_file_per_captioned_image(cached_folder: Path, large: Tiny):
    files = sorted(cached_folder.rglob("*.clip"))
    assert [p.stem for p in files] == [f"img{i}" for i in (0, 2, 4, 6)] + [f"img{i}" for i in (1, 3, 5)]
    assert not (cached_folder / "lonely.clip").exists()  # no caption: the loader skips it too
    embedding, info = read_clip_file(cached_folder / "sub" / "img1.clip")
    assert embedding.dtype == torch.float16 and embedding.shape == (24,)
    assert info == CacheInfo(large.name, str(Path(large.weights).resolve()), 24, "text")
    expected = large.clip.encode_text(["two flowers in a vase"])[0]  # the first caption line
    assert torch.allclose(embedding.float(), expected, atol=FP16)


def test_precompute_folder_resumes_and_overwrites(folder: Path, large: Tiny, tmp_path: Path, capsys):
    root = tmp_path / "folder"
    shutil.copytree(folder, root)
    assert precompute("--folder", str(root), *large.args()) == 0
    assert "ok: 7 dz-tiny-ViT-L-14-e24 24-d text embeddings written, 0 already there" in capsys.readouterr().out
    (root / "img0.clip").unlink()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.clip")}
    assert precompute("--folder", str(root), *large.args()) == 0
    assert "ok: 1 dz-tiny-ViT-L-14-e24 24-d text embeddings written, 6 already there" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()) and (root / "img0.clip").is_file()
    assert not list(root.rglob("*.tmp"))
    assert precompute("--folder", str(root), *large.args(), "--overwrite") == 0
    assert "7 dz-tiny-ViT-L-14-e24 24-d text embeddings written" in capsys.readouterr().out


def test_precompute_refuses_to_mix_models_without_overwrite(cached_folder: Path, base: Tiny, tmp_path: Path, capsys):
    root = tmp_path / "folder"
    shutil.copytree(cached_folder, root)
    assert precompute("--folder", str(root), *base.args()) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "built with dz-tiny-ViT-L-14-e24 (24-d) but the configured CLIP model is dz-tiny-ViT-B-32-e16" in line
    assert line.endswith("pass --overwrite to rebuild the folder's .clip files")


def test_precompute_shards_writes_a_cache_per_model_and_resumes(shards: Path, cache_dir: Path, large: Tiny, capsys):  # noqa: F811
    root = shard_cache_root(cache_dir, large.name)
    meta = json.loads((root / METADATA).read_text())
    assert (meta["model_name"], meta["dim"], meta["source"]) == (large.name, 24, "text")
    assert {stem: s["count"] for stem, s in meta["shards"].items()} == {"00000": 7, "00001": 8}  # b04: no caption
    first = read_shard_file(root / "00000.safetensors")
    assert first.keys == [f"a{i:02d}" for i in range(7)] and first.embeddings.dtype == torch.float16
    expected = large.clip.encode_text([f"photo number {i} of a temple" for i in range(6)] + ["a watermarked photo"])
    assert torch.allclose(first.embeddings.float(), expected, atol=FP16)
    before = {p: p.stat().st_mtime_ns for p in root.iterdir()}
    argv = ["--shards", str(shards / "{00000..00001}.tar"), "--cache-dir", str(cache_dir), *large.args()]
    assert precompute(*argv) == 0
    assert "0 dz-tiny-ViT-L-14-e24 24-d text embeddings written for 0 shards, 2 shards already cached" in (
        capsys.readouterr().out
    )
    assert {p: p.stat().st_mtime_ns for p in root.iterdir()} == before


def test_precompute_image_embeddings_skip_corrupt_images(shards: Path, large: Tiny, tmp_path: Path, capsys):  # noqa: F811
    argv = ["--shards", str(shards / "00001.tar"), "--cache-dir", str(tmp_path), *large.args(), "--source", "image"]
    assert precompute(*argv) == 0
    assert "7 dz-tiny-ViT-L-14-e24 24-d image embeddings written for 1 shards" in capsys.readouterr().out
    cached = read_shard_file(shard_cache_root(tmp_path, large.name) / "00001.safetensors")
    assert cached.skipped == ["b03"] and "b05" not in cached.keys and cached.info.source == "image"
    assert "b04" in cached.keys  # an image without a caption still has an image embedding
    assert torch.allclose(cached.embeddings.float().norm(dim=-1), torch.ones(7), atol=FP16)
    assert validate("--shards", str(shards / "00001.tar"), "--cache-dir", str(tmp_path), "--model", large.name) == 0
    assert "samples skipped when precomputing (corrupt): 1" in capsys.readouterr().out


# ---- loaders ----


def test_caption_folder_batches_carry_the_cached_embeddings(cached_folder: Path, large: Tiny):
    data = folder_data(cached_folder, large.cache(on_miss="error"), num_workers=2)
    loader = data.train_loader(CPU, seed=0)
    lines, seen = first_lines(cached_folder), []
    for batch in loader:
        seen += check_clip(batch, large, lines)
    assert len(seen) == 4 and loader.stats["clip_miss"] == 0
    assert "CLIP cache misses 0" in loader.describe()


def test_webdataset_batches_carry_the_cached_embeddings(shards: Path, cache_dir: Path, large: Tiny):  # noqa: F811
    data = wds_data(shards, large.cache(dir=str(cache_dir), on_miss="error"), num_workers=2)
    loader = data.train_loader(CPU, seed=0)
    batches = list(loader)
    assert len(batches) == 3 and loader.stats["clip_miss"] == 0
    for batch in batches:
        check_clip(batch, large, shard_lines(shards))


def test_without_a_cache_batches_have_no_clip(cached_folder: Path):
    batch = next(iter(folder_data(cached_folder, None).train_loader(CPU, seed=0)))
    assert set(batch["cond"]) == {"tokens", "mask", "sizes"}


def test_misses_are_encoded_and_counted(cached_folder: Path, large: Tiny, tmp_path: Path):
    root = tmp_path / "folder"
    shutil.copytree(cached_folder, root)
    for i in (0, 1, 2):
        next(root.rglob(f"img{i}.clip")).unlink()
    data = folder_data(root, large.cache(on_miss="encode"))
    loader = data.train_loader(CPU, seed=0)
    lines, captions = first_lines(root), []
    for batch in loader:
        captions += check_clip(batch, large, lines)
    uncached = {"a red temple at dusk", "two flowers in a vase", "a second caption line", "a grey roof"}
    assert loader.stats["clip_miss"] == sum(c in uncached for c in captions) > 0
    assert f"CLIP cache misses {loader.stats['clip_miss']}" in loader.describe()


def test_webdataset_misses_in_an_uncached_shard_are_encoded(shards: Path, large: Tiny, tmp_path: Path):  # noqa: F811
    argv = ["--shards", str(shards / "00000.tar"), "--cache-dir", str(tmp_path), *large.args()]
    assert precompute(*argv) == 0
    loader = wds_data(shards, large.cache(dir=str(tmp_path))).train_loader(CPU, seed=0)
    captions = [c for batch in loader for c in check_clip(batch, large, shard_lines(shards))]
    assert loader.stats["clip_miss"] == sum(c.startswith("another flower") for c in captions) > 0


def test_on_miss_error_names_the_file_and_the_fix(cached_folder: Path, large: Tiny, tmp_path: Path):
    root = tmp_path / "folder"
    shutil.copytree(cached_folder, root)
    for path in root.rglob("*.clip"):
        if path.stem != "img3":
            path.unlink()
    loader = folder_data(root, large.cache(on_miss="error")).train_loader(CPU, seed=0)
    message = (
        r"no cached CLIP embedding for .*img\d\.clip .*on_miss=error; precompute them: python "
        r"scripts/precompute_clip.py --folder .* --model dz-tiny-ViT-L-14-e24 .*, "
        r"or set dataloaders.clip_cache.on_miss=encode"
    )
    with pytest.raises(ValueError, match=message) as info:
        list(loader)
    assert "\n" not in str(info.value)
    for path in root.rglob("*.clip"):
        path.unlink()
    fix = f"precompute them: python scripts/precompute_clip.py --folder {root} --model {large.name}"
    with pytest.raises(ValueError, match=f"no .clip file .* {re.escape(fix)}"):
        folder_data(root, large.cache(on_miss="error"))


def test_a_cache_of_another_model_is_refused(cached_folder: Path, shards: Path, cache_dir: Path, large: Tiny,  # noqa: F811
                                             base: Tiny, tmp_path: Path):  # fmt: skip
    message = (
        r"was built with dz-tiny-ViT-L-14-e24 \(24-d\) but the configured CLIP model is dz-tiny-ViT-B-32-e16 "
        r"\(16-d\); rebuild it: python scripts/precompute_clip.py "
    )
    with pytest.raises(ValueError, match=f"img0.clip {message}--folder .* --model dz-tiny-ViT-B-32-e16 .*--overwrite"):
        folder_data(cached_folder, base.cache())
    # a shard cache moved under the other model's name
    shutil.copytree(shard_cache_root(cache_dir, large.name), shard_cache_root(tmp_path, base.name))
    fix = f"{message}--shards .* --cache-dir {re.escape(str(tmp_path))} --model dz-tiny-ViT-B-32"
    with pytest.raises(ValueError, match=fix):
        wds_data(shards, base.cache(dir=str(tmp_path)))
    # the right model with other weights
    other = ClipCache(large.name, str(tiny_clip_weights(tmp_path, large.name, seed=1)))
    with pytest.raises(ValueError, match="weights .*-seed0.pt' but the configured ones are .*-seed1.pt'; rebuild"):
        folder_data(cached_folder, other)


def test_a_cache_of_the_wrong_dimension_is_refused(folder: Path, large: Tiny, tmp_path: Path):
    root = tmp_path / "folder"
    shutil.copytree(folder, root)
    write_clip_file(root / "img0.clip", torch.ones(16) / 4, CacheInfo(large.name, large.weights, 16))
    with pytest.raises(ValueError, match=r"built with dz-tiny-ViT-L-14-e24 \(16-d\) but the configured CLIP model "
                       r"is dz-tiny-ViT-L-14-e24 \(24-d\)"):  # fmt: skip
        folder_data(root, large.cache())
    save_file({"embedding": torch.ones(16, dtype=torch.float16)}, str(root / "img0.clip"),
              CacheInfo(large.name, large.weights, 24).metadata())  # fmt: skip
    with pytest.raises(ValueError, match=r"img0.clip holds a \(16,\) embedding but .* is 24-d; rebuild it"):
        folder_data(root, large.cache())


def test_embeddings_not_matching_their_keys_are_a_clear_error(shards: Path, cache_dir: Path, large: Tiny,  # noqa: F811
                                                             tmp_path: Path):  # fmt: skip
    shutil.copytree(cache_dir, tmp_path / "cache")
    root = shard_cache_root(tmp_path / "cache", large.name)
    cached = read_shard_file(root / "00001.safetensors")
    meta = {**cached.info.metadata(), "keys": json.dumps(cached.keys[:-1]), "skipped": "[]"}
    save_file({"embeddings": cached.embeddings}, str(root / "00001.safetensors"), meta)
    loader = wds_data(shards, large.cache(dir=str(tmp_path / "cache"))).train_loader(CPU, seed=0)
    with pytest.raises(ValueError, match=r"00001.safetensors holds 8 embeddings for 7 sample keys: a broken cache"):
        list(loader)
    assert validate("--shards", str(shards / "*.tar"), "--cache-dir", str(tmp_path / "cache"), "--model",
                    large.name) == 1  # fmt: skip


# ---- the validator ----


def test_validate_a_sound_folder_and_a_broken_one(cached_folder: Path, large: Tiny, base: Tiny, tmp_path: Path, capsys):
    assert validate("--folder", str(cached_folder), "--model", large.name, "--pretrained", large.weights) == 0
    out = capsys.readouterr().out
    assert "checked 7 images" in out and out.strip().endswith("ok: the cache is complete and fits the model")
    root = tmp_path / "folder"
    shutil.copytree(cached_folder, root)
    (root / "img0.clip").unlink()
    write_clip_file(root / "img2.clip", torch.full((24,), float("nan")), CacheInfo(large.name, large.weights, 24))
    (root / "orphan.clip").write_bytes((root / "img4.clip").read_bytes())
    assert validate("--folder", str(root), "--model", large.name) == 1
    out = capsys.readouterr().out
    assert "problem: images without .clip: 1" in out and str(root / "img0.jpg") in out
    assert "problem: NaN or inf: 1" in out and "note: .clip files without an image: 1" in out
    assert out.strip().endswith("FAILED: 2 problems")
    assert validate("--folder", str(cached_folder), "--model", base.name) == 1
    assert "problem: built for another model: 7" in capsys.readouterr().out


def test_validate_shards_against_the_samples(shards: Path, cache_dir: Path, large: Tiny, tmp_path: Path, capsys):  # noqa: F811
    argv = ["--shards", str(shards / "{00000..00001}.tar"), "--model", large.name]
    assert validate(*argv, "--cache-dir", str(cache_dir), "--source", "text") == 0
    assert "checked 2 shards" in capsys.readouterr().out
    shutil.copytree(cache_dir, tmp_path / "cache")
    root = shard_cache_root(tmp_path / "cache", large.name)
    cached = read_shard_file(root / "00000.safetensors")
    meta = {**cached.info.metadata(), "keys": json.dumps(cached.keys[1:]), "skipped": "[]"}
    save_file({"embeddings": cached.embeddings[1:]}, str(root / "00000.safetensors"), meta)
    listing = json.loads((root / METADATA).read_text())
    del listing["shards"]["00001"]
    (root / METADATA).write_text(json.dumps(listing))
    assert validate(*argv, "--cache-dir", str(tmp_path / "cache")) == 1
    out = capsys.readouterr().out
    assert "problem: samples without embeddings: 1" in out and "00000.tar key a00" in out
    assert "problem: counts not matching metadata.json: 1" in out
    assert "problem: shards not cached (or not listed in metadata.json): 1" in out
    assert validate(*argv, "--cache-dir", str(tmp_path / "missing")) == 1
    assert "problem: no metadata.json: 1" in capsys.readouterr().out
    assert validate("--folder", str(tmp_path / "nope"), "--model", large.name) == 2


# ---- eval_batch and the configs ----


def test_eval_batch_holds_the_held_out_pairs(cached_folder: Path, shards: Path, cache_dir: Path, large: Tiny):  # noqa: F811
    data = folder_data(cached_folder, large.cache(on_miss="error"), low_res_size=8, num_eval=3)
    batch = data.eval_batch(CPU)
    assert torch.equal(batch["x1"], data.eval_set) and batch["x1"].shape == (3, 3, 16, 16)
    assert batch["cond"]["tokens"].shape == (3, 16) and batch["cond"]["mask"].dtype == torch.bool
    assert batch["cond"]["low_res"].shape == (3, 3, 8, 8)
    assert torch.allclose(batch["cond"]["clip"], large.clip.encode_text(data.eval_captions), atol=FP16)
    plain = folder_data(cached_folder, None).eval_batch(CPU)
    assert set(plain["cond"]) == {"tokens", "mask", "sizes"} and plain["x1"].shape == (2, 3, 16, 16)
    shard_data = wds_data(shards, large.cache(dir=str(cache_dir), on_miss="error"))
    batch = shard_data.eval_batch(CPU)
    assert shard_data.eval_captions == ["photo number 0 of a temple", "photo number 1 of a temple"]
    assert torch.allclose(batch["cond"]["clip"], large.clip.encode_text(shard_data.eval_captions), atol=FP16)
    assert set(wds_data(shards, None).eval_batch(CPU)["cond"]) == {"tokens", "mask", "sizes"}


def test_the_documented_config_node_builds_the_cache_and_its_encoder(make_cfg, folder: Path, large: Tiny):
    node = (
        f"{{_target_: dataloaders.clip_cache.ClipCache, model_name: {large.name}, pretrained: '{large.weights}', "
        "on_miss: encode, encoder: {_target_: adapters.clip_encoder.FrozenClip, _partial_: true, "
        "model_name: '${..model_name}', pretrained: '${..pretrained}'}}"
    )
    cfg = make_cfg("dataloaders=captions", f"dataloaders.root={folder}", *STAND_IN, f"dataloaders.clip_cache={node}")
    data = instantiate(cfg.dataloaders)
    assert isinstance(data.clip_cache, ClipCache) and data.clip_cache.dim == 24
    batch = next(iter(data.train_loader(CPU, seed=0)))  # nothing cached: encoded by the configured encoder
    check_clip(batch, large, first_lines(folder))
    assert make_cfg("dataloaders=webdataset", "dataloaders.urls=x").dataloaders.clip_cache is None


def test_image_embeddings_load_and_image_misses_encode_the_crops(folder: Path, large: Tiny, tmp_path: Path):
    root = tmp_path / "folder"
    shutil.copytree(folder, root)
    assert precompute("--folder", str(root), *large.args(), "--source", "image") == 0
    (root / "img0.clip").unlink()
    with pytest.raises(ValueError, match="holds image embeddings but dataloaders.clip_cache.source=text"):
        folder_data(root, large.cache())
    loader = folder_data(root, large.cache(source="image"), num_eval=0, batch_size=7).train_loader(CPU, seed=0)
    (batch,) = list(loader)  # every pair, img0 among them
    assert loader.stats["clip_miss"] == 1
    assert torch.allclose(batch["cond"]["clip"].norm(dim=-1), torch.ones(7), atol=1e-5)
    image = clip_input(load_image(root / "sub" / "img1.jpg"), large.clip.transform)  # (3, 28, 28)
    embedding, _ = read_clip_file(root / "sub" / "img1.clip")
    direct = large.clip.encode_image(image[None].float() / 127.5 - 1)
    assert image.shape == (3, 28, 28) and torch.allclose(embedding.float(), direct[0], atol=FP16)
