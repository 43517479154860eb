"""NRE: the ratio losses, the sampler, accuracy on the linear-Gaussian task and Lorenz-96, persistence, errors."""

import copy
import math

import pytest
import torch

import sbida
from sbida.estimators import NRE, Estimator, load
from sbida.estimators.nre import _empirical_metric, _hessian, _mala, _resample, _sample_windows
from sbida.posterior import SamplerPosterior

SMALL = {"channels": 8, "depth": 1, "emb_features": 8, "ratio_channels": 8, "steps": 4,
         "ref_transforms": 2}  # a small reference flow (the SMC tests rely on its randomized log-Jacobian)


@pytest.fixture(scope="module")
def tiny():
    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=8, n_states=40)
    train, val = task.simulate(progress=False).split(0.75, 0.25)
    est = NRE(task, **SMALL)
    est.fit(train, val, epochs=2, steps_per_epoch=3, batch_size=32, progress=False)
    return task, train, val, est


def test_mala_samples_a_known_gaussian():
    """The sampler alone: a correlated Gaussian target (condition number ~5) from a mismatched diagonal proposal,
    3 windows at once (MALA mixes slowly on badly conditioned targets: the proposal's scales are its only
    preconditioner)."""
    g = torch.Generator().manual_seed(0)
    D, b = 6, 3
    A = 0.3 * torch.randn(b, D, D, generator=g) / math.sqrt(D) + torch.eye(D)
    cov = A @ A.transpose(-1, -2)
    mu = torch.randn(b, D, generator=g)
    target = torch.distributions.MultivariateNormal(mu, cov)
    loc, scale = mu + 0.5, cov.diagonal(dim1=-2, dim2=-1).sqrt() * 0.7  # off centre, too narrow
    z, acc = _sample_windows(target.log_prob, loc, scale * 1.5, 4000, 60, g)
    assert z.shape == (4000, b, D) and acc.shape == (b,)
    assert ((acc > 0.3) & (acc < 0.9)).all(), acc
    assert torch.allclose(z.mean(0), mu, atol=0.08)
    emp = torch.einsum("nbi,nbj->bij", z - z.mean(0), z - z.mean(0)) / 3999
    assert torch.allclose(emp, cov, atol=0.15), (emp - cov).abs().max()


def test_hessian_matches_autograd_on_a_non_quadratic_target():
    """The batched Hessian (D copies of the batch, one double backward) against torch's, window by window."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)

    def f(z):  # (..., 3, 5) -> (..., 3): a different non-quadratic function for each window
        return -torch.log(torch.cosh(torch.einsum("bij,...bj->...bi", W, z))).sum(-1) - 0.1 * z.pow(4).sum(-1)

    z = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lp, grad, hess = _hessian(f, z)
    assert torch.allclose(lp, f(z))
    for b in range(3):
        def f_b(v, b=b):
            return f(torch.cat([z[:b], v[None], z[b + 1:]]))[b]

        assert torch.allclose(hess[b], torch.autograd.functional.hessian(f_b, z[b]), atol=1e-10)
        assert torch.allclose(grad[b], torch.autograd.functional.jacobian(f_b, z[b]), atol=1e-10)


def test_laplace_sampler_is_exact_on_an_ill_conditioned_gaussian():
    """Newton + Laplace proposal + MALA on correlated Gaussians (correlation condition number ~1e3, as the
    linear-Gaussian task's posteriors) from a wrong diagonal start: exact moments; the diagonal proposal is not."""
    g = torch.Generator().manual_seed(0)
    D, b = 16, 3
    k = torch.arange(D, dtype=torch.float64)
    corr = torch.exp(-((k[:, None] - k[None]) % D).minimum((k[None] - k[:, None]) % D).square() / 8)  # periodic
    scales = 0.5 + torch.rand(b, D, generator=g, dtype=torch.float64)
    cov = (scales[:, :, None] * corr * scales[:, None, :] + 1e-3 * torch.eye(D)).float()
    assert torch.linalg.cond(cov).min() > 500
    mu = torch.randn(b, D, generator=g)
    target = torch.distributions.MultivariateNormal(mu, cov)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    z, acc = _sample_windows(target.log_prob, mu + sd, sd, 2000, 10, g, newton=2, inflate=1.1)
    assert ((acc > 0.4) & (acc < 0.9)).all(), acc
    err_mean = ((z.mean(0) - mu) / sd).abs().max()
    emp = torch.einsum("nbi,nbj->bij", z - z.mean(0), z - z.mean(0)) / (len(z) - 1)
    err_cov = ((emp - cov) / (sd[:, :, None] * sd[:, None, :])).abs().max()
    assert err_mean < 0.12 and err_cov < 0.12, (float(err_mean), float(err_cov))
    # the whitened samples are standard normal along the least likely direction (the smallest eigenvalue)
    lam, V = torch.linalg.eigh(cov)
    w = torch.einsum("nbi,bi->nb", z - mu, V[:, :, 0]) / lam[:, 0].sqrt()
    assert (w.mean(0).abs() < 0.12).all() and ((w.std(0) - 1).abs() < 0.1).all(), (w.mean(0), w.std(0))
    z_diag, _ = _sample_windows(target.log_prob, mu + sd, sd, 2000, 10, g)
    w_diag = torch.einsum("nbi,bi->nb", z_diag - mu, V[:, :, 0]) / lam[:, 0].sqrt()
    # the diagonal proposal and mass matrix: resampling collapses and MALA does not recover in 10 steps
    assert (((w_diag.std(0) - 1).abs() > 0.3) | (w_diag.mean(0).abs() > 0.3)).all(), (w_diag.mean(0), w_diag.std(0))


def test_reference_resampling_and_mala_are_exact_on_a_correlated_gaussian():
    """The ``"reference"`` proposal's steps: candidates from a wider, shifted Gaussian reference, resampled with
    weights target / reference, then MALA with the candidates' covariance as mass matrix: the target's moments."""
    g = torch.Generator().manual_seed(1)
    D, b, m = 12, 2, 4000
    k = torch.arange(D, dtype=torch.float64)
    corr = torch.exp(-((k[:, None] - k[None]) % D).minimum((k[None] - k[:, None]) % D).square() / 6)
    cov = (0.8 * corr + 0.05 * torch.eye(D)).expand(b, D, D).float()
    mu = torch.randn(b, D, generator=g)
    target = torch.distributions.MultivariateNormal(mu, cov)
    ref = torch.distributions.MultivariateNormal(mu + 0.3, 2.0 * cov)  # g: wider and shifted
    cand = ref.loc + torch.einsum("bij,mbj->mbi", torch.linalg.cholesky(ref.covariance_matrix),
                                  torch.randn(m, b, D, generator=g))
    mass = _empirical_metric(cand, dense=True)
    z = _resample(cand, target.log_prob(cand) - ref.log_prob(cand), 2000, g)
    z, acc = _mala(target.log_prob, z, 20, mass, g)
    assert ((acc > 0.3) & (acc < 0.95)).all(), acc
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    emp = torch.einsum("nbi,nbj->bij", z - z.mean(0), z - z.mean(0)) / (len(z) - 1)
    err_mean = ((z.mean(0) - mu) / sd).abs().max()
    err_cov = ((emp - cov) / (sd[:, :, None] * sd[:, None, :])).abs().max()
    assert err_mean < 0.12 and err_cov < 0.12, (float(err_mean), float(err_cov))
    # resampling alone with uniform weights keeps the reference (twice the variance): the weights do the work
    flat = _resample(cand, torch.zeros(m, b), 2000, g)
    assert (flat.var(0) / cov.diagonal(dim1=-2, dim2=-1) > 1.6).float().mean() > 0.9
    diag = _empirical_metric(cand, dense=False)
    assert diag.root.shape == (b, D) and torch.allclose(diag.root.square(), cand.var(0), rtol=0.01)


def test_loss_variants_and_marginal(tiny):
    task, train, val, est = tiny
    x, y, m, t = train.get(torch.arange(16))
    batch = est.standardize(x, y, m, t)
    assert torch.isfinite(est.loss(batch))
    bnre = NRE(task, **SMALL, loss="bnre", lmbda=0.0)
    bnre.load_state_dict(est.state_dict())
    bnre.hparams.update({k: v for k, v in est.hparams.items() if k not in ("loss", "lmbda")})  # the fitted tails
    losses = {}
    for lmbda in (0.0, 100.0):  # BNRE = NRE + lmbda x its balance term (>= 0): equal at 0, larger beyond
        bnre.hparams["lmbda"] = lmbda
        torch.manual_seed(1)  # the reference draws of the contrast term
        losses[lmbda] = bnre.loss(bnre.standardize(x, y, m, t)).item()
    torch.manual_seed(1)
    nre_loss = est.loss(batch).item()
    assert math.isfinite(losses[100.0]) and losses[0.0] == pytest.approx(nre_loss, abs=1e-5)
    assert losses[100.0] > nre_loss + 1e-4
    # the fitted marginal is a normalized Gaussian of the standardized states: its log-density matches torch's
    L = est.marginal_tril
    z = torch.randn(5, 8)
    ref = torch.distributions.MultivariateNormal(torch.zeros(8), scale_tril=L).log_prob(z)
    assert torch.allclose(est.marginal_log_prob(z), ref, atol=1e-4)
    # the diagonal reference: log g is the location-scale head's Gaussian; the flow's starts as that same Gaussian
    # (its couplings begin as the identity) and its Newton start is the location
    plain = NRE(task, **SMALL, reference="diag")
    plain.fit_standardization(train)
    assert plain.flow is None and torch.isfinite(plain.loss(plain.standardize(x, y, m, t)))
    fresh = NRE(task, **SMALL)
    b = fresh.standardize(x, y, m, t)
    with torch.no_grad():
        hmap, _ = fresh.encoder(b.y, b.mask, b.t)
        loc, scale = fresh._proposal(hmap)
        zz = torch.randn(3, 16, 8)
        ref = torch.distributions.Normal(loc, scale).log_prob(zz).sum(-1)
        assert torch.allclose(fresh.reference(hmap).log_prob(zz), ref, atol=1e-4)
        assert torch.allclose(fresh.reference_mode(hmap), loc, atol=1e-6)
    diag = NRE(task, **SMALL, marginal="diag")
    diag.fit_standardization(train)
    ref = torch.distributions.Normal(0, diag.marginal_tril).log_prob(z).sum(-1)
    assert torch.allclose(diag.marginal_log_prob(z), ref, atol=1e-4)


def test_flow_marginal_fits_lorenz96_states_better_than_the_gaussian_and_is_frozen(tmp_path):
    """``marginal="flow"``: held-out Lorenz-96 states (skewed, not Gaussian) are likelier under the fitted grid flow
    than under the Gaussian marginal (measured: 0.05 nats per value after 300 steps); the flow is then frozen, and
    saved with the estimator."""
    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=64, n_states=200)
    train, val = task.simulate(progress=False).split(0.75, 0.25, seed=0)
    flow = NRE(task, marginal="flow", marginal_steps=300, **SMALL)
    flow.fit_standardization(train)
    gauss = NRE(task, **SMALL)
    gauss.fit_standardization(train)
    x = val.get(torch.arange(len(val)))[0]
    z = ((x - flow.x_mean) / flow.x_std).flatten(1)
    with torch.no_grad():
        gain = (flow.marginal_log_prob(z).mean() - gauss.marginal_log_prob(z).mean()) / z.shape[-1]
    assert gain > 0.025, float(gain)
    assert not any(p.requires_grad for p in flow.marginal_flow.parameters())
    # the same seed, then training: the ratio losses leave the fitted marginal flow as it was
    trained = NRE(task, marginal="flow", marginal_steps=300, **SMALL)
    trained.fit(train, val, epochs=1, steps_per_epoch=3, batch_size=32, progress=False)
    after = trained.marginal_flow.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in flow.marginal_flow.state_dict().items())
    assert not torch.equal(trained.ratio.out.weight, NRE(task, **SMALL).ratio.out.weight)  # the classifier trained
    other = load(trained.save(tmp_path / "nre.pt"))
    with torch.no_grad():
        assert torch.equal(other.marginal_log_prob(z[:5]), trained.marginal_log_prob(z[:5]))
    with pytest.raises(ValueError, match="marginal must be"):
        NRE(task, marginal="kde")
    with pytest.raises(ValueError, match="marginal_steps"):
        NRE(task, marginal="flow", marginal_steps=0)


def test_posterior_shapes_and_unnormalized_density(tiny):
    task, train, _, est = tiny
    x, y, m, t = train.get(torch.arange(5))
    post = est.posterior(y, m, t)
    assert isinstance(post, SamplerPosterior) and post.has_log_prob
    s = post.sample(7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, 5, 8) and torch.isfinite(s).all()
    assert post.acceptance.shape == (5,)
    lp = post.log_prob(s)
    assert lp.shape == (7, 5) and torch.isfinite(lp).all()
    # log q = f + log g - sum log sigma_x: the density moves with the standardization (change of variables)
    with torch.no_grad():
        z = (s - est.x_mean) / est.x_std
        b = est.standardize(None, y, m, t)
        hmap, _ = est.encoder(b.y, b.mask, b.t)
        direct = est.log_posterior(z.flatten(2), est.ratio.context(hmap), est.reference(hmap)) - est.x_std.log().sum()
    assert torch.allclose(lp, direct, atol=1e-4)
    assert post.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 5, 8)
    assert est.posterior(y, m, t, steps=0).sample(4).shape == (4, 5, 8)


class _KnownRatio(torch.nn.Module):
    """A stand-in classifier with a known ``f``: a Gaussian log-likelihood of the standardized state about ``c``."""

    def __init__(self, c: torch.Tensor, precision: float):
        super().__init__()
        self.c, self.precision = c, precision

    def context(self, hmap):
        return hmap

    def forward(self, z, context):
        return -0.5 * self.precision * (z - self.c).square().sum(-1)


@pytest.mark.parametrize("space,tails", [("base", None), ("state", None), ("base", 5.0), ("state", 5.0)])
def test_smc_draws_the_reference_times_the_ratio_in_either_space(tiny, space, tails):
    """SMC over the reference flow's base variables (the default) or over the standardized states targets the same
    ``g e^f``, with a Gaussian base or a Student-t one (``ref_tails``): with a known ``f`` its particles' moments match
    self-normalized importance sampling of 40 000 draws of ``g`` (the same windows), its evidence ``log E_g[e^f]``
    matches theirs, and the recorded path holds ``log g`` of the particles (the density ``fit_temperature`` ranks the
    truths by), not the base's."""
    from sbida.estimators.nre import _reference_draws

    task, train, _, trained = tiny
    est = copy.deepcopy(trained)
    est.hparams.update(smc_space=space, ref_tails=tails)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a reference far from affine, whose log-Jacobian varies (the trained one is nearly affine)
        for p in est.flow.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    _, y, m, t = train.get(torch.arange(3))
    with torch.no_grad():
        b = est.standardize(None, y, m, t)
        hmap, _ = est.encoder(b.y, b.mask, b.t)
        ref = est.reference(hmap)
        c = _reference_draws(ref, est._base_noise(1, 3, g, hmap))[0] + 0.3  # off the reference's draws
        est.ratio = _KnownRatio(c, 0.5)
        xi = est._base_noise(40000, 3, g, hmap)
        draws = _reference_draws(ref, xi).double()
        log_jac = (est._base_log_prob(xi) - ref.log_prob(draws.float())).double()  # log |dT/du| + const
        log_w = est.ratio(draws.float(), hmap).double()
        w = torch.softmax(log_w, 0)[..., None]
        mean = (w * draws).sum(0)
        std = (w * (draws - mean).square()).sum(0).sqrt()
        log_z = torch.logsumexp(log_w, 0) - math.log(40000)
    assert log_jac.std(0).min() > 0.3, log_jac.std(0)
    assert (1 / w.square().sum(0)).min() > 400  # the importance sampler's reference is good enough
    res = est._smc_from_reference(hmap, hmap, 2000, 1.0, 20, g, record=True)
    v = res.particles.double()
    assert v.shape == (2000, 3, 8)
    assert ((v.mean(0) - mean) / std).abs().max() < 0.15, ((v.mean(0) - mean) / std).abs().max()
    assert torch.allclose(v.std(0), std, rtol=0.1), (v.std(0) / std)
    if tails is None:  # the evidence is the ratio's incremental weights alone (no base in it): checked once, its
        # noise at 2000 particles (about 0.05) being the tolerance's size
        assert torch.allclose(res.log_evidence.double(), log_z, atol=0.05), (res.log_evidence, log_z)
    with torch.no_grad():
        assert torch.allclose(res.path[-1][3], ref.log_prob(res.particles), atol=1e-4)
    with pytest.raises(ValueError, match="smc_space"):
        NRE(task, smc_space="latent", **SMALL)


def test_student_t_reference_base_is_fitted_and_kept_by_the_sampler(tiny, tmp_path):
    """``fit_tails`` (on by default at the end of fit) fits the reference's Student-t base by held-out likelihood; the
    SMC sampler keeps that base: with a nearly flat ratio its particles, mapped back to the base, have the Student-t's
    tail mass and median of ``|u|^2`` (a Gaussian prior in the moves would pull them to the chi-square's: 0.002 and
    7.3); ``ref_tails`` is saved with the model and checked."""
    from sbida.nn import IsotropicStudentT

    task, train, val, trained = tiny
    rec = trained.tails_record  # made by fit (ref_tails_fit: true)
    assert set(rec) == {"tails", "nll", "nll_gaussian", "windows"} and rec["windows"] == len(val)
    assert trained.hparams["ref_tails"] == rec["tails"] and 3 <= rec["tails"] <= 1e6
    assert rec["nll"] <= rec["nll_gaussian"] + 1e-9
    est = copy.deepcopy(trained)
    again = est.fit_tails(val, seed=1)
    assert again["tails"] == pytest.approx(rec["tails"], rel=1e-4)  # all of val: the same windows
    est.hparams["ref_tails"] = 5.0
    _, y, m, t = train.get(torch.arange(3))
    with torch.no_grad():
        b = est.standardize(None, y, m, t)
        hmap, _ = est.encoder(b.y, b.mask, b.t)
        ref = est.reference(hmap)
    est.ratio = _KnownRatio(torch.zeros(3, 8), 1e-3)
    res = est._smc_from_reference(hmap, hmap, 2000, 1.0, 20, torch.Generator().manual_seed(0))
    with torch.no_grad():
        r2 = ref.base_dist.transform(ref.transforms[0].inv(res.particles)).square().sum(-1)
    exact = IsotropicStudentT.unit(torch.zeros(1, 8), 5.0).sample((400000,)).square().sum(-1)
    p_exact = float((exact > 24).double().mean())  # about 0.047 (chi-square with 8 degrees of freedom: 0.002)
    tail = (r2 > 24).double().mean(0)
    assert ((tail - p_exact).abs() < 3 * math.sqrt(p_exact / 2000)).all(), (tail, p_exact)
    assert ((r2.median(0).values - exact.median()).abs() < 0.4).all(), (r2.median(0).values, exact.median())
    assert load(trained.save(tmp_path / "nre.pt")).hparams["ref_tails"] == rec["tails"]
    with pytest.raises(ValueError, match="ref_tails"):
        NRE(task, ref_tails=2.0, **SMALL)
    diag = NRE(task, **{**SMALL, "reference": "diag", "ref_tails": 5.0})
    with pytest.raises(ValueError, match="flow reference"):
        diag.fit_tails(val)
    u = torch.randn(4, 8)  # the diagonal reference keeps its Gaussian base, in its draws and its SMC prior alike
    assert diag._ref_df() is None and torch.equal(diag._base_log_prob(u), -0.5 * u.square().sum(-1))


def test_zero_temperature_is_the_reference_drawn_directly(tiny):
    """At ``ratio_temperature`` 0 the posterior is the reference ``g`` alone: drawn from it directly, without the
    classifier or SMC, with the moments of SMC's draws at a negligible temperature; its density is ``g``'s. The
    temperature fit scores 0 too (the first value of its default grid)."""
    task, train, val, trained = tiny
    _, y, m, t = train.get(torch.arange(3))
    near = copy.deepcopy(trained)
    near.hparams.update(ratio_temperature=1e-9, smc_moves=5)
    s_near = near.posterior(y, m, t).sample(3000, generator=torch.Generator().manual_seed(0)).double()
    est = copy.deepcopy(trained)
    est.hparams["ratio_temperature"] = 0.0

    class NoClassifier(torch.nn.Module):
        def context(self, hmap):
            return hmap

        def forward(self, z, context):
            raise AssertionError("the classifier was evaluated at temperature 0")

    est.ratio = NoClassifier()
    post = est.posterior(y, m, t)
    s = post.sample(3000, generator=torch.Generator().manual_seed(1)).double()
    assert torch.equal(post.acceptance, torch.ones(3))
    sd = s_near.std(0)
    assert ((s.mean(0) - s_near.mean(0)).abs() / sd).max() < 0.15 and torch.allclose(s.std(0), sd, rtol=0.1)
    lp = post.log_prob(s[:4].float())  # g's own density, normalized: the same as the one of the near-zero posterior
    assert torch.allclose(lp, near.posterior(y, m, t).log_prob(s[:4].float()), atol=1e-3)
    rec = copy.deepcopy(trained).fit_temperature(val, windows=6, particles=32, moves=2, seed=0)
    assert rec["grid"][0] == 0.0 and len(rec["grid"]) == 41 and math.isfinite(rec["score"][0])
    with pytest.raises(ValueError, match="ratio_temperature"):
        NRE(task, ratio_temperature=-0.5, **SMALL)


def test_laplace_fit_is_made_once_per_posterior(tiny, monkeypatch):
    import sbida.estimators.nre as nre_module

    task, train, _, est = tiny
    calls = []
    real = nre_module._laplace
    monkeypatch.setattr(nre_module, "_laplace", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y, m, t = train.get(torch.arange(5))
    post = est.posterior(y, m, t, proposal="laplace")
    a = post.sample(6, generator=torch.Generator().manual_seed(0))
    first = len(calls)
    b = post.sample(6, generator=torch.Generator().manual_seed(0))
    assert first >= 1 and len(calls) == first and torch.equal(a, b)
    est.posterior(y, m, t, proposal="laplace").sample(6)  # a new posterior object makes its own fit
    assert len(calls) == 2 * first


def test_auto_proposal_is_smc_with_a_flow_else_laplace_for_small_states(tiny, monkeypatch):
    """``proposal="auto"`` (the default) moves draws of the flow reference by tempered SMC; with the diagonal
    reference it fits the Laplace proposal up to ``LAPLACE_MAX`` values and takes the learned location-scale map
    beyond (the Hessian costs D passes per window); ``posterior(..., proposal=)`` overrides it."""
    import sbida.estimators.nre as nre_module

    task, train, _, est = tiny
    assert est.hparams["proposal"] == "auto" and est._proposal_kind("auto") == "smc"
    diag = NRE(task, reference="diag", **SMALL)
    assert diag._proposal_kind("auto") == "laplace"
    calls = []
    real = nre_module._laplace
    monkeypatch.setattr(nre_module, "_laplace", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y, m, t = train.get(torch.arange(3))
    g = torch.Generator().manual_seed(0)
    default = est.posterior(y, m, t)
    a = default.sample(5, generator=torch.Generator().manual_seed(2))
    assert not calls and a.shape == (5, 3, 8) and torch.isfinite(a).all() and default.acceptance.shape == (3,)
    again = est.posterior(y, m, t, proposal="smc").sample(5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, again)
    resampled = est.posterior(y, m, t, proposal="reference").sample(5, generator=torch.Generator().manual_seed(2))
    assert resampled.shape == a.shape and not torch.equal(a, resampled) and not calls
    est.posterior(y, m, t, proposal="laplace").sample(4, generator=g)
    assert len(calls) >= 1
    n = len(calls)
    learned = est.posterior(y, m, t, proposal="learned").sample(4, generator=g)
    assert len(calls) == n and learned.shape == (4, 3, 8)
    monkeypatch.setattr(nre_module, "LAPLACE_MAX", 4)  # now K = 8 is a large state
    assert diag._proposal_kind("auto") == "learned" and est._proposal_kind("auto") == "smc"


def test_save_load_gives_identical_samples(tiny, tmp_path):
    task, train, _, est = tiny
    x, y, m, t = train.get(torch.arange(4))
    other = load(est.save(tmp_path / "nre.pt"))
    assert isinstance(other, NRE) and other.hparams == est.hparams
    a = est.posterior(y, m, t).sample(20, generator=torch.Generator().manual_seed(3))
    b = other.posterior(y, m, t).sample(20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(est.posterior(y, m, t).log_prob(a), other.posterior(y, m, t).log_prob(a))
    assert torch.equal(other.marginal_tril, est.marginal_tril)


def test_temperature_fit_after_fit_sets_and_saves_the_temperature(tiny, tmp_path):
    """``temperature_fit`` runs :meth:`NRE.fit_temperature` on the validation windows at the end of ``fit``: the same
    temperature as a direct call with the same seed and settings, kept in the saved model; without validation windows
    it warns and keeps the temperature."""
    task, train, val, _ = tiny
    options = {**SMALL, "smc_moves": 2, "temperature_windows": 6, "temperature_max": 2.0}
    est = NRE(task, temperature_fit="coverage", **options)
    est.fit(train, val, epochs=1, steps_per_epoch=2, batch_size=32, progress=False, seed=3)
    record = est.temperature_record
    assert record["criterion"] == "coverage" and record["windows"] == 6 and len(record["score"]) == 41
    by = record["score_by_statistic"]  # the score is the sum of both joint statistics' ECEs
    assert set(by) == {"hpd", "distance"} and record["score"] == pytest.approx([a + b for a, b in zip(*by.values())])
    assert est.hparams["ratio_temperature"] == record["temperature"]
    again = est.fit_temperature(val, windows=6, max_temperature=2.0, seed=3)
    assert again["temperature"] == record["temperature"] and again["score"] == pytest.approx(record["score"])
    assert load(est.save(tmp_path / "nre.pt")).hparams["ratio_temperature"] == record["temperature"]
    plain = NRE(task, temperature_fit="coverage", **options)
    with pytest.warns(UserWarning, match="no validation windows"):
        plain.fit(train, None, epochs=1, steps_per_epoch=1, batch_size=32, progress=False)
    assert plain.hparams["ratio_temperature"] == 1.0 and plain.temperature_record is None
    with pytest.raises(ValueError, match="temperature_fit"):
        NRE(task, temperature_fit="ece", **SMALL)


def test_bad_input_is_a_clear_error(tiny, rejects_bad_windows):
    task, train, _, est = tiny
    x, y, m, t = train.get(torch.arange(4))
    rejects_bad_windows(NRE(task, **SMALL), est, y, m, t)
    with pytest.raises(ValueError, match="expected states of shape"):
        est.posterior(y, m, t).log_prob(torch.zeros(4, 16))
    with pytest.raises(ValueError, match="steps must be"):
        est.posterior(y, m, t, steps=-1)
    with pytest.raises(ValueError, match="unknown options"):
        est.posterior(y, m, t, step=3)
    with pytest.raises(ValueError, match="proposal must be"):
        NRE(task, proposal="flow")
    with pytest.raises(ValueError, match="proposal must be"):
        est.posterior(y, m, t, proposal="flow")
    with pytest.raises(ValueError, match="reference must be"):
        NRE(task, reference="gauss")
    with pytest.raises(ValueError, match="loss must be"):
        NRE(task, loss="cnre")
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        NRE(task, ratio_chanels=8)
    with pytest.raises(ValueError, match="transforms"):
        NRE(task, **{**SMALL, "ref_transforms": [3, 0]})
    per_level = NRE(task, **{**SMALL, "ref_transforms": [3, 1]})  # couplings per level of the reference's flow
    assert len(per_level.flow.couplings) == len(NRE(task, **{**SMALL, "ref_transforms": 1}).flow.couplings) + 2


def test_config_file_matches_the_code():
    cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "nre.yaml")
    assert set(cfg["estimator"]) == set(NRE.defaults) | {"seed"}
    import inspect
    assert set(cfg["fit"]) <= set(inspect.signature(Estimator.fit).parameters)


def interpolate_last(y: torch.Tensor, m: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Naive estimate: the last observation time's station values, linearly interpolated on the periodic grid."""
    K = H.shape[1]
    pos = H.argmax(1).double()  # (M,) station cells
    cells = torch.arange(K, dtype=torch.float64)
    d = (cells[:, None] - pos[None]) % K  # distance to each station going right
    left = d.argmin(1)  # nearest station at or to the left of each cell
    right = (left + 1) % len(pos)
    gap = ((pos[right] - pos[left]) % K).clamp_min(1)
    w = d[torch.arange(K), left] / gap
    v = y[:, -1].double()
    return (1 - w) * v[:, left] + w * v[:, right]


@pytest.mark.slow
def test_nre_beats_climatology_and_interpolation_on_lorenz96():
    task = sbida.tasks.get("lorenz96", K=40)
    train, val, test = task.simulate(progress=False, n_trajectories=32, n_states=200).split(0.8, 0.1, 0.1)
    est = NRE(task, channels=16, depth=2, emb_features=16, ratio_channels=16, smc_moves=20)
    est.fit(train, val, epochs=4, steps_per_epoch=20, batch_size=256, lr=3e-3, progress=False)
    x, y, m, t = test.get(torch.arange(0, len(test), 3))
    mean = est.posterior(y, m, t).sample(100, generator=torch.Generator().manual_seed(0)).mean(0).double()
    rmse = (mean - x).pow(2).mean().sqrt()
    clim = (train.get(torch.arange(len(train)))[0].double().mean(0) - x).pow(2).mean().sqrt()
    naive = (interpolate_last(y, m, task.observation.matrix(dtype=torch.float64)) - x).pow(2).mean().sqrt()
    assert rmse < 0.8 * min(clim, naive), (float(rmse), float(clim), float(naive))


@pytest.mark.slow
def test_flow_reference_is_calibrated_on_linear_gaussian():
    """A small budget on the linear-Gaussian task, 400 independent windows against the exact posterior: calibrated
    highest-density regions, a posterior mean near the exact one, and a ratio whose error over exact draws,
    Var[log q - log p], is well below the diagonal-Gaussian reference's (20.5 nats^2 at a larger budget)."""
    task = sbida.tasks.get("linear-gaussian")
    train, val = task.simulate(progress=False, n_trajectories=256).split(0.9, 0.1)
    est = NRE(task, steps=6, smc_moves=20)  # the default's 100 moves are for rougher ratios (lorenz96 K=40)
    est.fit(train, val, epochs=3, steps_per_epoch=100, batch_size=256, progress=False)
    x, y, m, t = task.independent_windows(400, seed=7)
    mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, task.window.offsets(),
                                               every=task.config.data.save_every)
    exact = torch.distributions.MultivariateNormal(mean, cov)
    with torch.no_grad():
        post = est.posterior(y, m, t)
        s = post.sample(64, generator=torch.Generator().manual_seed(0))
        cover = sbida.diagnostics.expected_coverage(post, x.float(), samples=s)
        ref = exact.sample((64,))
        gap = post.log_prob(ref.float()).double() - exact.log_prob(ref)
    rmse = (s.mean(0).double() - x).pow(2).mean().sqrt() / (mean - x).pow(2).mean().sqrt()
    ratio_var = gap.var(0).mean()
    assert cover.ece <= 0.05, cover.ece
    assert rmse < 1.4, float(rmse)  # measured 1.29 at this budget: NRE's mean is not yet within 15 % of the exact
    assert ratio_var < 10, float(ratio_var)

    # the ratio's temperature fitted on validation windows (f is nearly 0 here: the reference carries the posterior)
    fitted = est.fit_temperature(val, windows=32, particles=32, moves=5, max_temperature=2.0)
    assert est.hparams["ratio_temperature"] == fitted["temperature"] and fitted["windows"] == 32
    with pytest.raises(ValueError, match="criterion"):
        est.fit_temperature(val, criterion="ece")
    with pytest.raises(ValueError, match="grid"):
        est.fit_temperature(val, grid=[0.5, 3.0])


def test_temperature_scores_find_the_temperature_of_an_overconfident_gaussian_ratio():
    """Truths from the exact posterior of prior N(0, I) and a Gaussian likelihood; the "ratio" is twice the true
    log-likelihood (an overconfident classifier). From one SMC path up to that ratio, the likelihood, the
    highest-density coverage and both joint coverages of the truths all pick a temperature near 1/2, and the coverages
    score the untempered ratio badly. The distance credibility at the path's last temperature is that of its final
    particles."""
    from sbida.diagnostics.coverage import distance_credibility
    from sbida.estimators.nre import _temperature_score, _temperature_scores, _tempered_distance_credibility
    from sbida.samplers import smc

    g = torch.Generator().manual_seed(0)
    B, D, N = 200, 4, 256
    P = 4.0 * torch.eye(D, dtype=torch.float64)  # observation precision
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    r = x + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)  # r ~ N(x, P^-1)

    def log_p_and_f(v):
        d = v - r
        return -0.5 * v.pow(2).sum(-1), 2 * (-0.5 * torch.einsum("...bi,ij,...bj->...b", d, P, d))

    res = smc(log_p_and_f, torch.randn(N, B, D, generator=g, dtype=torch.float64), moves=10, generator=g,
              record=True, record_state=torch.clone)
    lp_true, f_true = log_p_and_f(x[None])
    s = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    for criterion, tol in (("nll", 0.06), ("hpd", 0.16), ("coverage", 0.16)):
        per = _temperature_scores(res.path, s, lp_true[0], f_true[0], criterion, x, torch.Generator().manual_seed(1))
        assert per.shape == (2 if criterion == "coverage" else 1, len(s), B)
        score = _temperature_score(per, criterion)[0]
        best = float(s[int(score.argmin())])
        assert abs(best - 0.5) <= tol, (criterion, best, score)
        if criterion != "nll":  # the ratio at 1: overconfident; at 1/2: calibrated
            assert score[-1] > 0.1 * len(per) and score[9] < 0.05 * len(per), (criterion, score)
    at_end = _tempered_distance_credibility(res.path, torch.ones(1, dtype=torch.float64), x)
    assert torch.equal(at_end[0], distance_credibility(res.particles, x))
    with pytest.raises(ValueError, match="record_state"):
        _tempered_distance_credibility(smc(log_p_and_f, torch.randn(8, B, D, dtype=torch.float64), moves=1,
                                           record=True).path, s, x)
