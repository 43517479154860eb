"""Observation operators: matrices, kernels, noise, masks, likelihoods and errors."""

import math

import pytest
import torch

from sbida.observations import Linear, RandomMask, Stations, Subsample

OPERATORS = [
    (lambda: Stations(every=4, kernel_width=0.8, radius=2, sigma=0.5), (40,)),
    (lambda: Stations(count=6, kernel_width=1.0, sigma=0.5), (2, 32, 32)),
    (lambda: RandomMask(p_missing=0.75, sigma=1.0), (40,)),
    (lambda: Subsample(stride=4, sigma=0.3), (2, 16, 16)),
    (lambda: Linear(torch.randn(7, 24), sigma=0.2), (24,)),
]


@pytest.mark.parametrize("make, shape", OPERATORS)
def test_matrix_agrees_with_apply_and_adjoint(make, shape):
    obs = make().bind(shape)
    x = torch.randn(5, *shape, dtype=torch.float64)
    H = obs.matrix(dtype=torch.float64)
    assert H.shape == (math.prod(obs.obs_shape), math.prod(shape))
    assert torch.allclose(obs.apply(x).flatten(1), x.flatten(1) @ H.T, atol=1e-12)
    y = torch.randn(5, *obs.obs_shape, dtype=torch.float64)
    # <Hx, y> = <x, H^T y>
    assert torch.allclose((obs.apply(x) * y).flatten(1).sum(1), (x * obs.adjoint(y)).flatten(1).sum(1), atol=1e-10)


def test_station_kernel():
    """K=40, one station per block of 4, Gaussian weights over +-2 cells with std 0.8, summing to one."""
    obs = Stations(every=4, kernel_width=0.8, radius=2, sigma=0.5, state_shape=(40,))
    H = obs.matrix(dtype=torch.float64)
    assert H.shape == (10, 40)
    assert torch.allclose(H.sum(1), torch.ones(10, dtype=torch.float64))
    w = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=torch.float64) / 0.8) ** 2)
    w = w / w.sum()
    row = H[0]  # station at cell 0: cells 38, 39, 0, 1, 2 (periodic)
    assert torch.allclose(row[[38, 39, 0, 1, 2]], w)
    assert (H > 0).sum(1).eq(5).all()
    assert obs.positions(40).tolist() == list(range(0, 40, 4))


def test_stations_2d_are_separable_and_per_channel():
    obs = Stations(count=6, kernel_width=1.0, sigma=0.5, state_shape=(2, 32, 32))
    assert obs.obs_shape == (2, 6, 6)
    x = torch.zeros(1, 2, 32, 32)
    x[0, 1] = 1.0  # only channel 1 is non-zero
    y = obs.apply(x)
    assert torch.allclose(y[0, 0], torch.zeros(6, 6)) and torch.allclose(y[0, 1], torch.ones(6, 6), atol=1e-6)


@pytest.mark.parametrize("p_missing, sigma", [(0.75, 1.0), (0.5, 0.5), (0.0, 0.3)])
def test_noise_and_mask_statistics(p_missing, sigma):
    obs = RandomMask(p_missing=p_missing, sigma=sigma, state_shape=(40,))
    x = torch.randn(4000, 40, dtype=torch.float64)
    y, mask = obs.sample(x, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and y.shape == mask.shape == x.shape
    assert abs(mask.double().mean().item() - (1 - p_missing)) < 0.01
    assert (y[~mask] == 0).all()
    r = (y - x)[mask]
    assert abs(r.std().item() / sigma - 1) < 0.02 and abs(r.mean().item()) < 0.02 * sigma


def test_same_generator_same_sample():
    obs = Stations(every=4, sigma=0.5, p_missing=0.2, state_shape=(40,))
    x = torch.randn(8, 40)
    a = obs.sample(x, generator=torch.Generator().manual_seed(5))
    b = obs.sample(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_log_likelihood_closed_form():
    obs = Stations(every=4, sigma=0.5, p_missing=0.3, state_shape=(40,))
    x = torch.randn(6, 40, dtype=torch.float64)
    y, mask = obs.sample(x)
    z = torch.randn(6, 40, dtype=torch.float64)  # another state
    ref = torch.distributions.Normal(obs.apply(z), 0.5).log_prob(y)
    ref = (ref * mask).sum(-1)
    assert torch.allclose(obs.log_likelihood(z, y, mask), ref, atol=1e-10)
    # broadcast over samples of states: (n, B, K) against (B, M)
    zs = torch.randn(3, 6, 40, dtype=torch.float64)
    assert obs.log_likelihood(zs, y, mask).shape == (3, 6)


def test_bad_input():
    with pytest.raises(ValueError, match="p_missing"):
        RandomMask(p_missing=1.0)
    with pytest.raises(ValueError, match="sigma"):
        RandomMask(p_missing=0.5, sigma=0.0)
    with pytest.raises(ValueError, match="no station"):
        Stations(every=64, state_shape=(40,))
    with pytest.raises(ValueError, match="no station"):
        Stations(every=41, state_shape=(40,))
    with pytest.raises(ValueError, match="stride"):
        Subsample(stride=64, state_shape=(40,))
    with pytest.raises(ValueError, match="shape"):
        Stations(every=4, state_shape=(40,)).apply(torch.randn(3, 41))
    with pytest.raises(ValueError, match="state shape"):
        Stations(every=4).apply(torch.randn(3, 40))
    with pytest.raises(ValueError, match="values"):
        Linear(torch.randn(3, 10), state_shape=(12,))
    obs = RandomMask(0.5, 1.0, state_shape=(8,))
    y, m = obs.sample(torch.randn(2, 8))
    with pytest.raises(ValueError, match="same shape"):
        obs.log_likelihood(torch.randn(2, 8), y, m[:, :4])
