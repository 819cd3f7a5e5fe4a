"""SDXL with LoRA (``model=sdxl_lora``): diffusers' SDXL, frozen, with peft LoRA layers, meeting the
model contract ``forward(x, t, r, cond)`` so the generic trainer trains it.

``x`` is the noised VAE latent, ``t`` the integer DDPM timestep (``r`` unused) and ``cond`` holds the
text, either as token ids of the two tokenizers (``tokens`` (B, 2, 77), from ``SDXLTokenizer`` in the
data pipeline) or precomputed (``prompt_embeds`` (B, 77, 2048), ``pooled`` (B, 1280), from the
cache), plus ``sizes`` (B, 6): original size, crop corner and target size, which are SDXL's
``add_time_ids``. ``drop`` (B,) bool zeroes a row's text embeddings, the way SDXL itself was
trained for classifier-free guidance (and what its pipeline feeds for an empty negative prompt).

Precision follows the notes of the project this replaces: the frozen UNet in bf16 (or fp16 under a
GradScaler), the VAE in fp32 (SDXL's VAE overflows in fp16), the text encoders in 2-byte floats (bf16
by default: the notes' fp16 beside bf16 autocast mixes dtypes in layer norms, which the CPU refuses),
the LoRA weights in fp32; gradient checkpointing on; attention through PyTorch's SDPA.

The checkpoint holds the LoRA weights only (``state_dict``): the base comes from ``pretrained``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor, nn
from transformers import CLIPTokenizer

from adapters.sdxl_components import SDXLComponents, dtype_of, load_components, load_tokenizers
from adapters.sdxl_lora import (
    KOHYA_FILE,
    LORA_FILE,
    TEXT_ENCODER_TARGETS,
    add_lora,
    lora_config,
    save_diffusers,
    save_kohya,
    unet_targets,
)
from models.contract import Model
from models.fingerprint import weights_fingerprint

log = logging.getLogger(__name__)


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def encode_prompt(text_encoder: nn.Module, text_encoder_2: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Token ids (B, 2, 77) -> (prompt_embeds (B, 77, 2048), pooled (B, 1280)), as the SDXL pipeline
    computes them: both encoders' penultimate hidden states side by side, and OpenCLIP-G's projected
    pooled output."""
    first = text_encoder(tokens[:, 0], output_hidden_states=True)
    second = text_encoder_2(tokens[:, 1], output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


@torch.no_grad()
def encode_images(vae: Any, x: Tensor) -> Tensor:
    """Images in [-1, 1] -> scaled latents, with the VAE in its own dtype (fp32) outside autocast."""
    with torch.autocast(x.device.type, enabled=False):
        latents = vae.encode(x.to(vae.dtype)).latent_dist.sample()
    return latents.float() * vae.config.scaling_factor


@torch.no_grad()
def sample(pipe: StableDiffusionXLPipeline, **kwargs: Any) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] from ``pipe(**kwargs)``, decoded by the VAE in its own dtype (fp32).

    The pipeline decodes in the UNet's dtype unless that is fp16 (then it upcasts the VAE): a bf16 UNet
    beside an fp32 VAE would fail on a dtype mismatch, and bf16 decoding loses detail; so the pipeline
    stops at the latents and the VAE decodes them here, outside autocast."""
    latents = pipe(**kwargs, output_type="latent").images
    vae = pipe.vae
    with torch.autocast(latents.device.type, enabled=False):
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encoder_fingerprints(parts: Any) -> dict[str, str]:
    """Fingerprints of the VAE and the text encoders: what a latent/text cache must have been made with."""
    text = [*parts.text_encoder.named_parameters(), *parts.text_encoder_2.named_parameters()]
    return {"vae_fingerprint": weights_fingerprint(parts.vae.named_parameters()),
            "text_fingerprint": weights_fingerprint(text)}  # fmt: skip


class SDXLTokenizer:
    """Captions -> ``(tokens (B, 2, 77), mask (B, 2, 77))`` of SDXL's two tokenizers, for the caption
    data sets (which call it in the main process). ``truncated`` counts captions cut at 77 tokens.

    Given ``pretrained`` (and ``config``, see ``sdxl_components.load_tokenizers``), the tokenizers are
    read on first use: a data set that never tokenizes (the latent/text cache) never needs them.
    """

    kind = "sdxl"  # the tokens SDXLLoRA reads (training/compat.py)

    def __init__(self, tokenizers: list[CLIPTokenizer] | None = None, pretrained: str | None = None,
                 config: str | None = None):  # fmt: skip
        self._tokenizers = tokenizers
        self.pretrained, self.config = pretrained, config
        self.truncated = 0

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        if self._tokenizers is None:
            if self.pretrained is None:
                raise ValueError("the SDXL tokenizer needs model=sdxl_lora (model.pretrained names the weights)")
            self._tokenizers = load_tokenizers(self.pretrained, self.config)
        return self._tokenizers

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        tokens, masks = [], []
        for tokenizer in self.tokenizers:
            out = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt", return_overflowing_tokens=False, return_length=False)  # fmt: skip
            tokens.append(out.input_ids)
            masks.append(out.attention_mask.bool())
        full = self.tokenizers[0](captions, truncation=False).input_ids
        self.truncated += sum(len(ids) > self.tokenizers[0].model_max_length for ids in full)
        return torch.stack(tokens, 1), torch.stack(masks, 1)


class SDXLLoRA(Model):
    """SDXL (UNet, VAE, both text encoders, tokenizers, scheduler) frozen, with LoRA on the UNet's
    ``lora_target`` layers and, with ``text_encoder_lora``, on both text encoders' attention."""

    data_kinds = ("captioned", "sdxl_cache")
    output = "pipeline"  # latent eps/v for its own diffusers pipeline, which samples it (eval=sdxl_prompts)
    tokenizer = "sdxl"

    @classmethod
    def learned_null(cls, settings: dict) -> bool:
        """The frozen SDXL base learned the empty prompt: a LoRA can be guided without dropout of its own."""
        return True

    def __init__(
        self,
        pretrained: str | SDXLComponents,
        config: str | None = None,
        variant: str | None = None,
        lora_rank: int = 4,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target: str = "attention_out",
        text_encoder_lora: bool = False,
        unet_dtype: str = "bfloat16",
        text_encoder_dtype: str = "bfloat16",
        vae_dtype: str = "float32",
        activation_checkpointing: bool = True,
    ):
        super().__init__()
        parts = pretrained if isinstance(pretrained, SDXLComponents) else load_components(pretrained, config, variant)
        self.source = "random weights" if isinstance(pretrained, SDXLComponents) else str(pretrained)
        self.unet, self.vae = parts.unet, parts.vae
        self.text_encoder, self.text_encoder_2 = parts.text_encoder, parts.text_encoder_2
        self.tokenizers = [parts.tokenizer, parts.tokenizer_2]
        self.sampling_scheduler = parts.scheduler  # the pipeline's (Euler for SDXL base)
        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)  # the training schedule
        self.lora_alpha = lora_alpha
        self.text_encoder_lora = text_encoder_lora
        # what a LoRA file says it fits: taken before LoRA layers rename the base weights
        self.base = {"pretrained": self.source, "unet_fingerprint": weights_fingerprint(self.unet.named_parameters())}
        self.encoders = encoder_fingerprints(parts)
        for module, name in ((self.unet, unet_dtype), (self.text_encoder, text_encoder_dtype),
                             (self.text_encoder_2, text_encoder_dtype), (self.vae, vae_dtype)):  # fmt: skip
            module.requires_grad_(False).to(dtype_of(name))
        self.vae.eval()
        self.unet.set_attn_processor(AttnProcessor2_0())
        if activation_checkpointing:
            self.unet.enable_gradient_checkpointing()
        n = add_lora(self.unet, lora_config(lora_rank, lora_alpha, lora_dropout, unet_targets(lora_target)))
        if text_encoder_lora:
            te_config = lora_config(lora_rank, lora_alpha, lora_dropout, TEXT_ENCODER_TARGETS)
            n += add_lora(self.text_encoder, te_config) + add_lora(self.text_encoder_2, te_config)
        log.info("SDXL LoRA: rank %d, alpha %g, %s%s: %.2fM trainable parameters", lora_rank, lora_alpha, lora_target,
                 " + text encoders" if text_encoder_lora else "", n / 1e6)  # fmt: skip

    # --- the run's weights are the LoRA's -----------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        """LoRA tensors only (tens of MB, not SDXL's 7 GB): the base is rebuilt from ``pretrained``."""
        return OrderedDict((n, p.detach()) for n, p in self.named_parameters() if is_lora_key(n))

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        own = dict((n, p) for n, p in self.named_parameters() if is_lora_key(n))
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise RuntimeError(
                f"LoRA weights do not fit this model: {len(missing)} missing (e.g. {missing[:1]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:1]}); another lora_target or text_encoder_lora?"
            )
        for name, p in own.items():
            if p.shape != state[name].shape:
                raise RuntimeError(
                    f"LoRA weight {name} has shape {tuple(state[name].shape)}, this model {tuple(p.shape)}: "
                    "the LoRA rank differs (set model.lora_rank to the rank it was trained with)"
                )
            with torch.no_grad():
                p.copy_(state[name])
        return None

    def lora_parts(self) -> dict[str, nn.Module]:
        """The modules carrying LoRA layers, under diffusers' names."""
        parts: dict[str, nn.Module] = {"unet": self.unet}
        if self.text_encoder_lora:
            parts.update(text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2)
        return parts

    def save_lora(self, folder: Path, diffusers: bool = True, kohya: bool = False) -> list[Path]:
        """``pytorch_lora_weights.safetensors`` (diffusers) and/or its kohya-format copy; their paths."""
        parts = self.lora_parts()
        written = []
        if diffusers:
            written.append(folder / LORA_FILE)
            save_diffusers(written[-1], parts, self.base)
        if kohya:
            written.append(folder / KOHYA_FILE)
            save_kohya(written[-1], parts, self.lora_alpha)
        return written

    # --- encoders ----------------------------------------------------------------------------
    def latents(self, batch: dict[str, Any]) -> Tensor:
        """The batch's latents: cached (``batch["latents"]``) or encoded from its images."""
        return batch["latents"].float() if "latents" in batch else encode_images(self.vae, batch["x1"])

    def text(self, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(prompt_embeds, pooled): cached, or encoded (with gradient only if the encoders carry LoRA);
        rows of ``cond["drop"]`` (the null condition, models/conditioning.py) zeroed."""
        if "prompt_embeds" in cond:
            embeds, pooled = cond["prompt_embeds"], cond["pooled"]
        else:
            with torch.set_grad_enabled(self.text_encoder_lora and torch.is_grad_enabled()):
                embeds, pooled = encode_prompt(self.text_encoder, self.text_encoder_2, cond["tokens"])
        if "drop" in cond:
            keep = (~cond["drop"]).to(embeds.dtype)
            embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        return embeds, pooled

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None, cond: dict[str, Tensor]) -> Tensor:
        embeds, pooled = self.text(cond)
        dtype = self.unet.dtype
        added = {"text_embeds": pooled.to(dtype), "time_ids": cond["sizes"].to(dtype)}
        return self.unet(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added).sample

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, **kwargs: Any) -> Tensor:
        """Images in [0, 1] through ``pipeline()`` (its arguments: prompt, generator, sizes, steps, ...)."""
        return sample(self.pipeline(), **kwargs)

    def pipeline(self) -> StableDiffusionXLPipeline:
        """A diffusers pipeline on these very modules (LoRA active), for sample grids."""
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet,
            scheduler=type(self.sampling_scheduler).from_config(self.sampling_scheduler.config),
        )  # fmt: skip
