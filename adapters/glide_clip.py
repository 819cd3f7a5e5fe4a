"""GLIDE with a CLIP adapter: the released UNet conditioned, besides its own caption transformer,
on a frozen CLIP's pooled embedding ``cond["clip"]`` (B, D).

Two published pieces, put where GLIDE can take them without disturbing its pretrained weights:
- CLIP-Adapter (Gao et al. 2021): a residual MLP on the pooled embedding, here followed by a
  projection to ``adapter_tokens`` tokens of GLIDE's text width, so the embedding reads like a few
  extra caption tokens (GLIDE's per-token layout (B, xf_width, L)).
- IP-Adapter (Ye et al. 2023): decoupled cross-attention. Every GLIDE ``AttentionBlock`` gets a
  ``clip_attention`` with its own K/V projection of the CLIP tokens (initialised as a copy of the
  block's text ``encoder_kv``); the same image queries attend to them and the result, times a
  learnable scalar gate, is added to GLIDE's attention output before ``proj_out``.

The gate in use is ``gate * min(1, step / adapter_warmup_steps)``, ``step`` being the adapter's
training-step counter (the buffer ``clip_adapter.step``): exactly 0 at step 0, so a fresh adapter
gives the base model's output bit for bit, and without ``cond["clip"]`` the branch is never run.

The adapter is saved on its own (``save_adapter``): a safetensors file of the adapter tensors and a
JSON beside it naming the CLIP model, the adapter options and the base it was trained on (its
architecture and a fingerprint of its weights), so that it is never loaded onto another base.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from adapters.open_clip_loader import architecture_dim
from models.fingerprint import digest_problem, weights_fingerprint, with_digest
from models.glide import (
    DEFAULT_CHANNEL_MULT,
    TEXT_ENCODER_PREFIXES,
    AttentionBlock,
    GlideUNet,
    LayerNorm32,
    parse_ints,
    state_dict_mismatch,
)

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "denoisingzoo-glide-clip-adapter-v1"

# GlideUNet's options that decide the base's parameters and computation (not its init or runtime).
ARCHITECTURE_OPTIONS = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "attention_resolutions",
    "text_ctx",
    "xf_width",
    "xf_layers",
    "xf_heads",
    "xf_final_ln",
    "xf_padding",
    "n_vocab",
    "learn_sigma",
    "use_scale_shift_norm",
    "resblock_updown",
    "super_res",
    "in_channels",
)


def is_adapter_key(name: str) -> bool:
    """State-dict keys (and parameter names) that belong to the adapter rather than to GLIDE."""
    return name.startswith("clip_adapter.") or ".clip_attention." in name


# --------------------------------------------------------------------------- blocks


class ClipTokenAdapter(nn.Module):
    """Pooled CLIP embedding (B, D) -> ``tokens`` CLIP tokens (B, xf_width, tokens).

    CLIP-Adapter's residual MLP keeps the embedding's direction at init (x + MLP(LN(x))); the token
    projection and its LayerNorm put the tokens on the scale of GLIDE's final-LN'd caption tokens,
    which is what the copied ``encoder_kv`` weights expect. ``step`` counts adapter training steps
    (the trainer increments it) and drives the gate warmup; it is saved with the adapter."""

    step: Tensor

    def __init__(self, clip_dim: int, xf_width: int, tokens: int, hidden: int):
        super().__init__()
        self.tokens = tokens
        self.norm = LayerNorm32(clip_dim)
        self.fc1 = nn.Linear(clip_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, clip_dim)
        self.to_tokens = nn.Linear(clip_dim, tokens * xf_width)
        self.token_norm = LayerNorm32(xf_width)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, clip: Tensor) -> Tensor:
        h = clip + self.fc2(self.act(self.fc1(self.norm(clip))))  # (B, D)
        tokens = self.to_tokens(h).reshape(clip.shape[0], self.tokens, -1)  # (B, tokens, W)
        return self.token_norm(tokens).transpose(1, 2)  # (B, W, tokens)


class ClipAttention(nn.Module):
    """IP-Adapter's decoupled attention for one GLIDE ``AttentionBlock``: the block's image queries
    over the CLIP tokens' own keys and values (``kv``, laid out per head as [k | v] like
    ``encoder_kv``), scaled by the scalar ``gate`` times the model's warmup (or dry-run) scale."""

    def __init__(self, encoder_channels: int, channels: int, gate: float):
        super().__init__()
        self.kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.gate = nn.Parameter(torch.tensor(float(gate)))

    def forward(self, q: Tensor, clip: Tensor, gate_scale: Tensor | None = None) -> Tensor:
        B, heads, _, d = q.shape  # (B, h, HW, d)
        kv = self.kv(clip).to(q.dtype)  # (B, 2C, L)
        k, v = kv.reshape(B, heads, 2 * d, -1).transpose(-2, -1).split(d, dim=-1)  # (B, h, L, d)
        gate = self.gate if gate_scale is None else self.gate * gate_scale
        return gate.to(q.dtype) * F.scaled_dot_product_attention(q, k, v)  # (B, h, HW, d)


# --------------------------------------------------------------------------- the model


class GlideClipUNet(GlideUNet):
    """``GlideUNet`` plus the CLIP adapter (module docstring); the base's options, ``checkpoint=`` and
    ``from_scratch=`` work as there, and its state-dict keys are unchanged: the adapter adds only
    ``clip_adapter.*`` and ``*.clip_attention.*``.

    ``checkpoint=`` (OpenAI's ``base.pt`` or a fine-tuned base) is loaded strictly on the base keys before
    the adapter exists; each ``clip_attention.kv`` then starts as a copy of its block's ``encoder_kv``
    and each gate at ``gate_max``. ``adapter_checkpoint=`` then loads a file written by ``save_adapter``.

    ``clip_model_name`` is an open_clip architecture; the embedding width D is read from it (no weights
    are loaded: the embeddings come precomputed in ``cond["clip"]``). ``adapter_hidden`` defaults to D.
    """

    traits = ("clip_adapter",)

    def __init__(
        self,
        *,
        clip_model_name: str = "ViT-L-14",
        adapter_tokens: int = 4,
        adapter_hidden: int | None = None,
        gate_max: float = 0.5,
        adapter_warmup_steps: int = 10_000,
        adapter_checkpoint: str | None = None,
        **glide_options: Any,
    ):
        clip_dim = architecture_dim(clip_model_name)  # before the 385M base: an unknown name fails fast
        if adapter_tokens < 1:
            raise ValueError(f"adapter_tokens={adapter_tokens}: the adapter needs at least one CLIP token")
        if adapter_warmup_steps < 0:
            raise ValueError(f"adapter_warmup_steps={adapter_warmup_steps} is negative; use 0 for no warmup")
        super().__init__(**glide_options)
        self.clip_model_name = clip_model_name
        self.clip_dim = clip_dim
        self.adapter_tokens = adapter_tokens
        self.adapter_hidden = adapter_hidden or clip_dim
        self.gate_max = gate_max
        self.adapter_warmup_steps = adapter_warmup_steps
        self.base_architecture = base_architecture(glide_options)
        self.base_source = str(glide_options.get("checkpoint") or "random init")

        xf_width = self.token_embedding.embedding_dim
        self.clip_adapter = ClipTokenAdapter(clip_dim, xf_width, adapter_tokens, self.adapter_hidden)
        for block in self.attention_blocks():
            block.clip_attention = ClipAttention(xf_width, block.proj_out.in_channels, gate_max)
        self.initialize_adapter()
        if adapter_checkpoint is not None:
            self.load_adapter(Path(adapter_checkpoint))

    def initialize_adapter(self) -> None:
        """IP-Adapter's init: each CLIP K/V projection a copy of its block's (loaded) text projection, so
        the CLIP tokens are read the way GLIDE reads caption tokens; gates at ``gate_max`` (the warmup,
        not the gate, makes the fresh adapter a no-op). The MLP keeps PyTorch's default init."""
        with torch.no_grad():
            for block, clip_attention in zip(self.attention_blocks(), self.clip_attentions(), strict=True):
                clip_attention.kv.load_state_dict(block.encoder_kv.state_dict())
                clip_attention.gate.fill_(self.gate_max)

    def load_weights(self, state: object, source: str) -> None:
        """Base weights only: a state dict with adapter keys (a whole GlideClipUNet's) is refused with the
        way to split it, rather than as a list of unexpected keys."""
        if isinstance(state, dict) and (adapter := [k for k in state if isinstance(k, str) and is_adapter_key(k)]):
            raise ValueError(
                f"GLIDE checkpoint {source} holds CLIP adapter weights ({adapter[0]}...); model.checkpoint takes "
                "the base GLIDE weights only, the adapter goes to model.adapter_checkpoint (written by save_adapter)"
            )
        super().load_weights(state, source)

    # ----------------------------------------------------------------------- structure

    def attention_blocks(self) -> list[AttentionBlock]:
        """GLIDE's attention blocks in forward order (input blocks, middle, output blocks)."""
        return [m for m in self.modules() if isinstance(m, AttentionBlock)]

    def clip_attentions(self) -> list[ClipAttention]:
        """The adapter's decoupled attentions, one per attention block, in the same order."""
        return [m for m in self.modules() if isinstance(m, ClipAttention)]

    def parameter_sets(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter exactly once, by role, for the training phases' optimizer groups and freezing:
        ``adapter_mlp`` (``clip_adapter.*``), ``clip_attention`` (the K/V projections and gates),
        ``glide_text_encoder`` and ``glide_unet`` (the rest of GLIDE)."""
        sets: dict[str, list[tuple[str, nn.Parameter]]] = {
            "adapter_mlp": [],
            "clip_attention": [],
            "glide_text_encoder": [],
            "glide_unet": [],
        }
        for name, p in self.named_parameters():
            if name.startswith("clip_adapter."):
                sets["adapter_mlp"].append((name, p))
            elif ".clip_attention." in name:
                sets["clip_attention"].append((name, p))
            elif name.startswith(TEXT_ENCODER_PREFIXES):
                sets["glide_text_encoder"].append((name, p))
            else:
                sets["glide_unet"].append((name, p))
        return sets

    # ----------------------------------------------------------------------- gates and forward

    def warmup_factor(self) -> Tensor:
        """``min(1, step / adapter_warmup_steps)`` as a 0-dim float tensor: exactly 0.0 at step 0."""
        step = self.clip_adapter.step
        if self.adapter_warmup_steps == 0:
            return torch.ones((), device=step.device)
        return (step / self.adapter_warmup_steps).clamp(max=1.0)

    def effective_gates(self) -> Tensor:
        """(n_blocks,) the gates in use, in forward order: each block's gate times the warmup factor."""
        gates = torch.stack([m.gate.detach().float() for m in self.clip_attentions()])
        return gates * self.warmup_factor()

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: dict[str, Tensor] | None = None) -> Tensor:
        """With ``cond["clip"]`` the adapter is on (``denoise``); without it, exactly the base GLIDE."""
        cond = cond or {}
        return self.denoise(x, t, cond) if "clip" in cond else self.unet_forward(x, t, cond)

    def denoise(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], gate_scale: float | None = None) -> Tensor:
        """The prediction with the adapter on. ``gate_scale`` replaces the warmup factor: ``0.0`` is the
        dry run (the CLIP path is computed, then multiplied by an exact 0: the base output, with the
        adapter's forward exercised), ``1.0`` the full gates whatever the step."""
        if "clip" not in cond:
            raise ValueError(
                "GlideClipUNet.denoise needs cond['clip'], the (B, D) CLIP embedding; call the model without it "
                "for plain GLIDE"
            )
        clip = cond["clip"]
        if clip.shape != (x.shape[0], self.clip_dim):
            raise ValueError(
                f"cond['clip'] has shape {tuple(clip.shape)} but this adapter takes ({x.shape[0]}, {self.clip_dim}), "
                f"{self.clip_model_name} embeddings; use a CLIP cache of {self.clip_model_name} or set "
                "model.clip_model_name to the cache's model"
            )
        tokens = self.clip_adapter(clip.to(self.clip_adapter.fc1.weight.dtype))  # (B, W, adapter_tokens)
        scale = self.warmup_factor() if gate_scale is None else torch.tensor(float(gate_scale), device=x.device)
        return self.unet_forward(x, t, cond, (tokens, scale))

    # ----------------------------------------------------------------------- adapter-only checkpoints

    def base_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not is_adapter_key(k)}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter's tensors (``clip_adapter.*`` with the step buffer, ``*.clip_attention.*``)."""
        return {k: v for k, v in self.state_dict().items() if is_adapter_key(k)}

    def base_fingerprint(self) -> str:
        return weights_fingerprint((n, p) for n, p in self.named_parameters() if not is_adapter_key(n))

    def adapter_description(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``save_adapter`` writes beside the weights, and what ``load_adapter`` checks."""
        return {
            "format": ADAPTER_FORMAT,
            "clip": {"model_name": self.clip_model_name, "dim": self.clip_dim},
            "adapter": {
                "tokens": self.adapter_tokens,
                "hidden": self.adapter_hidden,
                "gate_max": self.gate_max,
                "warmup_steps": self.adapter_warmup_steps,
                "step": int(self.clip_adapter.step),
                "num_blocks": len(self.clip_attentions()),
                "num_parameters": sum(p.numel() for n, p in self.named_parameters() if is_adapter_key(n)),
            },
            "base": {
                "architecture": self.base_architecture,
                "super_res": self.super_res,
                "fingerprint": self.base_fingerprint(),
                "source": self.base_source,
            },
            "extra": extra or {},
        }

    def save_adapter(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the adapter alone: ``path`` (safetensors, the adapter tensors) and ``path.with_suffix(".json")``
        (``adapter_description`` plus ``extra``: phase, step, run name...). Each file is written to a
        temporary name and renamed, so an interrupted save leaves the previous files whole."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"adapter path {path} must end in .safetensors (its description goes beside it as .json)")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.adapter_state_dict().items()}
        description = json.dumps(self.adapter_description(extra), indent=2, default=str) + "\n"
        metadata = with_digest(tensors, {"format": ADAPTER_FORMAT})
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(description))
        log.info("CLIP adapter saved to %s (step %d)", path, int(self.clip_adapter.step))

    def load_adapter(self, path: Path) -> None:
        """Load a ``save_adapter`` file after checking its description against this model: the same CLIP
        model, adapter shape, base architecture and base weights (fingerprint). Each mismatch is a one-line
        ``ValueError`` naming it and the fix; a missing file a one-line ``FileNotFoundError``."""
        path = Path(path).expanduser()
        meta = read_adapter_description(path)
        if problem := self.adapter_mismatch(meta):
            raise ValueError(f"CLIP adapter {path} does not fit this model: {problem}")
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                found, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except safetensors.SafetensorError as err:
            raise ValueError(f"CLIP adapter {path} is truncated or not a safetensors file ({err})") from err
        if problem := digest_problem(found, metadata):
            raise ValueError(f"CLIP adapter {path} {problem}")
        if problem := state_dict_mismatch(self.adapter_state_dict(), found, self.super_res):
            raise ValueError(f"CLIP adapter {path} does not fit this model: {problem}")
        self.load_state_dict(found, strict=False)
        log.info("CLIP adapter loaded from %s (step %d)", path, int(self.clip_adapter.step))

    def adapter_mismatch(self, meta: dict[str, Any]) -> str | None:
        """The first difference between a saved adapter's description and this model, as one phrase with
        the fix; None if the adapter fits."""
        clip, adapter, base = meta["clip"], meta["adapter"], meta["base"]
        if (clip["model_name"], clip["dim"]) != (self.clip_model_name, self.clip_dim):
            return (
                f"it was trained on CLIP {clip['model_name']} (dim {clip['dim']}) but this model uses "
                f"{self.clip_model_name} (dim {self.clip_dim}); set model.clip_model_name={clip['model_name']} "
                "and use that model's CLIP embeddings"
            )
        if (adapter["tokens"], adapter["hidden"]) != (self.adapter_tokens, self.adapter_hidden):
            return (
                f"it has adapter_tokens={adapter['tokens']}, adapter_hidden={adapter['hidden']} but this model "
                f"{self.adapter_tokens}, {self.adapter_hidden}; set model.adapter_tokens and model.adapter_hidden "
                "to the adapter's"
            )
        theirs, ours = base["architecture"], self.base_architecture
        if differ := [k for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)]:
            listed = ", ".join(f"{k}={theirs.get(k)!r} (this model {ours.get(k)!r})" for k in differ)
            return f"it was trained on another GLIDE architecture: {listed}; load it onto the model it was trained on"
        if (fingerprint := self.base_fingerprint()) != base["fingerprint"]:
            return (
                f"it was trained on base {base['fingerprint'][:12]} ({base['source']}) but this base is "
                f"{fingerprint[:12]} ({self.base_source}); load it onto the base it was trained on"
            )
        return None


# --------------------------------------------------------------------------- helpers


def read_adapter_description(path: Path) -> dict[str, Any]:
    """The JSON ``save_adapter`` wrote beside ``path``; missing or foreign files are one-line errors."""
    path = Path(path).expanduser()
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"CLIP adapter {path} does not exist; pass a .safetensors written by save_adapter")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"CLIP adapter {path} has no description {meta_path.name} beside it; save_adapter writes both files"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"CLIP adapter description {meta_path} is not valid JSON ({err.msg})") from err
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{meta_path} is not a CLIP adapter description (no format {ADAPTER_FORMAT!r})")
    return meta


def base_architecture(options: dict[str, Any]) -> dict[str, Any]:
    """The base options that shape GLIDE (``ARCHITECTURE_OPTIONS``), GlideUNet's defaults filled in and
    GLIDE's option strings as int lists (``""`` at 64 px and ``"1,2,3,4"`` compare equal); JSON-ready."""
    defaults = inspect.signature(GlideUNet.__init__).parameters
    arch = {k: options[k] if k in options else defaults[k].default for k in ARCHITECTURE_OPTIONS}
    mult = arch["channel_mult"]
    arch["channel_mult"] = list(parse_ints(mult) if mult else DEFAULT_CHANNEL_MULT[arch["image_size"]])
    arch["attention_resolutions"] = list(parse_ints(arch["attention_resolutions"]))
    return arch


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary name in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- released configurations


def glide_clip_base(**kwargs: Any) -> GlideClipUNet:
    """GLIDE's 64x64 base model with the CLIP adapter; ``kwargs`` override, e.g. ``checkpoint=``,
    ``clip_model_name=``."""
    return GlideClipUNet(**{"image_size": 64, "num_res_blocks": 3, "super_res": False, **kwargs})
