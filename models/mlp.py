"""Time-conditioned MLP velocity field for dense data (2D toys, Gaussian mixtures)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.contract import Model


class MLP(Model):
    """``v(x, t, r)``: an MLP on the features ``[x, t, t - r]``.

    Feeding ``t - r`` (zero for plain flow matching, where r = t) rather than ``r`` lets one
    network serve both flow matching and MeanFlow's average velocity, as the MeanFlow paper does.
    """

    data_kinds = ("dense",)
    output = "field"  # a tensor of x's shape: velocity, average velocity or eps, as its loss trains it

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, activation: str = "SiLU"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        act = getattr(nn, activation)
        layers: list[nn.Module] = [nn.Linear(dim + 2, hidden), act()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), act()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            raise ValueError("MLP is unconditional: drop 'cond' from the batch or use a conditional model")
        h = torch.cat([x, t[:, None].to(x.dtype), (t - r)[:, None].to(x.dtype)], dim=1)  # (B, D+2)
        return self.net(h)  # (B, D)
