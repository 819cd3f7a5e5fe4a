"""DiT: Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers"), after facebookresearch/DiT models.py, adapted to our model contract.

Departures from the reference, all deliberate:
- The output is a velocity with the input's channels (no learned variance, ``learn_sigma`` is gone).
- Time is conditioned as MeanFlow does: one embedder for t and one for the interval t - r, summed with
  the label embedding; plain flow matching passes r = t, so the interval embedder sees 0.
- Attention is PyTorch's fused SDPA; a jvp through the model runs inside ``models.layers.jvp_safe_kernels``.
- Class dropout for classifier-free guidance lives in the loss, which passes the null index.
- The 2D sin-cos position embedding is a buffer computed in torch, not a frozen parameter from numpy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.contract import Model
from models.layers import LabelEmbedder, TimestepEmbedder, maybe_checkpoint, zero_


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine of token features; x (B, T, D), shift and scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos features of positions (M,) -> (M, dim), computed in float64 as DiT/MAE do."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2D position embedding of a grid_size x grid_size token grid in row-major order; -> (T, dim).

    The first half of the channels encodes the column, the second half the row, as in DiT/MAE.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


class PatchEmbed(nn.Module):
    """Image to patch tokens: a conv with kernel = stride = patch; (B, C, H, W) -> (B, T, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # contiguous: a transposed view would carry its (B, D, T) layout through every residual add, and
        # each layer norm and linear would copy it back
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a biased qkv projection, as timm's ``Attention`` in DiT."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, T, D/heads) each; unbind's backward is one stack, not 3 zero-filled copies
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D/heads)
        return self.proj(h.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: c gives shift, scale and a residual gate for each branch."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of each token to its patch; (B, T, D) -> (B, T, p*p*C)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C)


class DiT(Model):
    """``v(x, t, r, cond)``: a DiT on patches of x, conditioned on t, t - r and a class label.

    ``num_classes=0`` builds an unconditional model (no label embedder; ``cond`` must be None).
    Otherwise ``cond=None`` selects the learned null class, as classifier-free guidance needs.
    ``activation_checkpointing`` recomputes each block's activations in the backward pass (DiT-XL/2 on
    256x256 latents on one GPU).
    """

    data_kinds = ("image", "latent")
    output = "field"  # a tensor of x's shape: velocity, average velocity or eps, as its loss trains it

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"DiT patch_size={patch_size} does not divide input_size={input_size}; "
                "choose a patch size that divides the image (2, 3, 5, ...) or resize the data"
            )
        if hidden_size % num_heads:
            raise ValueError(f"DiT num_heads={num_heads} does not divide hidden_size={hidden_size}; change either")
        if hidden_size % 4:
            raise ValueError(f"DiT hidden_size={hidden_size} must be a multiple of 4 (2D sin-cos position embedding)")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes
        self.activation_checkpointing = activation_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.interval_embedder = TimestepEmbedder(hidden_size)  # embeds t - r
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        # Fixed, a function of the sizes alone; kept in the state dict so a meta-built model can load it.
        self.register_buffer("pos_embed", sincos_2d(hidden_size, input_size // patch_size)[None])  # (1, T, D)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier everywhere, small embeddings, and zeros where adaLN-Zero needs them."""

        def basic_init(module: nn.Module) -> None:
            # The patch embedding is initialised as the linear map of each flattened patch.
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for embedder in (self.t_embedder, self.interval_embedder):
            nn.init.normal_(embedder.fc1.weight, std=0.02)
            nn.init.normal_(embedder.fc2.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the model outputs zeros.
        for module in self.modules():
            if isinstance(module, (DiTBlock, FinalLayer)):
                zero_(module.adaLN_modulation)
        zero_(self.final_layer.linear)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Patch tokens back to an image; (B, T, p*p*C) -> (B, C, H, W)."""
        p, c, g = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"DiT was built for {self.input_size}x{self.input_size} inputs but got "
                f"{x.shape[-2]}x{x.shape[-1]}; set model.input_size to the data's resolution"
            )
        c = self.t_embedder(t) + self.interval_embedder(t - r)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(cond, x.shape[0], x.device)  # (B, D)
        elif cond is not None:
            raise ValueError("DiT was built with num_classes=0 (unconditional): pass cond=None or set num_classes")
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        for block in self.blocks:
            h = maybe_checkpoint(self.activation_checkpointing, block, h, c)  # (B, T, D)
        return self.unpatchify(self.final_layer(h, c))  # (B, C, H, W)


# Size variants (DiT paper, Table 1); kwargs give input_size, in_channels, num_classes, mlp_ratio.
def DiT_XL_2(**kwargs) -> DiT:
    return DiT(hidden_size=1152, depth=28, num_heads=16, patch_size=2, **kwargs)


def DiT_XL_4(**kwargs) -> DiT:
    return DiT(hidden_size=1152, depth=28, num_heads=16, patch_size=4, **kwargs)


def DiT_XL_8(**kwargs) -> DiT:
    return DiT(hidden_size=1152, depth=28, num_heads=16, patch_size=8, **kwargs)


def DiT_L_2(**kwargs) -> DiT:
    return DiT(hidden_size=1024, depth=24, num_heads=16, patch_size=2, **kwargs)


def DiT_L_4(**kwargs) -> DiT:
    return DiT(hidden_size=1024, depth=24, num_heads=16, patch_size=4, **kwargs)


def DiT_L_8(**kwargs) -> DiT:
    return DiT(hidden_size=1024, depth=24, num_heads=16, patch_size=8, **kwargs)


def DiT_B_2(**kwargs) -> DiT:
    return DiT(hidden_size=768, depth=12, num_heads=12, patch_size=2, **kwargs)


def DiT_B_4(**kwargs) -> DiT:
    return DiT(hidden_size=768, depth=12, num_heads=12, patch_size=4, **kwargs)


def DiT_B_8(**kwargs) -> DiT:
    return DiT(hidden_size=768, depth=12, num_heads=12, patch_size=8, **kwargs)


def DiT_S_2(**kwargs) -> DiT:
    return DiT(hidden_size=384, depth=12, num_heads=6, patch_size=2, **kwargs)


def DiT_S_4(**kwargs) -> DiT:
    return DiT(hidden_size=384, depth=12, num_heads=6, patch_size=4, **kwargs)


def DiT_S_8(**kwargs) -> DiT:
    return DiT(hidden_size=384, depth=12, num_heads=6, patch_size=8, **kwargs)
