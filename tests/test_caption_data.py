"""Captioned-image data: shared preprocessing, a caption folder, WebDataset shards (LAION-style)."""

from __future__ import annotations

import io
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from PIL import Image
from sklearn.datasets import load_sample_images

from dataloaders.caption_preprocess import Preprocess, random_center_crop, to_rgb, trim_white_padding
from dataloaders.captions import CaptionFolderData
from dataloaders.webdataset import WebDatasetData

torch.set_num_threads(2)
CPU = torch.device("cpu")
CTX = 16


class WordTokenizer:
    """Stand-in for a real tokenizer: one id per lower-cased word, hashed into 1000 ids, context 16."""

    def __init__(self, vocab_dir: str | None = None, text_ctx: int = CTX) -> None:  # GlideTokenizer's arguments
        assert text_ctx == CTX
        self.truncated = 0

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.zeros(len(captions), CTX, dtype=torch.long)
        mask = torch.zeros(len(captions), CTX, dtype=torch.bool)
        for i, caption in enumerate(captions):
            ids = [zlib.crc32(w.encode()) % 999 + 1 for w in caption.lower().split()]
            if len(ids) > CTX:
                self.truncated += 1
                ids = ids[:CTX]
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = True
        return tokens, mask


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(a) for a in load_sample_images().images]  # china, flower: 640x427 RGB


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pad_white(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    canvas = Image.new("RGB", (image.width + left + right, image.height + top + bottom), (255, 255, 255))
    canvas.paste(image, (left, top))
    return canvas


def variants(photos: list[Image.Image]) -> list[Image.Image]:
    """Eleven images from the two photos: crops, resizes, a padded one, grey, RGBA, palette."""
    china, flower = photos
    return [
        china,
        flower.resize((320, 214)),
        china.crop((100, 50, 400, 350)),
        flower.crop((200, 0, 500, 427)).resize((150, 213)),
        pad_white(china.crop((200, 100, 360, 260)), 40, 10, 40, 10),
        china.convert("L").resize((300, 200)),
        flower.convert("RGBA").resize((240, 160)),
        flower.resize((20, 24)),  # smaller than image_size=32: upscaled and counted
        china.quantize(64).resize((200, 180)),
        flower.crop((0, 0, 427, 427)).resize((128, 128)),
        china.rotate(90, expand=True).resize((160, 240)),
    ]


GOOD_META = {"width": 400, "height": 300, "pwatermark": 0.1, "punsafe": 0.01, "similarity": 0.33}


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> Path:
    """00000.tar: 6 usable samples (the 20x24 one 4th) + 1 filtered (watermark);
    00001.tar: 3 usable, 1 corrupt image, 1 without caption, 1 without image, 3 filtered."""
    root = tmp_path_factory.mktemp("shards")
    images = variants(photos)

    def sample(key: str, image: Image.Image, caption: str, **meta: float) -> dict:
        fmt = "PNG" if image.mode != "RGB" or key.endswith("png") else "JPEG"
        return {"__key__": key, "jpg": encode(image, fmt), "txt": caption, "json": {**GOOD_META, **meta}}

    with wds.TarWriter(str(root / "00000.tar")) as w:
        for i in range(6):
            w.write(sample(f"a{i:02d}", images[i + 2 if i >= 3 else i], f"photo number {i} of a temple"))
        w.write(sample("a06", images[0], "a watermarked photo", pwatermark=0.9))
    with wds.TarWriter(str(root / "00001.tar")) as w:
        for i, image in enumerate(images[8:11]):
            w.write(sample(f"b{i:02d}", image, f"another flower picture {i}"))
        w.write({"__key__": "b03", "jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": "corrupt", "json": GOOD_META})
        w.write({"__key__": "b04", "jpg": encode(images[1]), "json": GOOD_META})  # no caption
        w.write({"__key__": "b05", "txt": "a caption without its image", "json": GOOD_META})
        w.write(sample("b06", images[2], "an unsafe photo", punsafe=0.95))
        w.write(sample("b07", images[3], "an off-topic photo", similarity=0.05))
        w.write(sample("b08", images[9], "a panorama", width=900, height=300))
    return root


def wds_data(shards: Path, **kw) -> WebDatasetData:
    args = {"urls": str(shards / "{00000..00001}.tar"), "tokenizer": WordTokenizer(), "image_size": 32,
            "batch_size": 2, "num_workers": 0, "num_eval": 2, "shuffle_buffer": 16, **kw}  # fmt: skip
    return WebDatasetData(**args)


def check_batch(batch: dict, size: int, low: int | None = None, uncond: bool = False) -> None:
    x, cond = batch["x1"], batch["cond"]
    assert x.shape == (2, 3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    assert cond["tokens"].shape == (2, CTX) and cond["tokens"].dtype == torch.long
    assert cond["mask"].shape == (2, CTX) and cond["mask"].dtype == torch.bool
    assert cond["mask"].any() != uncond
    if low is None:
        assert "low_res" not in cond
    else:
        assert cond["low_res"].shape == (2, 3, low, low) and cond["low_res"].dtype == torch.float32
        assert cond["low_res"].min() >= -1 and cond["low_res"].max() <= 1


# ---- preprocessing ----


def test_trim_white_padding_recovers_the_content_box_at_full_resolution():
    content = Image.fromarray(np.random.default_rng(0).integers(0, 200, (200, 300, 3), dtype=np.uint8))
    padded = np.asarray(pad_white(content, 50, 20, 10, 35)).copy()
    padded[:20] = 250  # near-white, as JPEG leaves it
    trimmed = trim_white_padding(Image.fromarray(padded))
    assert trimmed.size == (300, 200)
    assert np.array_equal(np.asarray(trimmed), np.asarray(content))
    assert trim_white_padding(content) is content  # nothing to trim
    white = Image.new("RGB", (10, 10), (255, 255, 255))
    assert trim_white_padding(white).size == (10, 10)


def test_preprocess_trims_before_resizing(photos):
    content = photos[1].crop((100, 50, 400, 350))  # 300x300, no white rows
    padded = pad_white(content, 200, 150, 250, 100)
    prep = Preprocess(image_size=32).centred()
    out, _, upscaled, _ = prep(padded, random.Random(0))
    near_white = out.permute(1, 2, 0).numpy().min(axis=2) >= 245  # (32, 32)
    assert not near_white[0].all() and not near_white[-1].all()
    assert not near_white[:, 0].all() and not near_white[:, -1].all()
    reference, _, _, _ = prep(content, random.Random(0))
    assert torch.equal(out, reference) and not upscaled  # as if there had been no padding
    # the wrong order (resize, then trim) cannot find the border any more and keeps blurred padding
    small = trim_white_padding(padded.resize((32, 32), Image.Resampling.BICUBIC))
    wrong = np.asarray(small.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(wrong - reference.permute(1, 2, 0).numpy()).mean() > 10


def test_random_center_crop_is_square_near_the_centre_and_seeded(photos):
    crops = [random_center_crop(photos[0], random.Random(s), min_scale=0.8, jitter=0.1) for s in range(20)]
    assert all(c.width == c.height and 341 <= c.width <= 427 for c in crops)
    assert len({c.size for c in crops}) > 1
    again = random_center_crop(photos[0], random.Random(3), min_scale=0.8, jitter=0.1)
    assert np.array_equal(np.asarray(again), np.asarray(crops[3]))
    centre = random_center_crop(photos[0], random.Random(0), min_scale=1.0, jitter=0.0)
    assert np.array_equal(np.asarray(centre), np.asarray(photos[0].crop((106, 0, 533, 427))))


def test_grey_rgba_and_palette_become_rgb(photos):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(rgba).mode == "RGB" and to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    assert to_rgb(photos[0].convert("L")).mode == "RGB" and to_rgb(photos[0].quantize(16)).mode == "RGB"
    with pytest.raises(ValueError, match="low_res_size=64 must be below image_size=64"):
        Preprocess(image_size=64, low_res_size=64)


# ---- caption folder ----


@pytest.fixture
def caption_folder(photos, tmp_path) -> Path:
    """8 pairs (3 with captions over 16 words, one empty, one a corrupt image), one image without .txt."""
    root = tmp_path / "captions"
    images = variants(photos)
    for i in range(8):
        folder = root / ("sub" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if images[i].mode != "RGB" else ".jpg"
        (folder / f"img{i}{suffix}").write_bytes(encode(images[i], "PNG" if suffix == ".png" else "JPEG"))
        words = 20 if i in (1, 3, 5) else 3
        caption = "" if i == 6 else " ".join(f"word{j}" for j in range(words))
        (folder / f"img{i}.txt").write_text(caption + ("\nsecond caption line" if i == 0 else ""))
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "broken.txt").write_text("a broken file")
    (root / "lonely.webp").write_bytes(encode(images[0], "WEBP"))
    return root


def test_caption_folder_pairs_batches_and_counts(caption_folder):
    tokenizer = WordTokenizer()
    data = CaptionFolderData(str(caption_folder), tokenizer, image_size=32, batch_size=2, num_eval=3)
    assert data.counts["images"] == 10 and data.counts["missing_caption"] == 1 and data.counts["empty_caption"] == 1
    assert len(data.train_pairs) == 9 - 3 and data.shape == (3, 32, 32) and data.num_classes == 0
    assert data.eval_set.shape[1:] == (3, 32, 32) and len(data.eval_captions) == len(data.eval_set) >= 2
    assert data.eval_low_res is None and data.eval_set.min() >= -1 and data.eval_set.max() <= 1
    loader = data.train_loader(CPU, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    for batch in batches:
        check_batch(batch, 32)
    long_ones = sum(len(text.split()) > CTX for _, text in data.train_pairs)
    assert loader.stats["truncated"] == tokenizer.truncated == long_ones
    assert loader.stats["corrupt"] == sum(p.name == "broken.jpg" for p, _ in data.train_pairs)


def test_caption_folder_order_is_a_function_of_seed_and_epoch(caption_folder):
    def epoch(seed: int, e: int) -> list[torch.Tensor]:
        data = CaptionFolderData(str(caption_folder), WordTokenizer(), image_size=16, batch_size=2, num_eval=3)
        loader = data.train_loader(CPU, seed=seed)
        loader.set_epoch(e)
        return [b["x1"] for b in loader]

    first = epoch(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0, 1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch(0, 2), strict=True))


def test_caption_folder_upsampler_test_run_and_workers(caption_folder):
    data = CaptionFolderData(str(caption_folder), WordTokenizer(), image_size=32, low_res_size=8, batch_size=2,
                             num_eval=2, test_run=4, num_workers=2, uncond_p=1.0)  # fmt: skip
    assert len(data.train_pairs) == 4 and data.eval_low_res is not None and data.eval_low_res.shape[1:] == (3, 8, 8)
    loader = data.train_loader(CPU, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    for batch in batches:
        check_batch(batch, 32, low=8, uncond=True)
        assert torch.equal(batch["cond"]["tokens"], torch.zeros(2, CTX, dtype=torch.long))  # uncond_p=1: ""
    assert loader.stats["seen"] >= 4


def test_caption_folder_errors_name_the_fix(photos, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* put name.jpg \\+ name.txt pairs there"):
        CaptionFolderData(str(tmp_path / "empty"), WordTokenizer())
    (tmp_path / "bare").mkdir()
    photos[0].save(tmp_path / "bare" / "a.jpg")
    with pytest.raises(ValueError, match="has a caption file; add name.txt next to each name.jpg"):
        CaptionFolderData(str(tmp_path / "bare"), WordTokenizer())
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        CaptionFolderData(str(tmp_path / "missing"), WordTokenizer())


# ---- WebDataset shards ----


def test_webdataset_batches_and_skips_are_counted(shards):
    data = wds_data(shards)
    assert data.shards == [str(shards / "00000.tar"), str(shards / "00001.tar")]
    assert data.eval_set.shape == (2, 3, 32, 32) and data.eval_captions == [
        "photo number 0 of a temple",
        "photo number 1 of a temple",
    ]
    loader = data.train_loader(CPU, seed=0)
    assert len(loader) == 2 * 10000 // 2  # shards x wds_tar_size // batch_size: an estimate
    batches = list(loader)
    for batch in batches:
        check_batch(batch, 32)
    # 16 samples - 2 held out = 14 read: 7 usable (3 batches + 1 left over), the rest skipped
    stats = loader.stats
    assert (stats["seen"], stats["corrupt"], stats["missing_caption"], stats["missing_image"]) == (14, 1, 1, 1)
    assert stats["filtered"] == 4 and stats["upscaled"] == 1 and len(batches) == 3


def test_webdataset_counts_from_workers_match_and_no_filter_keeps_the_filtered(shards):
    loader = wds_data(shards, num_workers=2).train_loader(CPU, seed=0)
    batches = list(loader)
    assert loader.stats["corrupt"] == 1 and loader.stats["missing_caption"] == 1 and loader.stats["filtered"] == 4
    assert loader.stats["seen"] == 14 and len(batches) == 2 + 1  # 4 usable in one worker, 3 in the other
    unfiltered = wds_data(shards, laion_no_filter=True).train_loader(CPU, seed=0)
    batches = list(unfiltered)
    assert unfiltered.stats["filtered"] == 0 and unfiltered.stats["corrupt"] == 1 and len(batches) == 11 // 2


def test_webdataset_upsampler_resampled_and_test_run(shards):
    data = wds_data(shards, image_size=32, low_res_size=8, resampled=True, wds_tar_size=4)
    assert data.eval_low_res is not None and data.eval_low_res.shape == (2, 3, 8, 8)
    loader = data.train_loader(CPU, seed=0)
    assert len(loader) == 2 * 4 // 2
    for e in range(2):
        loader.set_epoch(e)
        batches = list(loader)
        assert len(batches) == 4  # a resampled stream never ends: an epoch is len(loader) batches
        for batch in batches:
            check_batch(batch, 32, low=8)
    smoke = wds_data(shards, test_run=3).train_loader(CPU, seed=0)
    assert len(smoke) == 1 and len(list(smoke)) == 1 and smoke.stats["seen"] <= 5


def test_webdataset_is_deterministic_under_a_seed(shards):
    def epoch(seed: int, e: int) -> list[torch.Tensor]:
        loader = wds_data(shards).train_loader(CPU, seed=seed)
        loader.set_epoch(e)
        return [torch.cat([b["x1"].flatten(), b["cond"]["tokens"].flatten().float()]) for b in loader]

    first = epoch(0, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0, 0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch(0, 1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch(1, 0), strict=True))


def test_webdataset_urls_folder_glob_and_a_pattern_matching_nothing(shards, tmp_path):
    assert len(wds_data(shards, urls=str(shards)).shards) == 2
    assert len(wds_data(shards, urls=str(shards / "*.tar")).shards) == 2
    pattern = str(tmp_path / "laion" / "{00000..00099}.tar")
    with pytest.raises(ValueError, match=r"laion/\{00000..00099\}.tar' matches no .tar shard"):
        wds_data(shards, urls=pattern)
    with pytest.raises(ValueError, match="matches no .tar shard"):
        wds_data(shards, urls=str(tmp_path))


def test_a_resampled_stream_that_filters_everything_ends_with_an_error_naming_the_fix(shards):
    loader = wds_data(shards, resampled=True, min_similarity=0.99, num_eval=0).train_loader(CPU, seed=0)
    with pytest.raises(ValueError, match="made no batch of 2 .* loosen the filters"):
        list(loader)
    assert loader.stats["filtered"] > 10 and loader.stats["missing_caption"] > 1


# the stand-in replaces GlideTokenizer (models/), which needs GPT-2's vocabulary
STAND_IN = ["dataloaders.tokenizer._target_=tests.test_caption_data.WordTokenizer",
            f"dataloaders.tokenizer.text_ctx={CTX}", "dataloaders.num_workers=0", "dataloaders.image_size=16",
            "dataloaders.batch_size=2", "dataloaders.num_eval=2"]  # fmt: skip


def test_the_configs_instantiate(make_cfg, shards, caption_folder):
    cfg = make_cfg("dataloaders=webdataset", f"dataloaders.urls={shards}", *STAND_IN)
    assert cfg.dataloaders.min_width == 16  # follows image_size
    data = instantiate(cfg.dataloaders)
    assert isinstance(data, WebDatasetData) and data.shape == (3, 16, 16) and data.num_classes == 0
    check_batch(next(iter(data.train_loader(CPU, seed=0))), 16)
    data = instantiate(make_cfg("dataloaders=captions", f"dataloaders.root={caption_folder}", *STAND_IN).dataloaders)
    assert isinstance(data, CaptionFolderData) and type(data.tokenizer).__name__ == "WordTokenizer"
