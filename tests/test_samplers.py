"""sbida.samplers: the diagonal preconditioner, the choice between dense and diagonal, and tempered SMC against
one-shot importance resampling where the likelihood is sharp relative to the prior. (The exact Gaussian posterior,
evidence and mode weights of the dense SMC are checked in test_reference.py.)"""

import math

import pytest
import torch

from sbida.samplers import _dense, effective_sample_size, mala, smc, systematic_resample, tempered_log_evidence


def _gaussian_problem(B: int = 2, D: int = 10, scale: float = 0.15):
    """Prior N(0, I) in D dims; likelihood N(r; v, s^2 C) with a correlated C: a posterior far narrower than the
    prior (scale ``s``) with correlations. Returns ``f``, the exact mean ``(B, D)`` and covariance ``(B, D, D)``."""
    g = torch.Generator().manual_seed(5)
    k = torch.arange(D, dtype=torch.float64)
    corr = torch.exp(-((k[:, None] - k[None]) % D).minimum((k[None] - k[:, None]) % D).square() / 4)
    C = (scale**2) * (0.9 * corr + 0.1 * torch.eye(D, dtype=torch.float64))
    P = torch.linalg.inv(C)
    r = 1.5 * torch.randn(B, D, generator=g, dtype=torch.float64)

    def f(v):
        d = v - r
        return -0.5 * v.pow(2).sum(-1), -0.5 * torch.einsum("nbi,ij,nbj->nb", d, P, d)

    cov = torch.linalg.inv(torch.eye(D, dtype=torch.float64) + P)
    mean = torch.einsum("ij,bj->bi", cov @ P, r)
    f.P, f.r = P, r
    return f, mean, cov.expand(B, D, D)


def _moment_errors(s, mean, cov):
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    emp = torch.einsum("nbi,nbj->bij", s - s.mean(0), s - s.mean(0)) / (len(s) - 1)
    err_cov = ((emp - cov) / (sd[..., None] * sd[..., None, :])).abs().max()
    return float(((s.mean(0) - mean) / sd).abs().max()), float(err_cov)


@pytest.mark.parametrize("dense", [True, False])
def test_smc_moments_with_a_dense_or_diagonal_preconditioner(dense):
    f, mean, cov = _gaussian_problem()
    N = 2000
    g = torch.Generator().manual_seed(0)
    res = smc(f, torch.randn(N, 2, 10, generator=g, dtype=torch.float64), moves=20, generator=g, dense=dense)
    assert ((res.acceptance > 0.3) & (res.acceptance < 0.8)).all(), res.acceptance
    assert (res.temperatures >= 4).all()  # the posterior is far narrower than the prior: several temperatures
    err_mean, err_cov = _moment_errors(res.particles, mean, cov)
    assert err_mean < 0.15 and err_cov < 0.15, (err_mean, err_cov)


def test_one_shot_resampling_collapses_where_smc_does_not():
    """The same problem: resampling N prior draws once by the likelihood keeps a handful of distinct draws."""
    f, mean, cov = _gaussian_problem()
    N = 2000
    g = torch.Generator().manual_seed(1)
    v0 = torch.randn(N, 2, 10, generator=g, dtype=torch.float64)
    ll = f(v0)[1]
    assert (effective_sample_size(ll) < 5).all()  # the check below is about a sharp likelihood
    once = torch.gather(v0, 0, systematic_resample(ll, g)[..., None].expand(-1, -1, 10))
    assert once.unique(dim=0).shape[0] < 10
    assert _moment_errors(once, mean, cov)[1] > 0.5
    res = smc(f, v0, moves=20, generator=g)
    assert res.particles[:, 0].unique(dim=0).shape[0] > 0.9 * N


def test_the_preconditioner_is_diagonal_without_enough_draws_or_for_large_states():
    assert _dense(None, 10, 20) and not _dense(None, 10, 19) and not _dense(None, 300, 10**6)
    assert _dense(True, 300, 5) and not _dense(False, 10, 10**6)
    # 6 particles in 8 dimensions (float32): their covariance is singular, the diagonal one is not
    f, *_ = _gaussian_problem(B=1, D=8, scale=1.0)

    def f32(v):
        return tuple(a.float() for a in f(v.double()))

    res = smc(f32, torch.randn(6, 1, 8), moves=3)
    assert res.particles.shape == (6, 1, 8) and torch.isfinite(res.particles).all()


def test_mala_with_a_diagonal_preconditioner_samples_an_anisotropic_gaussian():
    """Independent coordinates with scales 0.05 to 5: the diagonal preconditioner learned in warm-up equalizes
    them (without it the step would be set by the narrowest one)."""
    D = 6
    scales = torch.logspace(math.log10(0.05), math.log10(5.0), D, dtype=torch.float64)

    def log_prob(v):
        return -0.5 * (v / scales).pow(2).sum(-1)

    g = torch.Generator().manual_seed(2)
    draws, acc = mala(log_prob, torch.randn(64, 1, D, generator=g, dtype=torch.float64), steps=300, warmup=200,
                      generator=g, dense=False)
    s = draws.reshape(-1, D)
    assert ((acc > 0.3) & (acc < 0.9)).all(), acc
    assert ((s.std(0) / scales - 1).abs() < 0.15).all(), s.std(0) / scales
    assert ((s.mean(0) / scales).abs() < 0.15).all()


def test_tempered_log_evidence_matches_the_gaussian_evidence_at_every_temperature():
    """log E_p[l^tau] for prior N(0, I) and l = exp(-(v - r)^T P (v - r) / 2): with A = tau P,
    log Z = -log det(I + A) / 2 - r^T A (I + A)^{-1} r / 2, far from 0 (the check can fail)."""
    f, *_ = _gaussian_problem(B=2, D=6, scale=0.5)
    g = torch.Generator().manual_seed(4)
    res = smc(f, torch.randn(2000, 2, 6, generator=g, dtype=torch.float64), moves=10, generator=g, record=True)
    assert res.path is not None and len(res.path) == int(res.temperatures.max()) + 1
    assert torch.equal(res.path[-1][1], res.log_evidence)
    P, r = f.P, f.r
    taus = torch.tensor([0.0, 0.1, 0.35, 0.7, 1.0], dtype=torch.float64)
    est = tempered_log_evidence(res.path, taus)
    eye = torch.eye(6, dtype=torch.float64)
    for i, tau in enumerate(taus):
        A = tau * P
        exact = -0.5 * torch.logdet(eye + A) - 0.5 * torch.einsum("bi,ij,bj->b", r, A @ torch.linalg.inv(eye + A), r)
        assert torch.allclose(est[i], exact, atol=0.15), (float(tau), est[i], exact)
    assert (est[-1] < -3).all()
    with pytest.raises(ValueError, match="lie in"):
        tempered_log_evidence(res.path, torch.tensor([1.5]))
