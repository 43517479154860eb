"""The linear-Gaussian system and its exact window posterior."""

import pytest
import torch
from scipy.stats import chi2

import sbida
from sbida.observations import RandomMask, Stations
from sbida.simulators import LinearGaussian


def make_windows(lg, obs, B, T, offsets, n_states, seed):
    g = torch.Generator().manual_seed(seed)
    traj = lg.rollout(lg.initial_state(B, generator=g, dtype=torch.float64), n_states - 1)
    y, m = obs.sample(traj, generator=g)
    lo, hi = -offsets[0], n_states - 1 - offsets[-1]
    tgt = torch.randint(lo, hi + 1, (B,), generator=g)
    idx = tgt[:, None] + torch.tensor(offsets)
    rows = torch.arange(B)[:, None]
    return traj[torch.arange(B), tgt], y[rows, idx], m[rows, idx], tgt.double()


def whitened(x, mean, cov):
    L = torch.linalg.cholesky(cov)
    return torch.linalg.solve_triangular(L, (x - mean)[..., None], upper=False).squeeze(-1)


@pytest.mark.parametrize("offsets", [list(range(-9, 1)), list(range(-5, 5))], ids=["end", "centre"])
def test_exact_posterior_is_calibrated(offsets):
    """Whitened errors of the truth under the exact posterior are N(0, I): unit variance, chi-square coverage."""
    lg = LinearGaussian()
    obs = RandomMask(0.5, 0.5, state_shape=(32,))
    x, y, m, t = make_windows(lg, obs, 4000, 10, offsets, 48, seed=0)
    mean, cov = lg.exact_posterior(y, m, t, obs, offsets)
    z = whitened(x, mean, cov)
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.02
    q = (z**2).sum(-1)
    for level in (0.5, 0.9):
        cover = (q < chi2.ppf(level, 32)).double().mean().item()
        assert abs(cover - level) < 0.025, (level, cover)
    # informative: far tighter than the prior
    assert (x - mean).pow(2).mean().sqrt() < 0.3 * x.std()


def test_exact_posterior_matches_joint_gaussian_conditioning():
    """Against an independent computation: condition the joint Gaussian of (x_target, observed y) directly."""
    lg = LinearGaussian(K=12, diffusion=0.02)
    obs = Stations(every=3, kernel_width=0.8, sigma=0.4, p_missing=0.3, state_shape=(12,))
    offsets = [-2, -1, 0, 1]
    x, y, m, t = make_windows(lg, obs, 3, 4, offsets, 12, seed=1)
    mean, cov = lg.exact_posterior(y, m, t, obs, offsets)
    H = obs.matrix(dtype=torch.float64)
    for b in range(3):
        s = int(t[b])
        P0 = lg.prior_cov
        # rows: each observed value as a linear function of x_0; target = A^s x_0
        G = torch.cat([(H @ lg.propagator(s + o))[m[b, j]] for j, o in enumerate(offsets)])
        yo = torch.cat([y[b, j][m[b, j]] for j in range(len(offsets))])
        At = lg.propagator(s)
        Cxy = At @ P0 @ G.T
        Cyy = G @ P0 @ G.T + 0.4**2 * torch.eye(len(yo), dtype=torch.float64)
        ref_mean = Cxy @ torch.linalg.solve(Cyy, yo)
        ref_cov = At @ P0 @ At.T - Cxy @ torch.linalg.solve(Cyy, Cxy.T)
        assert torch.allclose(mean[b], ref_mean, atol=1e-8)
        assert torch.allclose(cov[b], ref_cov, atol=1e-8)


def test_propagator_stays_well_conditioned():
    lg = LinearGaussian()
    assert torch.linalg.cond(lg.propagator(25)).item() < 1e6
    assert torch.linalg.eigvalsh(lg.prior_cov).min() > 0


def test_prior_variance_at_time_t():
    lg = LinearGaussian()
    g = torch.Generator().manual_seed(2)
    traj = lg.rollout(lg.initial_state(20000, generator=g, dtype=torch.float64), 40, every=40)
    emp = torch.cov(traj[:, -1].T)
    assert torch.allclose(emp, lg.prior(40)[1], atol=0.03)
    assert torch.allclose(traj[:, 0].var(0).mean(), torch.tensor(1.0, dtype=torch.float64), atol=0.03)


def test_bad_input():
    with pytest.raises(ValueError, match="integer"):
        LinearGaussian(shift=0.5)
    lg = LinearGaussian()
    obs = RandomMask(0.5, 0.5, state_shape=(32,))
    y, m = obs.sample(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="before"):
        lg.exact_posterior(y, m, torch.tensor([3.0, 20.0]), obs, list(range(-9, 1)))


def test_exact_posterior_after_a_burn_in():
    """A dataset with a spin-up starts its clock at its first saved state: ``burn_in`` (from its meta) propagates the
    prior of ``x_0`` over it. Mean squared whitened error 31.9 of 32 with it, 28.1 without (too wide a prior)."""
    task = sbida.tasks.get("linear-gaussian", n_trajectories=64, burn_in=5)
    data = task.simulate(progress=False)
    x, y, m, t = data.get(torch.arange(0, len(data), 7))
    q = {}
    for b in (data.meta["burn_in"], 0):
        mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, data.window.offsets(),
                                                   data.meta["every"], burn_in=b)
        q[b] = whitened(x.double(), mean, cov).pow(2).sum(-1).mean().item()
    assert abs(q[5] - 32) < 1.5 and q[0] < 30, q
    with pytest.raises(ValueError, match="burn_in"):
        task.simulator.exact_posterior(y, m, t, task.observation, data.window.offsets(), burn_in=-1)
