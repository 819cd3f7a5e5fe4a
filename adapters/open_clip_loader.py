"""Loading open_clip models by name and weights, and their image preprocessing on tensors, shared by
the CLIP adapter, its embedding cache and the CLIP score.

``pretrained`` is an open_clip tag (from the Hugging Face hub when online, its cache offline) or a
local weights file; there is no silent fallback to random weights. The embedding width is read
from the model itself (a probe through its text tower), never from a table: ViT-B-32 gives 512,
ViT-L-14 768, RN50 1024.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

log = logging.getLogger(__name__)

ClipModel: TypeAlias = "open_clip.CLIP | open_clip.CustomTextCLIP"


class ClipModelError(ValueError):
    """A CLIP model that cannot be built: an unknown name, or image preprocessing we do not reproduce."""


class ClipWeightsNotFoundError(ClipModelError):
    """The weights asked for are neither a local file nor obtainable from the hub (or its cache)."""


class ClipInputError(ValueError):
    """Images a CLIP model cannot take (wrong shape)."""


def check_model_name(model_name: str) -> None:
    """One line naming the closest open_clip models when ``model_name`` is unknown."""
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name.replace("/", "-"), known, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "open_clip.list_models() lists the known ones"
        raise ClipModelError(f"unknown open_clip model {model_name!r}; {hint}")


def cache_name(model_name: str) -> str:
    """The folder name of a model's embedding cache: ``ViT-L/14`` -> ``ViT-L-14``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-")


def embedding_dim(model: ClipModel, model_name: str) -> int:
    """The width of ``model``'s joint embedding, from one forward of its text tower on an empty caption."""
    tokens = open_clip.get_tokenizer(model_name)([""]).to(next(model.parameters()).device)
    with torch.no_grad():
        return int(model.encode_text(tokens).shape[-1])


def architecture_dim(model_name: str) -> int:
    """The embedding width of ``model_name``'s architecture, built on the meta device: no weights are
    read and no memory is spent, so a model config can know it before any CLIP is loaded."""
    check_model_name(model_name)
    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, load_weights=False, device="meta")
        return embedding_dim(cast(ClipModel, model), model_name)


def load_open_clip(
    model_name: str, pretrained: str, device: str | torch.device = "cpu", cache_dir: str | None = None
) -> ClipModel:
    """An open_clip model with pretrained weights, in eval mode on ``device``.

    A tag's QuickGELU setting is applied (OpenAI weights need it; open_clip only warns). A local file of
    OpenAI weights needs the ``-quickgelu`` model name (``ViT-B-32-quickgelu``).
    """
    check_model_name(model_name)
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag:
        _fetch_tag(model_name, pretrained, tag, cache_dir)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise ClipWeightsNotFoundError(
                f"CLIP weights {pretrained!r} for {model_name}: no such file, and not a pretrained tag of "
                f"{model_name} (its tags: {tags})"
            )
        pretrained = str(path)
    model = open_clip.create_model(
        model_name,
        pretrained=pretrained,
        device=device,
        force_quick_gelu=bool(tag.get("quick_gelu", False)),
        cache_dir=cache_dir,
        require_pretrained=True,
    )
    log.info("CLIP model %s (%s) on %s", model_name, pretrained, device)
    return cast(ClipModel, model.eval())


def _fetch_tag(model_name: str, pretrained: str, tag: dict[str, Any], cache_dir: str | None) -> None:
    """Puts the tag's weights in the hub cache (a cache hit when they are there), turning open_clip's
    unhelpful failure offline into a one-line error; ``create_model`` then loads from the cache."""
    try:
        open_clip.download_pretrained(tag, cache_dir=cache_dir)
    except FileNotFoundError as err:  # what open_clip raises when the hub download fails
        raise ClipWeightsNotFoundError(
            f"CLIP weights {model_name}/{pretrained} are not in the local Hugging Face cache and could not be "
            "downloaded (offline?): pass a local weights file (pretrained=/path/to/open_clip_pytorch_model.bin) "
            "or run once online, with HF_HUB_OFFLINE unset, so the hub cache fills"
        ) from err


@dataclass(frozen=True)
class CLIPImageTransform:
    """open_clip's inference preprocessing on (N, C, H, W) tensors in [0, 1]: resize (shortest side
    to the target, then center crop; or ``squash`` to the target), clamp, normalise.

    Working on tensors keeps generated images on the device, without a PIL round trip.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash"):
            raise ClipModelError(f"CLIP preprocessing resize_mode {self.resize_mode!r} is not supported")

    @classmethod
    def from_model(cls, model: nn.Module) -> CLIPImageTransform:
        """The config open_clip attached to ``model.visual`` (open_clip's defaults where missing)."""
        cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
        size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)
        return cls((int(size[0]), int(size[1])), tuple(cfg.mean), tuple(cfg.std), cfg.interpolation, cfg.resize_mode)

    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ClipInputError(f"expected images as (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        images = images.float().expand(-1, 3, -1, -1)  # grayscale -> RGB, as PIL's convert("RGB")
        (h, w), (th, tw) = images.shape[-2:], self.size
        if self.resize_mode == "squash":
            resized = [th, tw]
        elif th / h >= tw / w:  # height is the shortest side relative to the target: fit it exactly
            resized = [th, max(tw, int(w * th / h))]  # int() rounds down, as torchvision's Resize(size)
        else:
            resized = [max(th, int(h * tw / w)), tw]
        mode = InterpolationMode(self.interpolation)
        images = TF.resize(images, resized, interpolation=mode, antialias=True)
        images = TF.center_crop(images, [th, tw]).clamp(0, 1)  # bicubic overshoots; PIL clips to uint8
        return TF.normalize(images, list(self.mean), list(self.std))
