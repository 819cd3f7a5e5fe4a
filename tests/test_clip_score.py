"""CLIP score on a tiny open_clip model, built offline and trained for a few steps to tell four
flat colours apart, so that matching prompts mean something."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import Tensor

from adapters.open_clip_loader import CLIPImageTransform
from evaluation.clip_score import (
    CLIPScore,
    CLIPScoreError,
    CLIPWeightsNotFoundError,
    clip_score,
    load_clip_scorer,
    read_prompts,
)

TINY = "dz-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}
PROMPTS = [f"a {name} image" for name in COLOURS]


def flat_images(n_per_class: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """(4 n, 3, H, W): class ``i % 4`` at index i, flat colour plus a little noise, quantised to uint8."""
    rgb = torch.tensor(list(COLOURS.values())).repeat(n_per_class, 1)  # (4 n, 3)
    x = rgb[:, :, None, None] + 0.05 * torch.randn(len(rgb), 3, *size, generator=generator)
    return (x.clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These matmuls are tiny: on a busy 2-core machine two threads mostly wait for each other
    (measured: 60 training steps 2-70 s with two threads, 0.6 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> CLIPScore:
    """The tiny model, registered under ``TINY``, after 60 contrastive steps on the four colours."""
    config = tmp_path_factory.mktemp("clip_config") / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    transform = CLIPImageTransform.from_model(model)
    tokens = open_clip.get_tokenizer(TINY)(PROMPTS)
    loss_fn = open_clip.ClipLoss()
    model.token_embedding.requires_grad_(False)  # 49408 x 64 rows, 4 prompts: not worth the updates
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        image_features = model.encode_image(transform(flat_images(1, (32, 32), g)), normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return CLIPScore(model, transform, open_clip.get_tokenizer(TINY))


def test_clip_score_is_100_times_the_cosine_clamped_at_zero():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 3**0.5], [0.0, 5.0], [-1.0, 0.0]])  # cos 1, 1/2, 0, -1
    assert torch.allclose(clip_score(a, b), torch.tensor([100.0, 50.0, 0.0, 0.0]))


def test_scores_are_per_pair_finite_and_in_range(tiny: CLIPScore):
    images = flat_images(3, (40, 48), torch.Generator().manual_seed(1))  # resized and cropped to 32
    scores = tiny.score_images(images, PROMPTS * 3, batch_size=5)
    assert scores.shape == (12,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 100).all()


def test_matching_prompts_score_higher_than_shuffled_ones(tiny: CLIPScore):
    images = flat_images(4, (32, 32), torch.Generator().manual_seed(2))
    matching = tiny.score_images(images, PROMPTS * 4)
    shuffled = tiny.score_images(images, (PROMPTS[1:] + PROMPTS[:1]) * 4)
    per_class = matching.view(4, 4).mean(0), shuffled.view(4, 4).mean(0)
    assert (per_class[0] > per_class[1] + 10).all()
    assert torch.equal(tiny.score_images(images, PROMPTS * 4), matching)


def test_batch_size_does_not_change_scores(tiny: CLIPScore):
    images = flat_images(2, (32, 32), torch.Generator().manual_seed(3))
    one = tiny.score_images(images, PROMPTS * 2, batch_size=3)
    assert torch.allclose(one, tiny.score_images(images, PROMPTS * 2, batch_size=64), atol=1e-4)


def test_grayscale_images_score_as_their_rgb_copies(tiny: CLIPScore):
    gray = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(tiny.score_images(gray, PROMPTS), tiny.score_images(gray.repeat(1, 3, 1, 1), PROMPTS))


def test_bad_image_shapes_and_prompt_counts_are_clear_errors(tiny: CLIPScore):
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(CLIPScoreError, match="4 images but 3 prompts"):
        tiny.score_images(images, PROMPTS[:3])
    with pytest.raises(CLIPScoreError, match=r"\(N, 1 or 3, H, W\)"):
        tiny.score_images(torch.rand(4, 2, 32, 32), PROMPTS)


@pytest.mark.parametrize("height, width, size", [(60, 80, 32), (80, 60, 32), (37, 53, 64)])
def test_tensor_preprocessing_matches_open_clips_pil_pipeline(height: int, width: int, size: int):
    transform = CLIPImageTransform(size=(size, size), mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
    pil = image_transform_v2(PreprocessCfg(size=size, mean=transform.mean, std=transform.std), is_train=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([xx, yy, xx * yy])  # smooth, so resampling kernels barely differ
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    expected = pil(Image.fromarray(array))
    ours = transform(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)[0]
    assert ours.shape == expected.shape == (3, size, size)
    # about one uint8 step (1/255 / std ~ 0.015): PIL rounds its resized pixels to uint8
    assert (ours - expected).abs().mean() < 0.01 and (ours - expected).abs().max() < 0.05


def write_pngs(folder: Path, images: Tensor, first: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images, start=first):
        array = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / f"{i:06d}.png")


def test_score_folder_matches_score_images_with_grayscale_samples(tiny: CLIPScore, tmp_path: Path):
    g = torch.Generator().manual_seed(5)
    rgb = flat_images(2, (32, 32), g)  # samples 0..7
    gray = (torch.rand(3, 1, 40, 40, generator=g) * 255).round() / 255  # samples 8..10, another size
    write_pngs(tmp_path, rgb)
    write_pngs(tmp_path, gray, first=8)
    (tmp_path / "grid.png").write_bytes((tmp_path / "000000.png").read_bytes())  # not a sample: ignored
    prompts = PROMPTS[:3]  # sample i goes with prompt i % 3
    mean, count = tiny.score_folder(tmp_path, prompts, batch_size=4)
    direct = torch.cat(
        [
            tiny.score_images(rgb, [prompts[i % 3] for i in range(8)]),
            tiny.score_images(gray, [prompts[i % 3] for i in range(8, 11)]),
        ]
    )
    assert count == 11
    assert mean == pytest.approx(direct.mean().item(), abs=1e-3)


def test_score_folder_errors(tiny: CLIPScore, tmp_path: Path):
    with pytest.raises(CLIPScoreError, match="does not exist"):
        tiny.score_folder(tmp_path / "missing", PROMPTS)
    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")
    with pytest.raises(CLIPScoreError, match="no numbered PNG samples"):
        tiny.score_folder(tmp_path, PROMPTS)
    write_pngs(tmp_path, torch.rand(1, 3, 8, 8))
    with pytest.raises(CLIPScoreError, match="no prompts"):
        tiny.score_folder(tmp_path, [])


def test_load_clip_scorer_from_a_local_weights_file_scores_like_the_model_in_memory(tiny: CLIPScore, tmp_path: Path):
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(tiny.model.state_dict(), weights)
    loaded = load_clip_scorer(TINY, pretrained=str(weights))
    images = flat_images(2, (36, 36), torch.Generator().manual_seed(6))
    assert loaded.preprocess == tiny.preprocess
    assert torch.allclose(loaded.score_images(images, PROMPTS * 2), tiny.score_images(images, PROMPTS * 2), atol=1e-5)


def test_a_pretrained_tag_brings_its_preprocessing_and_quick_gelu(
    tiny: CLIPScore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    weights = tmp_path / "weights.bin"
    torch.save(tiny.model.state_dict(), weights)
    tag = {"file": str(weights), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"local": {**tag, "quick_gelu": True}})
    loaded = load_clip_scorer(TINY, pretrained="local")
    assert loaded.preprocess == CLIPImageTransform((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "squash")
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_missing_local_weights_file_is_a_one_line_error(tiny: CLIPScore, tmp_path: Path):
    with pytest.raises(CLIPWeightsNotFoundError, match="no such file") as info:
        load_clip_scorer(TINY, pretrained=str(tmp_path / "nope.bin"))
    assert "nope.bin" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_pretrained_tag_missing_offline_fails_fast_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    start = time.perf_counter()
    with pytest.raises(CLIPWeightsNotFoundError) as info:
        load_clip_scorer("ViT-B-32", "openai", cache_dir=str(tmp_path))  # an empty cache
    message = str(info.value)
    assert time.perf_counter() - start < 5
    assert "\n" not in message
    for part in ("ViT-B-32/openai", "pretrained=/path/to/open_clip_pytorch_model.bin", "HF_HUB_OFFLINE"):
        assert part in message


def test_unknown_model_is_a_clear_error():
    with pytest.raises(CLIPScoreError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip_scorer("ViT-Q-99")


def test_read_prompts(tmp_path: Path):
    path = tmp_path / "prompts.txt"
    path.write_text("# prompts for the tests\na red image\n\n   \n  a blue image  \n#a comment\nan # inside\n")
    assert read_prompts(path) == ["a red image", "a blue image", "an # inside"]


def test_read_prompts_errors(tmp_path: Path):
    with pytest.raises(CLIPScoreError, match="missing.txt does not exist"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    with pytest.raises(CLIPScoreError, match="empty.txt holds no prompts"):
        read_prompts(empty)
