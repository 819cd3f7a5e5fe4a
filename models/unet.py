"""ADM-style UNet velocity field for pixel-space images (CIFAR-10 flow matching and MeanFlow).

The layout of Ho et al. (DDPM) as refined by Dhariwal & Nichol (ADM, "improved diffusion"):
residual blocks conditioned on one embedding vector through scale-shift group norm, self-attention
at chosen resolutions, strided-conv downsampling, nearest + conv upsampling and a skip from every
encoder stage to the decoder. Norms and attention are PyTorch's fused kernels; MeanFlow's
``torch.func.jvp`` through the network runs inside ``models.layers.jvp_safe_kernels``.

At the CIFAR-10 setting of the DenoisingZoo notes (128 channels, mult 1-2-2-2, 3 residual blocks
a level, attention at 16x16) it has 51,157,507 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.contract import Model
from models.layers import GroupNorm, LabelEmbedder, TimestepEmbedder, channels_last, maybe_checkpoint, zero_


class Conditioning(nn.Module):
    """One vector from (t, r, cond): ``embed_t(t) + embed_dt(t - r) + embed_label(cond)``.

    MeanFlow's time conditioning: the second embedder sees the interval length, which is 0 in plain
    flow matching (r = t). With ``num_classes=0`` the label table holds only the null row, a learned
    bias, and passing labels is an error.
    """

    def __init__(self, dim: int, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.embed_t = TimestepEmbedder(dim)
        self.embed_dt = TimestepEmbedder(dim)
        self.embed_label = LabelEmbedder(num_classes, dim)

    def forward(self, t: Tensor, r: Tensor, cond: Tensor | None) -> Tensor:
        if cond is not None and self.num_classes == 0:
            raise ValueError("model is unconditional (num_classes=0): drop 'cond' from the batch or set num_classes")
        return self.embed_t(t) + self.embed_dt(t - r) + self.embed_label(cond, t.shape[0], t.device)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding sets a per-channel scale and shift of the second norm.

    When the width changes the shortcut is a 1x1 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; ``emb`` is accepted and unused.

    ``qkv`` and ``proj`` are 1x1 convs in the state dict (ADM's layout) applied as linear maps of
    (B, HW, C) tokens: q, k and v come out with the head dim contiguous, which SDPA's fused CPU and
    CUDA kernels need (a strided layout falls back to its math path).
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C)
        q, k, v = qkv.reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # (B, HW, C)
        h = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Stage(nn.ModuleList):
    """Blocks run in order on (h, emb): the unit of activation checkpointing."""

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            h = block(h, emb)
        return h


class UNet(Model):
    """``v(x, t, r, cond)`` on (B, C, H, W) images; output has x's shape.

    ``attention_resolutions`` are feature-map sizes (``image_size`` halved once per level). The
    encoder yields one skip per stage (input conv, each residual block, each downsample); the
    decoder has ``num_res_blocks + 1`` blocks per level, each consuming one skip.
    ``activation_checkpointing`` recomputes each stage's activations in the backward pass (less memory,
    one more forward of the network per training step).
    """

    data_kinds = ("image", "latent")
    output = "field"  # a tensor of x's shape: velocity, average velocity or eps, as its loss trains it

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 4,
        norm_groups: int = 32,
        num_classes: int = 0,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        emb_dim = 4 * channels
        self.cond = Conditioning(emb_dim, num_classes)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, dropout, norm_groups)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads, norm_groups)

        widths = [channels * m for m in channel_mult]
        last = len(widths) - 1
        if image_size % 2**last:
            raise ValueError(f"image_size={image_size} cannot be halved {last} times (len(channel_mult)={last + 1})")
        resolutions = [image_size // 2**level for level in range(len(widths))]
        if missing := set(attention_resolutions) - set(resolutions):
            raise ValueError(f"attention_resolutions {sorted(missing)} match no feature-map size; sizes: {resolutions}")

        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for level, (width, size) in enumerate(zip(widths, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                blocks: list[nn.Module] = [res(ch, width)]
                blocks += [attn(width)] if size in attention_resolutions else []
                self.down.append(Stage(blocks))
                ch = width
                skips.append(ch)
            if level != last:
                self.down.append(Stage([Downsample(ch)]))
                skips.append(ch)

        self.mid = Stage([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, size = widths[level], resolutions[level]
            for i in range(num_res_blocks + 1):
                stage: list[nn.Module] = [res(ch + skips.pop(), width)]
                stage += [attn(width)] if size in attention_resolutions else []
                ch = width
                if level != 0 and i == num_res_blocks:
                    stage.append(Upsample(ch))
                self.up.append(Stage(stage))

        self.norm_out = GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero the last layer of every residual branch and the output conv (ADM): each block starts as
        the identity and the fresh model predicts zero velocity."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_(module.conv2)
            elif isinstance(module, AttentionBlock):
                zero_(module.proj)
        zero_(self.conv_out)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Tensor | None = None) -> Tensor:
        emb = self.cond(t, r, cond)  # (B, 4C)
        h = channels_last(self.conv_in(x))  # (B, C, H, W)
        skips = [h]
        for stage in self.down:
            h = maybe_checkpoint(self.activation_checkpointing, stage, h, emb)
            skips.append(h)
        h = maybe_checkpoint(self.activation_checkpointing, self.mid, h, emb)  # (B, C_last, H/2^(L-1), W/2^(L-1))
        for stage in self.up:
            h = maybe_checkpoint(self.activation_checkpointing, stage, torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # (B, C_in, H, W), x's layout
