"""Energy distance between two samples (Székely & Rizzo 2013).

Estimator (V-statistic, all pairs including i = j):

    D^2(X, Y) = 2/(n m) sum_ij |x_i - y_j| - 1/n^2 sum_ij |x_i - x_j| - 1/m^2 sum_ij |y_i - y_j|

with Euclidean norms, computed in float64. It is the squared energy distance: non-negative for
any two samples, exactly zero when they are the same multiset of points, and in one dimension
equal to the square of ``scipy.stats.energy_distance``. Lower is better.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _mean_pairwise_distance(a: Tensor, b: Tensor, chunk: int) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, len(a), chunk):
        total += torch.cdist(a[i : i + chunk], b, compute_mode="donot_use_mm_for_euclid_dist").sum()
    return total / (len(a) * len(b))


def energy_distance(x: Tensor, y: Tensor, chunk: int = 1024) -> float:
    """Squared energy distance between samples ``x`` (n, ...) and ``y`` (m, ...)."""
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    xy = _mean_pairwise_distance(x, y, chunk)
    xx = _mean_pairwise_distance(x, x, chunk)
    yy = _mean_pairwise_distance(y, y, chunk)
    return float(2 * xy - xx - yy)
