"""Small time-conditioned conv net for small images (MNIST-size, CIFAR-size): a cheap baseline to the UNet.

Full resolution throughout, no attention: a stack of residual conv blocks, each told (t, r, cond)
through one added per-channel bias.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.contract import Model
from models.layers import GroupNorm, channels_last, zero_
from models.unet import Conditioning


class ConvBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the embedding's per-channel bias, GroupNorm-SiLU-conv; residual."""

    def __init__(self, channels: int, emb_dim: int, norm_groups: int):
        super().__init__()
        self.norm1 = GroupNorm(norm_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels)
        self.norm2 = GroupNorm(norm_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]  # (B, C, H, W)
        return x + self.conv2(F.silu(self.norm2(h)))


class SmallCNN(Model):
    """``v(x, t, r, cond)`` on (B, C, H, W) images; ~0.5M parameters at the default width.

    Conditioning is the UNet's (t, t - r and label embeddings summed), at width ``2 * channels``.
    """

    data_kinds = ("image", "latent")
    output = "field"  # a tensor of x's shape: velocity, average velocity or eps, as its loss trains it

    def __init__(
        self, in_channels: int = 3, channels: int = 64, num_blocks: int = 5, norm_groups: int = 8, num_classes: int = 0
    ):
        super().__init__()
        emb_dim = 2 * channels
        self.cond = Conditioning(emb_dim, num_classes)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList([ConvBlock(channels, emb_dim, norm_groups) for _ in range(num_blocks)])
        self.norm_out = GroupNorm(norm_groups, channels)
        self.conv_out = nn.Conv2d(channels, in_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero the output conv: the fresh model predicts zero velocity."""
        zero_(self.conv_out)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Tensor | None = None) -> Tensor:
        emb = self.cond(t, r, cond)  # (B, 2C)
        h = channels_last(self.conv_in(x))  # (B, C, H, W)
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # (B, C_in, H, W), x's layout
