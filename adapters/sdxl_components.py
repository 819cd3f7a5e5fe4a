"""SDXL's parts from a diffusers folder, a single ``.safetensors`` checkpoint or a hub id.

Everything is diffusers' and transformers' own classes (``UNet2DConditionModel``, ``AutoencoderKL``,
CLIP-L's ``CLIPTextModel``, OpenCLIP-G's ``CLIPTextModelWithProjection``, two ``CLIPTokenizer``s and
the scheduler); this module only checks the source first, so a wrong path fails in one line that
names what is missing instead of deep inside ``from_pretrained``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    SchedulerMixin,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SDXLWeightsError(ValueError):
    """The weights source is not a usable SDXL (the message names what is wrong and the fix)."""


@dataclass
class SDXLComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: SchedulerMixin


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SDXLWeightsError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_folder(path: Path) -> None:
    """A diffusers SDXL folder has ``model_index.json`` and one subfolder per component."""
    missing = [name for name in COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise SDXLWeightsError(
            f"SDXL folder {path} lacks {', '.join(missing)}; it needs {', '.join(COMPONENTS)} "
            "(save a full pipeline with StableDiffusionXLPipeline.save_pretrained, or download the whole repo)"
        )
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file() and '"text_time"' not in unet_config.read_text():
        raise SDXLWeightsError(
            f"{path}/unet is not an SDXL UNet (no text_time addition embedding: SD 1.x/2.x?); point to SDXL weights"
        )


def single_file_kind(path: Path) -> str:
    """The model family a single checkpoint file holds, by diffusers' own signature keys."""
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise SDXLWeightsError(f"{path} is not a readable .safetensors file ({e}); pass an SDXL checkpoint") from e
    for kind in ("xl_base", "xl_refiner", "v2", "v1"):
        if CHECKPOINT_KEY_NAMES[kind] in keys:
            return kind
    return "unknown"


def from_hub(load: Any, source: str, **kwargs: Any) -> Any:
    """``load(source)``, with a hub or cache miss as one line naming the fix."""
    try:
        return load(source, **kwargs)
    except OSError as e:
        raise SDXLWeightsError(
            f"cannot load SDXL {source} ({str(e).splitlines()[0][:160]}); download it while online or pass a "
            "local diffusers folder as model.pretrained"
        ) from e


def load_components(pretrained: str, config: str | None = None, variant: str | None = None) -> SDXLComponents:
    """SDXL's components in float32 on the CPU (callers cast and move them).

    ``pretrained``: a diffusers folder, a single ``.safetensors`` file, or a hub id (online, or in
    the hub cache). A single file carries weights only: its configs and tokenizers come from
    ``config`` (a local diffusers folder or hub id; default SDXL base's repo).
    """
    path = Path(pretrained).expanduser()
    if path.is_dir():
        check_folder(path)
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path), variant=variant)
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise SDXLWeightsError(f"SDXL checkpoint {path} does not exist; check model.pretrained")
        kind = single_file_kind(path)
        if kind != "xl_base":
            raise SDXLWeightsError(
                f"{path} is not an SDXL base checkpoint (its keys look like {kind}); "
                "pass an SDXL base .safetensors or a diffusers folder"
            )
        pipe = from_hub(StableDiffusionXLPipeline.from_single_file, str(path), config=config or SDXL_BASE_REPO)
    elif HUB_ID.match(str(pretrained)):
        pipe = from_hub(StableDiffusionXLPipeline.from_pretrained, str(pretrained), variant=variant)
    else:
        raise SDXLWeightsError(
            f"model.pretrained={pretrained} is neither a diffusers folder, a .safetensors file nor a hub id; "
            "check the path"
        )
    log.info("loaded SDXL from %s", pretrained)
    return SDXLComponents(**{name: getattr(pipe, name) for name in COMPONENTS})


def load_tokenizers(pretrained: str, config: str | None = None) -> list[CLIPTokenizer]:
    """SDXL's two tokenizers from the weights' ``tokenizer/`` and ``tokenizer_2/`` folders; a single
    file has none, so they come with its configs (``config``, default SDXL base's repo)."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        check_folder(path)
        source = str(path)
    else:
        source = config or (SDXL_BASE_REPO if path.suffix == ".safetensors" else pretrained)
    return [from_hub(CLIPTokenizer.from_pretrained, source, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]


def clip_tokenizers(folder: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers built offline from the CLIP BPE vocabulary that open_clip ships (also
    written to ``folder``): both are CLIP's BPE, padded with ``<|endoftext|>`` (CLIP-L) and ``!``
    (OpenCLIP-G), as in SDXL's ``tokenizer`` and ``tokenizer_2`` folders."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    files = (str(folder / "vocab.json"), str(folder / "merges.txt"))
    return CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, model_max_length=77, pad_token="!")


def build_random(configs: dict[str, Any], tokenizer_folder: Path) -> SDXLComponents:
    """SDXL-shaped components with random weights from config dicts (``unet``, ``vae``,
    ``text_encoder``, ``text_encoder_2``, ``scheduler``: the classes' own keyword arguments), for
    tests and memory benchmarks; tokenizers from ``clip_tokenizers``."""
    tokenizer, tokenizer_2 = clip_tokenizers(tokenizer_folder)
    with torch.device("cpu"):  # the schedule's tables live on the CPU whatever device the weights are built on
        scheduler = EulerDiscreteScheduler(**configs["scheduler"])
    return SDXLComponents(
        unet=UNet2DConditionModel(**configs["unet"]),
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )
