"""GLIDE's text-conditional UNet and its text transformer (Nichol et al. 2021, "GLIDE: Towards
Photorealistic Image Generation and Editing with Text-Guided Diffusion Models"), written for our
model contract, with a state dict that loads OpenAI's released ``base`` and ``upsample`` weights
key for key.

The image side is ADM's UNet (Dhariwal & Nichol): residual blocks with scale-shift group norm,
residual up/downsampling blocks, self-attention at chosen resolutions. The text side is a
bidirectional transformer over the caption tokens (padded positions replaced by a learned
padding embedding, no attention mask). It conditions the UNet twice: the projection of the last
token is added to the timestep embedding, and every attention layer also attends to the
per-token features (their keys and values are prepended to the image's).

Module names follow GLIDE's (``input_blocks``, ``in_layers.2``, ``transformer.resblocks``...) so
that the released checkpoints load without renaming; that is also why a few containers are
``nn.Sequential`` of layers that are called one by one. At GLIDE's options the base model has
385,030,726 parameters and the upsampler 398,361,286.

Departures from the reference, all deliberate:
- The super-resolution variant is the ``super_res`` flag, not a subclass; inpainting is not here.
- Attention uses ``F.scaled_dot_product_attention``; fp16 is autocast, not converted weights.
- GroupNorm and LayerNorm run in float32 (as GLIDE's GroupNorm32/LayerNorm), the SiLU after a norm
  is its own module rather than fused into the norm: the same numbers, the same keys.
- The token, position and padding tables get an initialisation (GLIDE leaves them empty because
  its weights always come from a checkpoint).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.contract import Model
from models.layers import GroupNorm, maybe_checkpoint, timestep_embedding, zero_

BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/base.pt"
UPSAMPLE_URL = "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/upsample.pt"

# Top-level names of the text encoder's parameters; everything else is the UNet.
TEXT_ENCODER_PREFIXES = (
    "transformer.",
    "token_embedding.",
    "positional_embedding",
    "padding_embedding",
    "final_ln.",
    "transformer_proj.",
)

# GLIDE's channel multipliers when ``channel_mult=""``, by image size.
DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


# --------------------------------------------------------------------------- norms


class LayerNorm32(nn.LayerNorm):
    """Layer norm in float32 whatever the activation dtype, as GLIDE's transformer has it."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


# --------------------------------------------------------------------------- text transformer


class TextAttention(nn.Module):
    """Bidirectional multi-head self-attention over the caption tokens, no mask (padding is handled by
    the padding embedding). The fused qkv projection is laid out per head as [q | k | v], GLIDE's order."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"xf_width={width} is not divisible by xf_heads={heads}")
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, W = x.shape
        qkv = self.c_qkv(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, 3d)
        q, k, v = qkv.split(W // self.heads, dim=-1)  # (B, heads, L, d) each
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W)
        return self.c_proj(h)


class TextMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class TextBlock(nn.Module):
    """Pre-norm transformer block (CLIP's ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = TextAttention(width, heads)
        self.ln_1 = LayerNorm32(width)
        self.mlp = TextMLP(width)
        self.ln_2 = LayerNorm32(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(width, heads) for _ in range(layers)])


# --------------------------------------------------------------------------- UNet blocks


class Resample(nn.Module):
    """Parameter-free 2x nearest upsampling or 2x2 average pooling, used inside up/down residual blocks."""

    def __init__(self, up: bool):
        super().__init__()
        self.up = up

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """Norm-SiLU-conv twice with the embedding as a per-channel scale and shift of the second norm
    (or added before it without ``use_scale_shift_norm``); optionally resamples both branches
    between the first norm and conv (``resblock_updown``). Width changes go through a 1x1 skip conv."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        resample: Resample | None = None,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample = resample or nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm, act, conv = self.in_layers
        h = conv(self.resample(act(norm(x))))  # (B, C_out, H', W')
        x = self.resample(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, 2 C_out or C_out, 1, 1)
        out_norm, out_act, out_drop, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + e)
        return self.skip_connection(x) + out_conv(out_drop(out_act(h)))


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions that also attends to the text: the per-token keys and
    values from ``encoder_kv`` are prepended to the image's. Each head's slice of the fused qkv
    (and of encoder_kv) is laid out as [q | k | v] ([k | v]), GLIDE's order.

    ``clip_attention`` is empty here; ``adapters.glide_clip`` installs IP-Adapter's decoupled attention
    to CLIP tokens there, a second attention of the same queries whose gated output is added to this
    one's. It runs only when ``clip`` tokens are passed, so the plain model's numbers never change."""

    def __init__(self, channels: int, num_heads: int, encoder_channels: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.encoder_kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.clip_attention: nn.Module | None = None

    def forward(self, x: Tensor, text: Tensor, clip: Tensor | None = None, gate_scale: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        d = C // self.num_heads
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, HW)
        q, k, v = qkv.reshape(B, self.num_heads, 3 * d, H * W).transpose(-2, -1).split(d, dim=-1)  # (B, h, HW, d)
        ekv = self.encoder_kv(text).to(qkv.dtype)  # (B, 2C, L)
        ek, ev = ekv.reshape(B, self.num_heads, 2 * d, -1).transpose(-2, -1).split(d, dim=-1)  # (B, h, L, d)
        h = F.scaled_dot_product_attention(q, torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2))
        if clip is not None and self.clip_attention is not None:
            h = h + self.clip_attention(q, clip, gate_scale)  # (B, h, HW, d)
        h = h.transpose(-2, -1).reshape(B, C, H * W)  # (B, C, HW)
        return x + self.proj_out(h).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Strided-conv downsampling, used when ``resblock_updown`` is off."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest + conv upsampling, used when ``resblock_updown`` is off."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Stage(nn.Sequential):
    """One entry of ``input_blocks``/``output_blocks``/``middle_block`` (GLIDE's TimestepEmbedSequential):
    residual blocks take the embedding, attention blocks the text (and the CLIP tokens with their gate
    scale, see ``GlideUNet.unet_forward``), anything else only the features."""

    def forward(  # type: ignore[override]
        self, h: Tensor, emb: Tensor, text: Tensor, clip: Tensor | None = None, gate_scale: Tensor | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, text, clip, gate_scale)
            else:
                h = layer(h)
        return h


# --------------------------------------------------------------------------- the model


def parse_ints(value: str | Sequence[int]) -> tuple[int, ...]:
    """GLIDE's comma-separated option strings ("32,16,8") or a list of ints -> a tuple of ints."""
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


class GlideUNet(Model):
    """GLIDE's Text2ImUNet (``super_res=False``) or SuperResText2ImUNet (``super_res=True``).

    ``forward(x, t, r=None, cond=None)`` predicts ``(B, 6, H, W)``: the noise eps and the values that
    interpolate the log-variance between beta_t and beta-tilde_t (``learn_sigma``). ``t`` is GLIDE's
    timestep in [0, 999]; ``r`` is unused; ``cond`` holds ``tokens`` (B, text_ctx) and ``mask``
    (B, text_ctx), True on real tokens (see ``models.glide_tokenizer``), and for the upsampler
    ``low_res`` (B, 3, h, w) in [-1, 1]. Without tokens (``cond=None``) the caption is empty: every
    position is padding, GLIDE's unconditional input for classifier-free guidance.

    ``attention_resolutions`` are feature-map sizes ("32,16,8"); ``channel_mult=""`` picks GLIDE's
    multipliers for the image size. Weights: ``checkpoint=PATH`` loads a released (or fine-tuned)
    state dict with strict key and shape checks; random init needs ``from_scratch=True``.
    The diffusion options GLIDE keeps in the same dict (``diffusion_steps``, ``noise_schedule``...)
    are accepted and ignored so that GLIDE's options can be passed as they are.
    """

    data_kinds = ("captioned",)
    output = "eps_var"  # eps and the learned-range variance values: (B, 2C, H, W)
    tokenizer = "glide"

    @classmethod
    def learned_null(cls, settings: dict) -> bool:
        """OpenAI's released weights learned the empty caption (20% of training), so a fine-tuning
        run can guide without dropout of its own; a model from scratch cannot."""
        return not settings.get("from_scratch", False)

    @classmethod
    def needs_cond(cls, settings: dict) -> tuple[str, ...]:
        """The upsampler (``super_res``) needs the low-resolution image in every batch."""
        return ("low_res",) if settings.get("super_res") else ()

    def __init__(
        self,
        image_size: int = 64,
        num_channels: int = 192,
        num_res_blocks: int = 3,
        channel_mult: str | Sequence[int] = "",
        num_heads: int = 1,
        num_head_channels: int = 64,
        num_heads_upsample: int = -1,
        attention_resolutions: str | Sequence[int] = "32,16,8",
        dropout: float = 0.1,
        text_ctx: int = 128,
        xf_width: int = 512,
        xf_layers: int = 16,
        xf_heads: int = 8,
        xf_final_ln: bool = True,
        xf_padding: bool = True,
        n_vocab: int = 50257,
        learn_sigma: bool = True,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        super_res: bool = False,
        in_channels: int = 3,
        activation_checkpointing: bool = False,
        checkpoint: str | None = None,
        from_scratch: bool = False,
        # GLIDE's diffusion and runtime options: no effect on the network
        diffusion_steps: int = 1000,
        noise_schedule: str = "squaredcos_cap_v2",
        timestep_respacing: str = "",
        use_fp16: bool = False,
        cache_text_emb: bool = False,
        inpaint: bool = False,
    ):
        super().__init__()
        if inpaint:
            raise ValueError("GLIDE's inpainting models are not implemented; set model.inpaint=false")
        if checkpoint is None and not from_scratch:
            raise ValueError(
                f"GLIDE fine-tuning starts from OpenAI's released weights ({BASE_URL} and {UPSAMPLE_URL}); "
                "download the one you need and pass model.checkpoint=PATH, or model.from_scratch=true for random init"
            )
        mult = parse_ints(channel_mult) if channel_mult else DEFAULT_CHANNEL_MULT.get(image_size)
        if mult is None:
            raise ValueError(f"no default channel_mult for image_size={image_size}; pass channel_mult, e.g. '1,2,3,4'")
        last = len(mult) - 1
        if image_size % 2**last:
            raise ValueError(f"image_size={image_size} cannot be halved {last} times (len(channel_mult)={last + 1})")
        resolutions = [image_size // 2**level for level in range(len(mult))]
        attention_sizes = parse_ints(attention_resolutions)
        if missing := set(attention_sizes) - set(resolutions):
            raise ValueError(f"attention_resolutions {sorted(missing)} match no feature-map size; sizes: {resolutions}")

        self.super_res = super_res
        self.image_size = image_size
        self.activation_checkpointing = activation_checkpointing
        self.num_channels = num_channels
        self.text_ctx = text_ctx
        self.end_token = n_vocab - 1  # GPT-2's <|endoftext|>, GLIDE's padding token
        model_in = 2 * in_channels if super_res else in_channels  # the upsampler also sees the upsampled low-res
        out_channels = 2 * in_channels if learn_sigma else in_channels
        emb_dim = 4 * num_channels

        def heads(channels: int, upsample: bool) -> int:
            if num_head_channels != -1:
                return channels // num_head_channels
            return num_heads_upsample if upsample and num_heads_upsample != -1 else num_heads

        def res(c_in: int, c_out: int, resample: Resample | None = None) -> ResBlock:
            return ResBlock(c_in, emb_dim, dropout, c_out, use_scale_shift_norm, resample)

        def attn(c: int, upsample: bool = False) -> AttentionBlock:
            return AttentionBlock(c, heads(c, upsample), xf_width)

        # UNet (registered first, as in GLIDE, so that the state dict lists keys in the released order)
        self.time_embed = nn.Sequential(nn.Linear(num_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = mult[0] * num_channels
        self.input_blocks = nn.ModuleList([Stage(nn.Conv2d(model_in, ch, 3, padding=1))])
        skips = [ch]
        for level, (m, size) in enumerate(zip(mult, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, m * num_channels)]
                ch = m * num_channels
                layers += [attn(ch)] if size in attention_sizes else []
                self.input_blocks.append(Stage(*layers))
                skips.append(ch)
            if level != last:
                down = res(ch, ch, Resample(up=False)) if resblock_updown else Downsample(ch)
                self.input_blocks.append(Stage(down))
                skips.append(ch)

        self.middle_block = Stage(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            m, size = mult[level], resolutions[level]
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), m * num_channels)]
                ch = m * num_channels
                layers += [attn(ch, upsample=True)] if size in attention_sizes else []
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, Resample(up=True)) if resblock_updown else Upsample(ch))
                self.output_blocks.append(Stage(*layers))

        self.out = nn.Sequential(GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

        # text encoder
        self.transformer = TextTransformer(xf_width, xf_layers, xf_heads)
        self.final_ln = LayerNorm32(xf_width) if xf_final_ln else nn.Identity()
        self.token_embedding = nn.Embedding(n_vocab, xf_width)
        self.positional_embedding = nn.Parameter(torch.empty(text_ctx, xf_width))
        self.transformer_proj = nn.Linear(xf_width, emb_dim)
        self.padding_embedding = nn.Parameter(torch.empty(text_ctx, xf_width)) if xf_padding else None
        self.initialize_weights()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def initialize_weights(self) -> None:
        """PyTorch's default init for convs and linears (GLIDE's), CLIP's normal init for the token,
        position and padding tables, and zeros for the last layer of every residual branch and for the
        output conv: each block starts as the identity and the fresh model predicts zeros."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.padding_embedding is not None:
            nn.init.normal_(self.padding_embedding, std=0.01)
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_(module.out_layers[-1])
            elif isinstance(module, AttentionBlock):
                zero_(module.proj_out)
        zero_(self.out[-1])

    def load_checkpoint(self, path: str) -> None:
        """Load a GLIDE state dict (OpenAI's ``base.pt``/``upsample.pt`` or one saved from this class);
        every key and shape must match. A missing file is a one-line ``FileNotFoundError``, anything else
        that does not fit (another model's weights, a training checkpoint, a damaged file) a one-line
        ``ValueError``."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"GLIDE checkpoint {path} does not exist; download {BASE_URL} (or upsample.pt) and pass its path"
            )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise ValueError(
                f"GLIDE checkpoint {path} is truncated or not a torch file ({type(err).__name__} while reading it)"
            ) from err
        self.load_weights(state, str(path))

    def load_weights(self, state: object, source: str) -> None:
        """A GLIDE state dict already in memory (``source`` names it in messages), checked like a file."""
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(
                f"GLIDE checkpoint {source} is not a bare state dict of tensors (a training checkpoint?); pass "
                "OpenAI's base.pt/upsample.pt or a file written by torch.save(model.state_dict())"
            )
        if problem := state_dict_mismatch(self.base_state_dict(), state, self.super_res):
            raise ValueError(f"GLIDE checkpoint {source} does not fit this model: {problem}")
        self.load_state_dict(state, strict=False)  # the keys were checked above: all of GLIDE's, nothing else

    def base_state_dict(self) -> dict[str, Tensor]:
        """GLIDE's own tensors, what a released checkpoint holds (a subclass adds keys of its own)."""
        return self.state_dict()

    def text_encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The transformer, its token/position/padding tables, final norm and projection; for a separate
        learning rate or for freezing the text encoder while the UNet trains."""
        return (p for name, p in self.named_parameters() if name.startswith(TEXT_ENCODER_PREFIXES))

    def unet_parameters(self) -> Iterator[nn.Parameter]:
        """Everything that is not the text encoder (``text_encoder_parameters``)."""
        return (p for name, p in self.named_parameters() if not name.startswith(TEXT_ENCODER_PREFIXES))

    def encode_text(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Caption tokens -> (pooled (B, 4C) added to the time embedding, per-token (B, xf_width, L) for
        cross-attention). Padded positions take the padding embedding, so padding tokens' ids never matter;
        "pooled" is the last position, which is padding for every caption shorter than text_ctx (GLIDE's)."""
        if tokens.shape[1:] != (self.text_ctx,) or mask.shape != tokens.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be (B, text_ctx={self.text_ctx})"
            )
        h = self.token_embedding(tokens.long()) + self.positional_embedding[None]  # (B, L, W)
        if self.padding_embedding is not None:
            h = torch.where(mask[..., None], h, self.padding_embedding[None].to(h.dtype))
        for block in self.transformer.resblocks:
            h = self.run(block, h)
        h = self.final_ln(h)
        return self.transformer_proj(h[:, -1]), h.transpose(1, 2)  # (B, 4C), (B, W, L)

    def run(self, block: nn.Module, *args: Tensor) -> Tensor:
        """Call a block, through activation checkpointing when ``activation_checkpointing`` is set."""
        return maybe_checkpoint(self.activation_checkpointing, block, *args)

    def unconditional(self, batch: int, device: torch.device) -> dict[str, Tensor]:
        """The empty caption: all padding, mask all False (GLIDE's unconditional input)."""
        tokens = torch.full((batch, self.text_ctx), self.end_token, dtype=torch.long, device=device)
        return {"tokens": tokens, "mask": torch.zeros_like(tokens, dtype=torch.bool)}

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: dict[str, Tensor] | None = None) -> Tensor:
        return self.unet_forward(x, t, cond or {})

    def unet_forward(
        self, x: Tensor, t: Tensor, cond: dict[str, Tensor], clip: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """``forward`` without the unused ``r``. ``clip`` is ``(tokens (B, xf_width, L), gate_scale ())``
        for the attention blocks' ``clip_attention`` (``adapters.glide_clip``); passed as tensors through
        ``run`` so that activation checkpointing recomputes the same thing and no state stays on modules."""
        extra = clip or ()
        text = cond if "tokens" in cond else self.unconditional(x.shape[0], x.device)
        h = x
        if self.super_res:
            if "low_res" not in cond:
                raise ValueError("the GLIDE upsampler needs cond['low_res'], the (B, 3, h, w) image to upsample")
            low_res = F.interpolate(cond["low_res"], x.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([x, low_res.to(x.dtype)], dim=1)  # (B, 6, H, W)

        features = timestep_embedding(t, self.num_channels).to(self.positional_embedding.dtype)
        emb = self.time_embed(features)  # (B, 4C)
        mask = text["mask"] & ~cond["drop"][:, None] if "drop" in cond else text["mask"]  # drop: the empty caption
        pooled, tokens = self.encode_text(text["tokens"], mask)  # (B, 4C), (B, W, L)
        emb = emb + pooled.to(emb.dtype)

        skips = []
        for stage in self.input_blocks:
            h = self.run(stage, h, emb, tokens, *extra)
            skips.append(h)
        h = self.run(self.middle_block, h, emb, tokens, *extra)  # (B, C_last, H / 2^(L-1), W / 2^(L-1))
        for stage in self.output_blocks:
            h = self.run(stage, torch.cat([h, skips.pop()], dim=1), emb, tokens, *extra)
        return self.out(h).to(x.dtype)  # (B, 6, H, W)


def state_dict_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor], super_res: bool) -> str | None:
    """The first difference between this model's state dict and a checkpoint's, as one phrase; None if
    they match. A base/upsampler mix-up is named as such (the upsampler's first conv takes 6 channels)."""
    first = "input_blocks.0.0.weight"
    if first in expected and first in found and expected[first].shape[1] != found[first].shape[1]:
        kinds = {True: "the upsampler (super_res=true)", False: "the base model (super_res=false)"}
        seen = "an upsampler" if found[first].shape[1] > expected[first].shape[1] else "a base model"
        return (
            f"it looks like {seen} checkpoint ({first} takes {found[first].shape[1]} input channels) "
            f"but this is {kinds[super_res]}, which takes {expected[first].shape[1]}"
        )
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} keys missing (first: {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (first: {unexpected[0]})"] if unexpected else []
        return "; ".join(parts)
    for key, value in expected.items():
        if value.shape != found[key].shape:
            return f"{key} has shape {tuple(found[key].shape)}, the model expects {tuple(value.shape)}"
    return None


def glide_param_groups(model: GlideUNet) -> dict[str, list[nn.Parameter]]:
    """``{"text_encoder": [...], "unet": [...]}``: every parameter exactly once, for optimizer groups
    with their own learning rates (or to freeze the text encoder)."""
    return {"text_encoder": list(model.text_encoder_parameters()), "unet": list(model.unet_parameters())}


# --------------------------------------------------------------------------- released configurations


def glide_base(**kwargs: object) -> GlideUNet:
    """GLIDE's 64x64 text-conditional base model (385M); ``kwargs`` override, e.g. ``checkpoint=``."""
    return GlideUNet(**{"image_size": 64, "num_res_blocks": 3, "super_res": False, **kwargs})  # type: ignore[arg-type]


def glide_upsample(**kwargs: object) -> GlideUNet:
    """GLIDE's 64 -> 256 text-conditional upsampler (398M); ``kwargs`` override, e.g. ``checkpoint=``."""
    return GlideUNet(**{"image_size": 256, "num_res_blocks": 2, "super_res": True, **kwargs})  # type: ignore[arg-type]
