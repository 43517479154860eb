"""The Posterior kinds: sampling shapes, moments, densities against scipy, reproducibility and errors."""

import numpy as np
import pytest
import torch
from scipy.stats import chi2, f, kstest, multivariate_normal, multivariate_t
from scipy.stats import norm as scipy_norm

from sbida.diagnostics import sbc
from sbida.posterior import (
    DistributionPosterior,
    EnsemblePosterior,
    GaussianPosterior,
    PointPosterior,
    Posterior,
    SamplerPosterior,
    fit_student_t,
)


def random_cov(B, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    return A @ A.mT / D + 0.3 * torch.eye(D, dtype=torch.float64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- Gaussian --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["cov", "scale_tril", "std"])
def test_gaussian_shapes_moments_and_density(form):
    B, shape = 3, (2, 3)
    D = 6
    mean = torch.randn(B, *shape, dtype=torch.float64, generator=gen(1))
    cov = random_cov(B, D)
    if form == "std":
        cov = torch.diag_embed(cov.diagonal(dim1=1, dim2=2))
        post = GaussianPosterior(mean, std=cov.diagonal(dim1=1, dim2=2).sqrt().reshape(B, *shape))
    elif form == "cov":
        post = GaussianPosterior(mean, cov=cov)
    else:
        post = GaussianPosterior(mean, scale_tril=torch.linalg.cholesky(cov))
    assert post.has_log_prob and post.batch_size == B and post.state_shape == shape and post.event_size == D
    s = post.sample(40000, generator=gen(2))
    assert s.shape == (40000, B, *shape) and s.dtype == torch.float64
    flat = s.reshape(40000, B, D)
    assert torch.allclose(flat.mean(0), mean.reshape(B, D), atol=0.03)
    emp = torch.stack([torch.cov(flat[:, b].T) for b in range(B)])
    assert torch.allclose(emp, cov, atol=0.04)
    assert torch.equal(post.mean(), mean)
    assert torch.allclose(post.std(), cov.diagonal(dim1=1, dim2=2).sqrt().reshape(B, *shape))
    assert torch.allclose(post.covariance(), cov)
    x = s[:5]
    lp = post.log_prob(x)
    assert lp.shape == (5, B)
    ref = np.stack([multivariate_normal(mean[b].flatten().numpy(), cov[b].numpy()).logpdf(
        x[:, b].reshape(5, D).numpy()) for b in range(B)], 1)
    assert np.allclose(lp.numpy(), ref, atol=1e-8)
    # the same generator state gives the same samples
    assert torch.equal(post.sample(7, generator=gen(3)), post.sample(7, generator=gen(3)))


@pytest.mark.parametrize("form", ["cov", "scale_tril", "std"])
def test_student_t_posterior_has_the_covariance_and_scipy_density(form):
    """``df=nu``: scipy's multivariate t with shape ``cov (nu - 2) / nu`` (the same covariance), draws with that
    covariance whose squared Mahalanobis distances follow ``D (nu - 2) / nu F(D, nu)``, reproducible draws."""
    B, shape, D, nu = 2, (2, 3), 6, 5.0
    mean = torch.randn(B, *shape, dtype=torch.float64, generator=gen(1))
    cov = random_cov(B, D)
    if form == "std":
        cov = torch.diag_embed(cov.diagonal(dim1=1, dim2=2))
        post = GaussianPosterior(mean, std=cov.diagonal(dim1=1, dim2=2).sqrt().reshape(B, *shape), df=nu)
    elif form == "cov":
        post = GaussianPosterior(mean, cov=cov, df=nu)
    else:
        post = GaussianPosterior(mean, scale_tril=torch.linalg.cholesky(cov), df=nu)
    assert torch.equal(post.mean(), mean) and torch.allclose(post.covariance(), cov)
    s = post.sample(40000, generator=gen(2))
    flat = s.reshape(40000, B, D)
    emp = torch.stack([torch.cov(flat[:, b].T) for b in range(B)])
    assert torch.allclose(emp, cov, atol=0.1), (emp - cov).abs().max()
    r2 = post.mahalanobis(s[:4000])
    ref_r2 = torch.einsum("nbi,bij,nbj->nb", flat[:4000] - mean.reshape(B, D), torch.linalg.inv(cov),
                          flat[:4000] - mean.reshape(B, D))
    assert torch.allclose(r2, ref_r2, rtol=1e-6, atol=1e-8)
    for b in range(B):
        assert kstest(r2[:, b].numpy() / (D * (nu - 2) / nu), f(D, nu).cdf).pvalue > 1e-3
        # the Gaussian's radii would be chi^2_D: the t's are not
        assert kstest(r2[:, b].numpy(), chi2(D).cdf).pvalue < 1e-6
    x = s[:5]
    ref = np.stack([multivariate_t(mean[b].flatten().numpy(), cov[b].numpy() * (nu - 2) / nu, df=nu).logpdf(
        x[:, b].reshape(5, D).numpy()) for b in range(B)], 1)
    assert np.allclose(post.log_prob(x).numpy(), ref, atol=1e-8)
    assert torch.equal(post.sample(7, generator=gen(3)), post.sample(7, generator=gen(3)))
    assert not torch.equal(post.sample(7, generator=gen(3)), post.sample(7, generator=gen(4)))


def test_student_t_mixing_is_seeded_by_its_generator_alone():
    """The variance factors: mean 1 and the variance of (nu - 2) / chi^2_nu, the same for the same generator seed,
    and torch's global generator left where it was."""
    from sbida.posterior import student_t_mixing
    state = torch.get_rng_state()
    w = student_t_mixing(10.0, (20000, 2), torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(w, student_t_mixing(10.0, (20000, 2), torch.Generator().manual_seed(3)))
    assert not torch.equal(w, student_t_mixing(10.0, (20000, 2), torch.Generator().manual_seed(4)))
    # E[1 / chi^2_nu] = 1 / (nu - 2), Var = 2 / ((nu - 2)^2 (nu - 4)): mean 1, variance 2 / (nu - 4) = 1 / 3
    assert w.shape == (20000, 2) and w.dtype == torch.float64
    assert abs(float(w.mean()) - 1) < 0.02 and abs(float(w.var()) - 1 / 3) < 0.05, (float(w.mean()), float(w.var()))


def test_student_t_posterior_errors():
    mean = torch.zeros(2, 3)
    for df in (2.0, 1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="df must be"):
            GaussianPosterior(mean, std=torch.ones(2, 3), df=df)


@pytest.mark.parametrize("scale", [False, True])
def test_fit_student_t_recovers_the_degrees_of_freedom_and_the_spread(scale):
    """Whitened truths drawn from c x a unit-covariance t of 6 degrees of freedom in 20 dimensions (c = 1.2 where
    the scale is fitted, else 1): the fit finds both, and the NLLs are the truths' exact ones."""
    D, nu, c, N = 20, 6.0, (1.2 if scale else 1.0), 20000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=g, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        w = torch.distributions.Chi2(torch.tensor(nu, dtype=torch.float64)).sample((N, 1))
    x = c * ((nu - 2) / w).sqrt() * z
    r2 = x.square().sum(-1)
    fit = fit_student_t(r2, D, log_jac=0.5, scale=scale)
    assert 5.4 < fit["df"] < 6.6 and fit["scale"] == pytest.approx(c, rel=0.02), fit
    assert fit["windows"] == N
    shape = np.eye(D) * fit["scale"] ** 2 * (fit["df"] - 2) / fit["df"]
    exact = -(torch.tensor(multivariate_t(np.zeros(D), shape, df=fit["df"]).logpdf(x.numpy())) + 0.5).mean()
    assert fit["nll"] == pytest.approx(float(exact), rel=1e-6)
    gauss = -(torch.tensor(multivariate_normal(np.zeros(D), np.eye(D)).logpdf(x.numpy())) + 0.5).mean()
    assert fit["nll_gaussian"] == pytest.approx(float(gauss), rel=1e-9)
    assert fit["nll"] < fit["nll_gaussian"] - 1.0
    # Gaussian truths: tails near the upper bound
    gauss_fit = fit_student_t(torch.randn(N, D, generator=g, dtype=torch.float64).square().sum(-1), D, scale=scale)
    assert gauss_fit["df"] > 200, gauss_fit
    with pytest.raises(ValueError, match="r2"):
        fit_student_t(torch.tensor([1.0, float("nan")]), D)


def test_gaussian_errors():
    mean = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianPosterior(mean)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianPosterior(mean, cov=torch.eye(4).expand(2, 4, 4), std=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(B, D, D\)"):
        GaussianPosterior(mean, cov=torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="std must have the shape"):
        GaussianPosterior(mean, std=torch.ones(2, 5))
    with pytest.raises(ValueError, match="NaN"):
        GaussianPosterior(torch.full((2, 4), float("nan")), std=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(B, \*state_shape\)"):
        GaussianPosterior(torch.zeros(4), std=torch.ones(4))
    post = GaussianPosterior(mean, std=torch.ones(2, 4))
    with pytest.raises(ValueError, match="expected states of shape"):
        post.log_prob(torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="positive integer"):
        post.sample(0)


# -- ensemble --------------------------------------------------------------------------------------------------------
def test_ensemble_sampling_and_moments():
    members = torch.randn(10, 3, 4, generator=gen(0))
    post = EnsemblePosterior(members)
    assert post.size == 10 and post.batch_size == 3 and post.state_shape == (4,) and not post.has_log_prob
    s = post.sample(6, generator=gen(1))
    assert s.shape == (6, 3, 4)
    # without replacement: 6 distinct members, each one of the ensemble
    idx = [int((members[:, 0] == row[0]).all(-1).nonzero()) for row in s]
    assert len(set(idx)) == 6
    all_members = post.sample(10, generator=gen(1))
    assert torch.equal(all_members.sort(0).values, members.sort(0).values)
    assert post.sample(25, generator=gen(1)).shape == (25, 3, 4)  # with replacement
    # the diagnostics take each member once at most
    assert post.diagnostic_draws(25) == 10 and post.diagnostic_draws(4) == 4
    assert sbc(post, members[0], n_samples=25, generator=gen(2)).n_samples == 10
    assert torch.allclose(post.mean(), members.mean(0)) and torch.allclose(post.std(), members.std(0))
    assert torch.equal(EnsemblePosterior(members[:1]).std(), torch.zeros(3, 4))
    with pytest.raises(NotImplementedError, match="no density"):
        post.log_prob(members[0])


def test_ensemble_errors():
    with pytest.raises(ValueError, match=r"\(M, B, \*state_shape\)"):
        EnsemblePosterior(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        EnsemblePosterior(torch.tensor([[[0.0, float("inf")]]]))
    with pytest.raises(ValueError, match="state_shape"):
        EnsemblePosterior(torch.zeros(4, 2, 6), state_shape=(2, 3))


# -- distribution, sampler, point ------------------------------------------------------------------------------------
def test_distribution_posterior():
    loc, scale = torch.randn(3, 6, generator=gen(0)), 0.5 + torch.rand(3, 6, generator=gen(1))
    dist = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)
    post = DistributionPosterior(dist, (2, 3), sample_batch=7)
    state = torch.get_rng_state()
    s = post.sample(20, generator=gen(4))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert s.shape == (20, 3, 2, 3) and torch.equal(s, post.sample(20, generator=gen(4)))
    x = s[:2]
    ref = scipy_norm(loc.numpy(), scale.numpy()).logpdf(x.reshape(2, 3, 6).numpy()).sum(-1)
    assert np.allclose(post.log_prob(x).numpy(), ref, atol=1e-5)
    big = post.sample(4000, generator=gen(5)).reshape(4000, 3, 6)
    assert torch.allclose(big.mean(0), loc, atol=0.05)
    # Monte Carlo mean from 256 samples: within 4 standard errors
    assert ((post.mean().reshape(3, 6) - loc).abs() < 4 * scale / 16).all()
    with pytest.raises(ValueError, match="event shape"):
        DistributionPosterior(dist, (7,))


def test_sampler_posterior():
    def sample_fn(n, generator):
        return 2.0 + torch.randn(n, 4, 5, generator=generator)

    calls = []

    def counted(n, generator):
        calls.append(n)
        return sample_fn(n, generator)

    post = SamplerPosterior(counted, 4, (5,))
    assert not post.has_log_prob and post.sample(3).shape == (3, 4, 5)
    assert torch.allclose(post.mean(), torch.full((4, 5), 2.0), atol=0.3)
    assert torch.allclose(post.std(), torch.ones(4, 5), atol=0.2)
    assert torch.equal(post.mean(), post.mean()) and calls == [3, post.n_moments]  # moments: one cached draw
    # a fixed seed: a new posterior over the same sampler has the same moments
    assert torch.equal(SamplerPosterior(sample_fn, 4, (5,)).mean(), post.mean())
    with pytest.raises(NotImplementedError):
        post.log_prob(torch.zeros(4, 5))
    wrong = SamplerPosterior(lambda n, g: torch.zeros(n, 4, 6), 4, (5,))
    with pytest.raises(ValueError, match="expected"):
        wrong.sample(2)
    with_density = SamplerPosterior(sample_fn, 4, (5,), mean_fn=lambda: torch.zeros(4, 5),
                                    log_prob_fn=lambda x: -x.square().sum(-1))
    assert with_density.has_log_prob and torch.equal(with_density.mean(), torch.zeros(4, 5))
    assert torch.equal(with_density.log_prob(torch.ones(2, 4, 5)), torch.full((2, 4), -5.0))
    with pytest.raises(ValueError, match="expected states"):
        with_density.log_prob(torch.ones(2, 3, 5))


def test_point_posterior_and_base():
    est = torch.randn(2, 3)
    post = PointPosterior(est)
    s = post.sample(4)
    assert s.shape == (4, 2, 3) and (s == est).all()
    assert torch.equal(post.mean(), est) and torch.equal(post.std(), torch.zeros(2, 3))
    assert len(post) == 2 and "PointPosterior" in repr(post)
    with pytest.raises(ValueError):
        PointPosterior(torch.zeros(3))
    assert issubclass(PointPosterior, Posterior)
    with pytest.raises(NotImplementedError):
        Posterior().sample(1)
