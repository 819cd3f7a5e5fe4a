import numpy as np
import pytest
import torch
from scipy.stats import energy_distance as scipy_energy_distance

from evaluation.energy_distance import energy_distance


def test_zero_for_identical_samples():
    x = torch.randn(300, 2)
    assert energy_distance(x, x.clone()) == 0.0


def test_grows_monotonically_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    values = [energy_distance(x, y + s) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] < 0.02 and values[-1] > 4


def test_equals_the_square_of_scipys_one_dimensional_energy_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=400), rng.normal(0.3, 1.5, size=250)
    ours = energy_distance(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None])
    assert ours == pytest.approx(scipy_energy_distance(a, b) ** 2, rel=1e-9)


def test_symmetric_and_chunk_independent():
    x, y = torch.randn(257, 3), torch.randn(130, 3) + 1
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-12)
    assert energy_distance(x, y, chunk=7) == pytest.approx(energy_distance(x, y, chunk=1024), rel=1e-12)


def test_flattens_images_and_rejects_dimension_mismatch():
    assert energy_distance(torch.zeros(4, 1, 2, 2), torch.ones(4, 4)) == pytest.approx(2 * 2.0)
    with pytest.raises(ValueError, match="differ in dimension"):
        energy_distance(torch.zeros(4, 2), torch.zeros(4, 3))
