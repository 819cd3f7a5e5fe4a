"""LoRA on SDXL through peft, and the LoRA files other tools read.

``add_lora`` puts peft LoRA layers on a frozen module (diffusers' ``add_adapter``). The weights
leave in two formats:

- diffusers' (``pytorch_lora_weights.safetensors``): written by
  ``StableDiffusionXLPipeline.save_lora_weights`` itself, with peft's LoRA config (rank, alpha) in
  the file's metadata, so ``load_lora_weights`` rebuilds the same scale; we add one metadata key,
  ``denoising_zoo``, naming the base the LoRA was trained on (source and weight fingerprint).
  Every key keeps peft's naming (``unet.<module>.lora_A.weight``), as diffusers' newer training
  scripts save it: ``convert_state_dict_to_diffusers`` renames only attention layers
  (``to_q.lora.down``), and a file that mixes both namings loses half its LoRA in diffusers' loader,
  which picks one conversion from the first key (``mixed_naming``).
- kohya's (``lora_unet_*.lora_down/lora_up/alpha``), what AUTOMATIC1111, ComfyUI and kohya's
  scripts read: diffusers' ``convert_state_dict_to_kohya``, with ``alpha`` set to the trained
  alpha (the converter writes alpha = rank, which would change the scale unless alpha == rank).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from models.fingerprint import digest_problem, with_digest

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
METADATA_KEY = "denoising_zoo"
UNET_TARGETS = {
    "attention": ["to_q", "to_k", "to_v"],
    "attention_out": ["to_q", "to_k", "to_v", "to_out.0"],  # diffusers' SDXL LoRA default
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# the parts of the pipeline a LoRA can sit on: attribute name = diffusers' prefix in LoRA files
PARTS = ("unet", "text_encoder", "text_encoder_2")


class LoraFileError(ValueError):
    """A LoRA file that cannot be used here (the message names the file and the fix)."""


def lora_config(rank: int, alpha: int, dropout: float, targets: list[str]) -> LoraConfig:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=targets)  # fmt: skip


def unet_targets(mode: str) -> list[str]:
    if mode not in UNET_TARGETS:
        raise ValueError(f"unknown LoRA target mode {mode!r}; use one of {', '.join(UNET_TARGETS)}")
    return UNET_TARGETS[mode]


def add_lora(module: Any, config: LoraConfig) -> int:
    """LoRA layers on a module frozen first; they train in float32 whatever the base dtype (bf16/fp16
    updates of small LoRA weights lose most of each step). Returns the number of LoRA parameters.

    The UNet takes them through diffusers' ``add_adapter``; the text encoders through peft's
    ``inject_adapter_in_model`` (what transformers' ``add_adapter`` wraps, without its pin on the
    newest peft), with the config kept where peft's state-dict helpers look for it."""
    module.requires_grad_(False)
    if isinstance(module, ModelMixin):
        module.add_adapter(config)
    else:
        inject_adapter_in_model(config, module, adapter_name="default")
        module.peft_config = {"default": config}
    lora = [p for p in module.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    return sum(p.numel() for p in lora)


def peft_state(module: nn.Module) -> dict[str, Tensor]:
    """The LoRA tensors of one module in peft's naming (``...to_q.lora_A.weight``)."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(module).items()}


def save_diffusers(path: Path, parts: dict[str, Any], base: dict[str, Any]) -> None:
    """``pytorch_lora_weights.safetensors`` for ``parts`` (name in ``PARTS`` -> module with LoRA), as
    ``save_lora_weights`` writes it, plus ``base`` under the ``denoising_zoo`` metadata key.
    Written to a temp file and renamed, so a crash never leaves half a file."""
    kwargs: dict[str, Any] = {}
    for name, module in parts.items():
        kwargs[f"{name}_lora_layers"] = peft_state(module)
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, **kwargs)
        written = Path(tmp) / LORA_FILE
        tensors, metadata = read_safetensors(written)
        metadata[METADATA_KEY] = json.dumps(base, sort_keys=True)
        save_file(tensors, written, metadata=with_digest(tensors, metadata))
        os.replace(written, path)


def save_kohya(path: Path, parts: dict[str, nn.Module], alpha: float) -> None:
    """The kohya-format copy: ``lora_unet_``/``lora_te1_``/``lora_te2_`` keys, each layer with the trained alpha."""
    state: dict[str, Tensor] = {}
    for name, module in parts.items():
        prefixed = {f"{name}.{k}": v for k, v in peft_state(module).items()}
        converted = convert_state_dict_to_kohya(prefixed)
        for key, value in converted.items():
            state[key] = torch.tensor(float(alpha)) if key.endswith(".alpha") else value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, tmp, metadata=with_digest(state, {"format": "pt"}))
    os.replace(tmp, path)


def mixed_naming(tensors: dict[str, Tensor]) -> bool:
    """A diffusers-format file whose UNet keys mix ``lora.down/up`` names with peft's ``lora_A/B``: what
    this project wrote for ``lora_target=all`` before (and ``convert_state_dict_to_diffusers`` makes of
    any LoRA beyond attention). diffusers' loader converts by the first key and drops the other half."""
    unet = [k for k in tensors if k.startswith("unet.")]
    return any(".lora.down." in k for k in unet) and any(".lora_A." in k for k in unet)


def peft_naming(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same LoRA with every UNet key in peft's naming (diffusers' own renaming), which loads whole."""
    unet = convert_unet_state_dict_to_peft({k: v for k, v in tensors.items() if k.startswith("unet.")})
    return {**{k: v for k, v in tensors.items() if not k.startswith("unet.")}, **unet}


def save_peft_naming(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """A copy of a mixed-naming file (``mixed_naming``) that loads whole: keys renamed, metadata kept."""
    renamed = {k: v.contiguous() for k, v in peft_naming(tensors).items()}
    save_file(renamed, path, metadata=with_digest(renamed, metadata))


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise LoraFileError(f"{path} is not a readable .safetensors file ({e}); pass a LoRA weights file") from e
    if problem := digest_problem(tensors, metadata):
        raise LoraFileError(f"LoRA file {path} {problem}")
    return tensors, metadata


def lora_base(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The base a LoRA file's metadata says it was trained on (our files only; None for others')."""
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None


def lora_file_base(path: Path) -> dict[str, Any] | None:
    with safe_open(str(path), "pt") as f:
        return lora_base(dict(f.metadata() or {}))


def check_fits(path: Path, tensors: dict[str, Tensor], parts: dict[str, nn.Module]) -> None:
    """Every diffusers-format LoRA pair of ``path`` must sit on a Linear of the right shape: a LoRA
    of SD 1.5, or of a base with other widths, is refused in one line instead of half-loading."""
    for key, value in tensors.items():
        if not key.endswith(("lora.down.weight", "lora_A.weight")):
            continue
        part, _, rest = key.partition(".")
        module_name = rest.rsplit(".lora", 1)[0]
        if part not in parts:
            raise LoraFileError(f"{path} holds LoRA weights for {part!r}, which SDXL does not have; "
                                "it was trained for another model")  # fmt: skip
        target = dict(parts[part].named_modules()).get(module_name)
        if not isinstance(target, nn.Linear):
            raise LoraFileError(
                f"{path} has a LoRA on {part}.{module_name}, which this SDXL lacks: the LoRA was trained on "
                "another base model (SD 1.x/2.x?); use a LoRA trained on SDXL"
            )
        if value.shape[1] != target.in_features:
            raise LoraFileError(
                f"{path} has a LoRA on {part}.{module_name} with input width {value.shape[1]}, but this SDXL's "
                f"layer takes {target.in_features}: the LoRA was trained on another base model"
            )
