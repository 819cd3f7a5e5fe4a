"""Couplings between a noise batch x_0 and a data batch x_1.

A coupling reorders the noise, never the data, so labels or other conditioning that travel
with x_1 stay aligned.
"""

from __future__ import annotations

import numpy as np
import ot
import torch
from torch import Tensor


class Coupling:
    """Pairs each data point with a noise point: ``coupling(x_0, x_1) -> (x_0', x_1)``."""

    def __call__(self, x_0: Tensor, x_1: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class IndependentCoupling(Coupling):
    """The independent coupling of plain conditional flow matching: leave the pairs as drawn."""

    def __call__(self, x_0: Tensor, x_1: Tensor) -> tuple[Tensor, Tensor]:
        return x_0, x_1


class OTCoupling(Coupling):
    """Minibatch exact optimal transport (Tong et al. 2023, OT-CFM; Pooladian et al. 2023).

    Solves the discrete OT problem between the two batches with POT's network simplex
    (``ot.emd``) on squared Euclidean costs. For equal batch sizes and uniform weights the
    optimal plan is a permutation, so the noise is permuted along it; torchcfm instead samples
    pairs from the plan with replacement, which repeats some points and drops others.
    """

    def __call__(self, x_0: Tensor, x_1: Tensor) -> tuple[Tensor, Tensor]:
        n = len(x_0)
        if len(x_1) != n:
            raise ValueError(f"OT coupling needs equal batch sizes, got {n} and {len(x_1)}")
        cost = torch.cdist(x_0.flatten(1).double(), x_1.flatten(1).double()).pow(2).cpu().numpy()
        weights = np.full(n, 1.0 / n)
        plan = ot.emd(weights, weights, cost)
        perm = torch.from_numpy(plan.argmax(axis=0)).to(x_0.device)  # noise row for each data column
        return x_0[perm], x_1
