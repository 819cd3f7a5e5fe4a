import math

import pytest
import torch
from sklearn.datasets import make_moons

from dataloaders.base import SampledData, TensorLoader
from dataloaders.kmeans import GaussianMixture
from dataloaders.toy2d import sample_8gaussians, sample_checkerboard, sample_moons


def test_moons_without_noise_are_sklearns_points_scaled_as_torchcfm():
    ours = sample_moons(400, noise=0.0, generator=torch.Generator().manual_seed(0)).double()
    ref = torch.from_numpy(make_moons(400, noise=0.0, shuffle=False)[0]) * 3 - 1
    key = lambda x: x[torch.argsort(x[:, 0] * 1e4 + x[:, 1])]  # noqa: E731
    torch.testing.assert_close(key(ours), key(ref), atol=1e-5, rtol=0)


def test_moons_noise_is_one_uniform_diagonal_offset_per_point():
    g = torch.Generator().manual_seed(0)
    clean = sample_moons(1000, noise=0.0, generator=torch.Generator().manual_seed(1))
    noisy = sample_moons(1000, noise=0.2, generator=g)
    # torchdyn's moons shift both coordinates by the same U(0, 0.2) draw: x - y is unchanged
    diff = lambda x: torch.sort(x[:, 0] - x[:, 1]).values  # noqa: E731
    torch.testing.assert_close(diff(noisy), diff(clean), atol=1e-4, rtol=0)
    shift = torch.sort(noisy.sum(1)).values - torch.sort(clean.sum(1)).values
    assert 0 < shift.mean() / 6 < 0.2 * 0.75  # mean offset 0.1 per coordinate, times 3, two coordinates


def test_8gaussians_match_torchcfm_centres_and_spread():
    x = sample_8gaussians(40000, generator=torch.Generator().manual_seed(0))
    radius = x.norm(dim=1)
    assert abs(radius.mean() - 5.0) < 0.1
    angles = torch.atan2(x[:, 1], x[:, 0])
    nearest = torch.round(angles / (math.pi / 4)) * (math.pi / 4)
    centres = 5 * torch.stack([nearest.cos(), nearest.sin()], 1)
    std = (x - centres).std(0)
    torch.testing.assert_close(std, torch.full((2,), 0.1**0.25), atol=0.02, rtol=0)


def test_checkerboard_fills_alternate_squares_only():
    x = sample_checkerboard(20000, generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 4
    cell = torch.floor(x / 2).long()
    assert torch.all((cell[:, 0] + cell[:, 1]) % 2 == 0)
    assert len(torch.unique(cell, dim=0)) == 8


def test_gaussian_mixture_draws_around_fixed_centres():
    mix = GaussianMixture(k=4, dim=16, std=0.1, center_seed=3)
    again = GaussianMixture(k=4, dim=16, std=0.1, center_seed=3)
    torch.testing.assert_close(mix.centers, again.centers)
    x = mix(1000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1000, 16)
    assert torch.cdist(x, mix.centers).min(1).values.max() < 1.0


def test_sampled_data_is_reproducible_and_held_out():
    def make():
        return SampledData(sample_moons, dim=2, num_train=512, num_eval=128, batch_size=64, data_seed=5)

    a, b = make(), make()
    torch.testing.assert_close(a.train_set, b.train_set)
    torch.testing.assert_close(a.eval_set, b.eval_set)
    assert a.eval_set.shape == (128, 2) and not torch.equal(a.train_set[:128], a.eval_set)


def test_loader_visits_every_sample_once_per_epoch_in_a_seeded_order():
    data = torch.arange(100.0)[:, None]
    loader = TensorLoader(data, batch_size=10, seed=0)
    assert len(loader) == 10
    loader.set_epoch(0)
    epoch0 = torch.cat([b["x1"] for b in loader])
    assert sorted(epoch0[:, 0].tolist()) == list(range(100))
    loader.set_epoch(1)
    epoch1 = torch.cat([b["x1"] for b in loader])
    loader.set_epoch(0)
    torch.testing.assert_close(torch.cat([b["x1"] for b in loader]), epoch0)
    assert not torch.equal(epoch0, epoch1)


def test_loader_rejects_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="batch_size=20 exceeds the 10 training samples"):
        TensorLoader(torch.zeros(10, 2), batch_size=20, seed=0)
