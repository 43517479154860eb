"""Diagnostics on analytic Gaussian posteriors, against closed forms and against sbi's own functions."""

import json
import math

import pytest
import torch
from scipy.stats import norm

import sbida
from sbida import diagnostics as dg
from sbida.posterior import EnsemblePosterior, GaussianPosterior, SamplerPosterior

B, D, N_SAMPLES = 2000, 8, 1000


@pytest.fixture(scope="module")
def gaussian():
    """Synthetic windows: posteriors N(mu_b, Sigma_b) with random correlated covariances, truths drawn from them."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, D, D, generator=g) / math.sqrt(D)
    cov = A @ A.mT + 0.2 * torch.eye(D)
    mu = 3 * torch.randn(B, D, generator=g)
    truth = mu + (torch.linalg.cholesky(cov) @ torch.randn(B, D, 1, generator=g)).squeeze(-1)
    std = cov.diagonal(dim1=1, dim2=2).sqrt()
    out = {"mu": mu, "cov": cov, "std": std, "truth": truth, "exact": GaussianPosterior(mu, cov=cov),
           "narrow": GaussianPosterior(mu, cov=cov / 4), "shifted": GaussianPosterior(mu + std, cov=cov)}
    for k in ("exact", "narrow", "shifted"):  # samples drawn once for all tests
        out[k + "_samples"] = draw(out[k])
    return out


def draw(post, n=N_SAMPLES, seed=1):
    return post.sample(n, generator=torch.Generator().manual_seed(seed))


# -- coverage --------------------------------------------------------------------------------------------------------
def test_exact_posterior_is_calibrated(gaussian):
    truth = gaussian["truth"]
    hpd = dg.expected_coverage(gaussian["exact"], truth, samples=gaussian["exact_samples"])
    assert hpd.method == "hpd" and hpd.n_windows == B
    assert hpd.ece <= 0.03 and hpd.marginal_ece <= 0.03, (hpd.ece, hpd.marginal_ece)
    dist = dg.expected_coverage(gaussian["exact_samples"], truth)
    assert dist.method == "distance" and dist.ece <= 0.03
    assert dist.max_gap <= 0.05 and hpd.max_gap <= 0.05


def test_halved_spread_is_flagged(gaussian):
    truth, narrow = gaussian["truth"], gaussian["narrow"]
    hpd = dg.expected_coverage(narrow, truth, samples=gaussian["narrow_samples"])
    dist = dg.expected_coverage(gaussian["narrow_samples"], truth)
    for r in (hpd, dist):
        assert r.ece >= 0.15, (r.method, r.ece)
        assert (r.coverage < r.levels).all() and (r.marginal < r.levels).all()
    assert hpd.marginal_ece >= 0.15


def test_coverage_matches_sbi_ranks_of_log_prob(gaussian):
    """sbi's _run_sbc with reduce_fn = log_prob (Deistler et al.'s expected coverage) gives the same credibilities."""
    from sbi.diagnostics.sbc import _run_sbc

    n_win = 200
    post = GaussianPosterior(gaussian["mu"][:n_win], cov=gaussian["cov"][:n_win])
    truth = gaussian["truth"][:n_win]
    samples = draw(post, 500)
    mine = dg.hpd_credibility(post.log_prob(samples), post.log_prob(truth))
    dists = [torch.distributions.MultivariateNormal(post.mean()[b], gaussian["cov"][b]) for b in range(n_win)]
    reduce = lambda theta, x: dists[int(x)].log_prob(theta)  # noqa: E731
    ranks = _run_sbc(truth, torch.arange(n_win).float(), samples, reduce_fns=reduce, show_progress_bar=False)
    assert torch.allclose(mine, 1 - ranks[:, 0].double() / 500, atol=1e-12)


def test_coverage_rejects_bad_input(gaussian):
    truth = gaussian["truth"]
    with pytest.raises(ValueError, match="do not match truth"):
        dg.expected_coverage(torch.randn(10, B, D + 1), truth)
    bad = truth.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dg.expected_coverage(torch.randn(10, B, D), bad)
    with pytest.raises(ValueError, match="hpd"):
        dg.expected_coverage(torch.randn(10, B, D), truth, method="hpd")
    with pytest.raises(ValueError, match="levels"):
        dg.expected_coverage(torch.randn(10, B, D), truth, levels=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="windows"):
        dg.expected_coverage(gaussian["exact"], truth[:5])
    with pytest.raises(ValueError, match="together"):
        dg.expected_coverage(torch.randn(10, B, D), truth, samples=torch.randn(10, B, D))
    # a small posterior drawn here gives the same result as its samples given explicitly
    post = GaussianPosterior(gaussian["mu"][:50], cov=gaussian["cov"][:50])
    a = dg.expected_coverage(post, truth[:50], n_samples=100, generator=torch.Generator().manual_seed(5))
    b = dg.expected_coverage(post, truth[:50], samples=post.sample(100, torch.Generator().manual_seed(5)))
    assert torch.equal(a.coverage, b.coverage) and a.method == b.method == "hpd"


# -- SBC and TARP ----------------------------------------------------------------------------------------------------
def test_sbc_flags_shift_but_not_exact(gaussian):
    truth = gaussian["truth"]
    exact = dg.sbc(gaussian["exact_samples"], truth)
    shifted = dg.sbc(gaussian["shifted_samples"], truth)
    narrow = dg.sbc(gaussian["narrow_samples"], truth)
    assert not exact.flagged(0.01) and abs(exact.bias) < 0.02 and abs(exact.dispersion - 1) < 0.03
    assert shifted.flagged(0.01) and shifted.bias < -0.2  # the posterior sits above the truth: low ranks
    assert narrow.flagged(0.01) and narrow.dispersion > 1.3  # U-shaped ranks
    assert exact.ranks.shape == (B, D)
    _, per_bin = dg.rank_bins(exact.n_samples, len(exact.histogram))
    raw = exact.histogram * per_bin * len(per_bin) / (exact.n_samples + 1)  # the counts before the scaling
    assert raw.sum().item() == pytest.approx(B)


def test_sbc_statistics_of_exactly_uniform_ranks():
    """Every rank value equally often: a flat histogram and dispersion 1 whatever n, also where the n + 1 ranks do
    not fill 20 bins evenly (n = 100: a bin of 6 ranks, the others of 5; n = 64: 5 bins of 4, 15 of 3)."""
    for n in (100, 64, 19, 7):
        ranks = torch.arange(n + 1).repeat(40)[:, None].expand(-1, 3)  # B = 40 (n + 1) windows, D = 3
        res = dg.SBCResult.from_ranks(ranks, n)
        assert len(res.histogram) == min(20, n + 1)
        assert torch.allclose(res.histogram, torch.full_like(res.histogram, len(ranks) / len(res.histogram)))
        assert abs(res.bias) < 1e-12 and res.dispersion == pytest.approx(1.0, abs=2e-3)
        assert n < 64 or not res.flagged()  # (sbi's KS test of discrete ranks against the continuous uniform
        # rejects these at n = 7: p = 8e-5)


def test_sbc_ranks_and_pvalues_match_sbi(gaussian):
    from sbi.diagnostics.sbc import _run_sbc, check_uniformity_frequentist

    n_win = 300
    samples = draw(gaussian["shifted"], 200)[:, :n_win]
    truth = gaussian["truth"][:n_win]
    ranks = _run_sbc(truth, torch.zeros(n_win, 1), samples, reduce_fns="marginals", show_progress_bar=False)
    res = dg.sbc(samples, truth)
    assert torch.equal(res.ranks.float(), ranks)
    assert torch.allclose(res.ks_pvalues.float(), check_uniformity_frequentist(ranks, 200))


def test_tarp_matches_sbi_and_flags_narrow(gaussian):
    from sbi.diagnostics.tarp import _run_tarp, check_tarp

    truth = gaussian["truth"]
    samples = gaussian["exact_samples"]
    refs = dg.tarp_references(truth, seed=3)
    ecp_sbi, alpha_sbi = _run_tarp(samples, truth, refs, num_bins=50, z_score_theta=True)
    lo, hi = truth.min(0).values, truth.max(0).values
    f = dg.tarp_credibility(samples, truth, refs, lo, hi)
    ecp, _ = dg.tarp_curve(f, alpha=alpha_sbi.double())
    assert (ecp[:-1] - ecp_sbi[:-1].double()).abs().max() <= 2 / B  # edges in float32 vs float64: ties at most
    res = dg.tarp(samples, truth, references=refs)
    atc, ks = check_tarp(res.ecp, res.alpha)
    assert res.atc == pytest.approx(atc) and abs(res.atc) < 0.01 and res.ece < 0.02
    narrow = dg.tarp(gaussian["narrow_samples"], truth, references=refs)
    assert narrow.atc < -0.03 and narrow.ece > 3 * res.ece


# -- C2ST ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_c2st_separates_shifted_posterior(gaussian):
    exact = draw(gaussian["exact"], 1000, seed=1)[:, 0]
    other = draw(gaussian["exact"], 1000, seed=2)[:, 0]
    shifted = draw(gaussian["shifted"], 1000, seed=2)[:, 0]
    assert dg.c2st(exact, other) <= 0.55
    assert dg.c2st(exact, shifted) >= 0.7


def test_c2st_rejects_bad_input():
    with pytest.raises(ValueError, match="state shape"):
        dg.c2st(torch.randn(50, 3), torch.randn(50, 4))
    with pytest.raises(ValueError, match="at least"):
        dg.c2st(torch.randn(5, 3), torch.randn(50, 3))
    with pytest.raises(ValueError, match="classifier"):
        dg.c2st(torch.randn(50, 3), torch.randn(50, 3), classifier="svm")


# -- scores ----------------------------------------------------------------------------------------------------------
def gaussian_crps(mu, sigma, y):
    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))


def test_crps_matches_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(100, 3, generator=g, dtype=torch.float64), 0.5 + torch.rand(100, 3, generator=g)
    y = mu + 2 * sigma * torch.randn(100, 3, generator=g)
    samples = mu + sigma * torch.randn(4000, 100, 3, generator=g, dtype=torch.float64)
    per_window = dg.crps(samples, y, reduction="none")
    expected = gaussian_crps(mu.numpy(), sigma.numpy(), y.numpy()).mean(-1)
    diff = per_window - torch.from_numpy(expected)
    assert per_window.shape == (100,)
    # Monte Carlo error with 4000 members: about 0.01 per window, 0.001 for the mean over 100 windows
    assert abs(diff.mean()) < 0.005 and diff.square().mean().sqrt() < 0.02


def test_crps_is_fair_for_small_ensembles():
    """With 4 members the fair form is unbiased; the plain ensemble CRPS would be high by sigma / (4 sqrt(pi))."""
    g = torch.Generator().manual_seed(1)
    n = 40000
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    samples = torch.randn(4, n, 1, generator=g, dtype=torch.float64)
    expected = gaussian_crps(0.0, 1.0, y.numpy()).mean()
    assert dg.crps(samples, y) == pytest.approx(expected, abs=0.01)


def test_crps_and_energy_against_brute_force():
    g = torch.Generator().manual_seed(2)
    s, y = torch.randn(7, 5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    pair = (s[:, None] - s[None]).abs().sum((0, 1)) / (2 * 7 * 6)
    brute = ((s - y).abs().mean(0) - pair).mean(-1)
    assert torch.allclose(dg.crps(s, y, reduction="none"), brute, atol=1e-12)
    dist = torch.cdist(s.transpose(0, 1), s.transpose(0, 1)).sum((1, 2)) / (7 * 6)
    es = (s - y).norm(dim=-1).mean(0) - 0.5 * dist
    assert torch.allclose(dg.energy_score(s, y, shifts=6, reduction="none"), es, atol=1e-12)
    # in one dimension the energy score is the CRPS
    assert dg.energy_score(s[..., :1], y[:, :1], shifts=6) == pytest.approx(dg.crps(s[..., :1], y[:, :1]), abs=1e-12)


def test_energy_score_estimate_is_unbiased_with_few_shifts():
    g = torch.Generator().manual_seed(3)
    s, y = torch.randn(100, 300, 4, generator=g, dtype=torch.float64), torch.randn(300, 4, generator=g,
                                                                                    dtype=torch.float64)
    full = dg.energy_score(s, y, shifts=99)
    assert dg.energy_score(s, y, shifts=2) == pytest.approx(full, abs=0.01)


def test_spread_skill_rmse_nrmse():
    g = torch.Generator().manual_seed(4)
    M, n = 5, 20000
    sigma = 0.5 + torch.rand(n, 4, generator=g, dtype=torch.float64)
    mu = 2 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = mu + sigma * torch.randn(n, 4, generator=g, dtype=torch.float64)
    ens = mu + sigma * torch.randn(M, n, 4, generator=g, dtype=torch.float64)
    assert dg.spread_skill(ens, y) == pytest.approx(1.0, abs=0.02)  # sqrt(5/6) = 0.91 without the correction
    assert dg.spread_skill(mu + 0.5 * (ens - mu), y) < 0.6
    assert dg.rmse(ens, y) == pytest.approx(float((ens.mean(0) - y).square().mean().sqrt()), rel=1e-12)
    assert dg.rmse(mu, y, reduction="none").shape == (n,)
    clim = torch.zeros_like(y)
    assert dg.nrmse(clim + y.mean(0), y) == pytest.approx(1.0, abs=1e-3)
    assert dg.nrmse(mu, y, clim_std=1.0) == pytest.approx(dg.rmse(mu, y))
    with pytest.raises(ValueError, match="reduction"):
        dg.crps(ens, y, reduction="sum")
    with pytest.raises(ValueError, match="at least 2"):
        dg.crps(ens[:1], y)


def _filtered(white, cut, gain):
    """Periodic fields ``white`` with the Fourier modes of radial wavenumber above ``cut`` multiplied by ``gain``."""
    dims = (-1,) if white.dim() == 2 else (-2, -1)
    freqs = [torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64) for n in white.shape[white.dim() - len(dims):]]
    radius = torch.stack(torch.meshgrid(*freqs, indexing="ij")).square().sum(0).sqrt().round()
    f = torch.fft.fftn(white, dim=dims) * torch.where(radius > cut, gain, 1.0)
    return torch.fft.ifftn(f, dim=dims).real


@pytest.mark.parametrize("shape", [(32,), (2, 8, 8)])
def test_spread_skill_spectrum_finds_the_scales_where_the_ensemble_is_too_narrow(shape):
    """Truths and members of a white Gaussian field about a mean; the members' modes above wavenumber 4 shrunk to
    half: the ratio is 1 at the large scales and 0.5 at the small ones; members of the truths' law give 1 at all."""
    g = torch.Generator().manual_seed(5)
    M, n = 8, 3000
    mu = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    truth = mu + torch.randn(n, *shape, generator=g, dtype=torch.float64)
    ens = mu + _filtered(torch.randn(M * n, *shape, generator=g, dtype=torch.float64), 4, 0.5).reshape(M, n, *shape)
    k, ratio = dg.spread_skill_spectrum(ens, truth)
    assert k.tolist() == list(range(len(k))) and len(k) == (17 if shape == (32,) else 7)
    assert torch.allclose(ratio[:5], torch.ones(5, dtype=torch.float64), atol=0.05), ratio.tolist()
    assert torch.allclose(ratio[5:], torch.full((len(k) - 5,), 0.5, dtype=torch.float64), atol=0.03), ratio.tolist()
    calibrated = mu + torch.randn(M, n, *shape, generator=g, dtype=torch.float64)
    _, r_cal = dg.spread_skill_spectrum(calibrated, truth)
    assert torch.allclose(r_cal, torch.ones_like(r_cal), atol=0.035), r_cal.tolist()  # sqrt(8/9) without (M+1)/M
    with pytest.raises(ValueError, match="grids"):
        dg.spread_skill_spectrum(torch.randn(4, 3, 2, 5), torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="at least 2"):
        dg.spread_skill_spectrum(ens[:1], truth)


def test_spread_skill_spectrum_adds_up_to_the_overall_ratio():
    """By Parseval's identity the error and spread powers of all bins are those of the states."""
    g = torch.Generator().manual_seed(6)
    ens, truth = torch.randn(6, 50, 16, generator=g), torch.randn(50, 16, generator=g)
    k, ratio = dg.spread_skill_spectrum(ens, truth)
    mean = ens.double().mean(0)
    dims = (-1,)
    spread_power = torch.fft.fftn(ens.double() - mean, dim=dims).abs().square().sum(0).sum(0) / 5
    err_power = torch.fft.fftn(truth.double() - mean, dim=dims).abs().square().sum(0)
    radius = torch.fft.fftfreq(16, 1 / 16).abs().round().long()
    err_bins = torch.zeros(len(k), dtype=torch.float64).index_add_(0, radius, err_power)
    # ratio^2 * err (per bin) summed, over the total error power, is the overall spread/skill squared
    overall = float((ratio.square() * err_bins).sum() / err_bins.sum())
    assert overall == pytest.approx(dg.spread_skill(ens, truth) ** 2, rel=1e-6)
    assert float(spread_power.sum() / err_power.sum() * 7 / 6) == pytest.approx(overall, rel=1e-9)
    # per window, the powers add up to the sums over windows; on (C, H, W) grids the channels are pooled
    for shape in ((16,), (2, 6, 5)):
        e, x = torch.randn(6, 4, *shape, generator=g), torch.randn(4, *shape, generator=g)
        (sp, er), (sp_w, er_w) = dg.scores.spectral_powers(e, x), dg.scores.spectral_powers(e, x, per_window=True)
        assert sp_w.shape == er_w.shape == (4, len(sp)) and torch.allclose(sp_w.sum(0), sp)
        assert torch.allclose(er_w.sum(0), er) and torch.allclose(er_w.sum(1), (x.double() - e.double().mean(0)).square(
            ).flatten(1).sum(1) * math.prod(shape[-2:] if len(shape) == 3 else shape))  # Parseval, per window


# -- arviz -----------------------------------------------------------------------------------------------------------
def test_to_inference_data():
    import arviz as az

    s, x = torch.randn(300, 4, 6), torch.randn(4, 6)
    idata = dg.to_inference_data(s, x)
    assert idata.posterior["x"].dims == ("chain", "draw", "window", "cell")
    assert idata.posterior["x"].shape == (1, 300, 4, 6)
    assert torch.allclose(torch.from_numpy(idata.constant_data["x_true"].values).float(), x)
    summary = az.summary(idata, kind="stats", round_to="none")
    assert len(summary) == 24
    assert abs(summary["mean"].values - s.mean(0).flatten().numpy()).max() < 1e-5
    field = dg.to_inference_data(torch.randn(50, 2, 2, 3, 3), name="u")
    assert field.posterior["u"].dims == ("chain", "draw", "window", "channel", "row", "col")
    with pytest.raises(ValueError, match="dims"):
        dg.to_inference_data(s, dims=["a", "b"])


# -- evaluate --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear_task():
    # windows 5 states apart: few distinct start times (the exact posterior is computed once per start time)
    task = sbida.tasks.get("linear-gaussian", n_trajectories=48)
    data = task.simulate(progress=False, stride=5)
    offsets, every = data.window.offsets(), data.meta["every"]

    def exact(y, mask, t):
        mean, cov = task.simulator.exact_posterior(y, mask, t, task.observation, offsets, every)
        return GaussianPosterior(mean, cov=cov)

    return task, data, exact


@pytest.mark.slow
def test_evaluate_exact_linear_gaussian(linear_task, tmp_path):
    task, data, exact = linear_task
    res = dg.evaluate(exact, data, n_samples=300, batch_size=256, reference=exact, c2st_windows=1,
                      c2st_samples=300, progress=False, name="exact")
    assert res.n_windows == len(data) and res.state_shape == (32,)
    assert res.coverage.method == "hpd" and res.coverage.ece <= 0.05 and res.coverage.marginal_ece <= 0.05
    # the distance statistic of the same samples, computed beside the highest density one
    assert res.coverage.distance_ece <= 0.05 and res.metrics()["distance_ece"] == res.coverage.distance_ece
    dist = dg.evaluate(exact, data, n_samples=300, batch_size=256, progress=False, coverage="distance")
    assert dist.coverage.ece == pytest.approx(res.coverage.distance_ece, abs=1e-12)
    assert abs(res.spread_skill - 1) < 0.05 and res.nrmse < 0.5
    # every scale (528 windows of 48 trajectories: one Fourier mode at wavenumbers 0 and 16, so noisy there)
    spec = torch.tensor(res.spectrum)
    assert len(spec) == 17 and (spec - 1).abs().max() < 0.25 and abs(spec.mean() - 1) < 0.04, res.spectrum
    assert len(res.c2st_aucs) == 1 and res.c2st_auc <= 0.6
    assert res.timings["total"] > 0 and res.timings["posterior_and_sampling_per_window"] > 0
    # JSON round trip
    again = dg.EvaluationResult.from_json(res.to_json(tmp_path / "res.json"))
    assert again.to_dict() == json.loads(res.to_json())
    assert dg.EvaluationResult.from_json(tmp_path / "res.json").coverage.ece == res.coverage.ece

    # an over-confident ensemble of the same posterior, through an estimator object, is flagged
    class Narrow:
        def posterior(self, y, mask, t):
            post = exact(y, mask, t)
            return EnsemblePosterior(post.mean() + 0.5 * (draw(post, 200) - post.mean()))

    bad = dg.evaluate(Narrow(), data, n_samples=200, batch_size=256, progress=False)
    # a calibrated ensemble of 50 members asked for 300 draws: its 50 members, each once (resampled with replacement,
    # the copies would tie: ECE-d 0.1 at 300 draws, and a C2ST AUC of 1 with copies in both folds)
    class Exact50:
        def posterior(self, y, mask, t):
            return EnsemblePosterior(draw(exact(y, mask, t), 50))

    ens = dg.evaluate(Exact50(), data, n_samples=300, batch_size=256, reference=exact, c2st_windows=2,
                      progress=False)
    assert ens.n_samples == ens.sbc.n_samples == 50 and ens.coverage.method == "distance"
    assert ens.coverage.ece <= 0.05 and abs(ens.spread_skill - 1) < 0.05 and ens.c2st_auc <= 0.65
    assert bad.coverage.method == "distance" and bad.coverage.ece >= 0.15
    assert bad.coverage.distance_ece == bad.coverage.ece
    assert bad.spread_skill < 0.6 and bad.sbc.flagged() and bad.c2st_auc is None
    assert bad.rmse == pytest.approx(res.rmse, rel=0.05)
    assert max(bad.spectrum) < 0.6 and again.spectrum == res.spectrum
    # the noise figure: the windows of 48 trajectories are noisier than 528 independent ones would be, the exact
    # posterior's ECE is of the size of that noise, the over-confident ensemble's far beyond it
    independent = math.sqrt(2 / math.pi) * float((dg.default_levels() * (1 - dg.default_levels())).sqrt().mean()
                                                 / math.sqrt(len(data)))
    assert res.coverage.ece_noise > 1.2 * independent and res.coverage.distance_ece_noise > 1.2 * independent
    assert res.coverage.ece < 2.5 * res.coverage.ece_noise, (res.coverage.ece, res.coverage.ece_noise)
    assert bad.coverage.ece > 5 * bad.coverage.ece_noise
    assert again.coverage.ece_noise == res.coverage.ece_noise
    assert res.metrics()["coverage_ece_noise"] == res.coverage.ece_noise


def test_evaluate_rejects_bad_input(linear_task):
    task, data, exact = linear_task
    with pytest.raises(ValueError, match="posterior"):
        dg.evaluate(42, data)
    with pytest.raises(ValueError, match="Posterior"):
        dg.evaluate(lambda y, m, t: y, data, indices=torch.arange(4), progress=False)
    wrong = lambda y, m, t: SamplerPosterior(lambda n, g: torch.zeros(n, len(y), 5), len(y), (5,))  # noqa: E731
    with pytest.raises(ValueError, match="expected"):
        dg.evaluate(wrong, data, indices=torch.arange(4), progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        dg.evaluate(exact, data, n_samples=1)
    with pytest.raises(ValueError, match="hpd"):
        dg.evaluate(lambda y, m, t: EnsemblePosterior(torch.randn(3, len(y), 32)), data, coverage="hpd",
                    indices=torch.arange(4), progress=False)


def test_distance_coverage_is_unbiased_with_few_samples():
    """With 100 samples in 32 dimensions, samples measured against their own mean and variance look closer than the
    truth (ECE 0.05 for the exact posterior); leaving each sample out of its own reference removes the bias."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(100, 2000, 32, generator=g, dtype=torch.float64)
    x = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    res = dg.expected_coverage(s, x, method="distance")
    assert res.ece < 0.02


def test_scaled_gaussian_coverage_matches_the_hpd_coverage_of_gaussian_samples():
    """The closed form against the module's own Monte Carlo: truths from N(0, I), samples from N(0, s^2 I), highest
    density credibilities; and the known cases (s = 1 is calibrated, D = 1 is a normal interval)."""
    from sbida.diagnostics import coverage_curve, default_levels, hpd_credibility, scaled_gaussian_coverage

    levels = default_levels()
    assert torch.allclose(scaled_gaussian_coverage(1.0, 40), levels, atol=1e-12)
    normal = torch.distributions.Normal(0.0, 1.0)
    s = 0.8
    exact_1d = 2 * normal.cdf(s * normal.icdf((1 + levels.float()) / 2)) - 1
    assert torch.allclose(scaled_gaussian_coverage(s, 1).float(), exact_1d, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    D, B, n, s = 40, 4000, 400, 0.92
    truth = torch.randn(B, D, generator=g, dtype=torch.float64)
    samples = s * torch.randn(n, B, D, generator=g, dtype=torch.float64)
    cred = hpd_credibility(-(samples**2).sum(-1), -(truth**2).sum(-1))  # log-densities up to the same constant
    mc = coverage_curve(cred)
    formula = scaled_gaussian_coverage(s, D)
    assert (mc - formula).abs().max() < 0.03  # binomial sd at B = 4000: <= 0.008
    ece = (formula - levels).abs().mean()
    assert 0.19 < ece < 0.23 and (mc - levels).abs().mean() > 0.15  # 8 % too narrow in 40-D: far from calibrated
    # wider posteriors over-cover, narrower under-cover; more dimensions, more error for the same scale
    assert (scaled_gaussian_coverage(1.1, 8) > levels).all() and (scaled_gaussian_coverage(0.9, 8) < levels).all()
    assert (scaled_gaussian_coverage(0.9, 40) - levels).abs().mean() > (scaled_gaussian_coverage(0.9, 4)
                                                                          - levels).abs().mean()
    with pytest.raises(ValueError, match="scale"):
        scaled_gaussian_coverage(0.0, 4)


def test_coverage_noise_predicts_the_ece_of_a_calibrated_posterior():
    """The noise figure is the mean ECE of calibrated credibilities (uniform), for independent windows and for
    windows that come in correlated groups (here: 10 identical windows per trajectory)."""
    g = torch.Generator().manual_seed(0)
    levels = dg.default_levels()
    for groups_of in (1, 10):
        eces, noises = [], []
        for _ in range(200):
            cred = torch.rand(600 // groups_of, generator=g).repeat_interleave(groups_of)
            groups = torch.arange(600) // groups_of
            eces.append(float((dg.coverage_curve(cred, levels) - levels).abs().mean()))
            noises.append(dg.coverage_noise(cred, groups, levels, n_boot=200, seed=len(eces))[1])
        mean_ece, mean_noise = sum(eces) / len(eces), sum(noises) / len(noises)
        assert mean_noise == pytest.approx(mean_ece, rel=0.12), (groups_of, mean_ece, mean_noise)
    # the analytic figure for independent windows, and the grouped windows' as noisy as 60 independent ones
    cred = torch.rand(6000, generator=g)
    se, noise = dg.coverage_noise(cred, levels=levels, n_boot=400)
    assert torch.allclose(se, (levels * (1 - levels) / 6000).sqrt(), rtol=0.15)
    grouped = dg.coverage_noise(cred[:60].repeat_interleave(100), torch.arange(6000) // 100, levels, n_boot=400)[1]
    assert grouped == pytest.approx(noise * 10, rel=0.2)
    # ignoring the groups understates the noise of correlated windows
    assert dg.coverage_noise(cred[:60].repeat_interleave(100), levels=levels)[1] < grouped / 5


def test_coverage_noise_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        dg.coverage_noise(torch.rand(3, 2))
    with pytest.raises(ValueError, match="shape of credibility"):
        dg.coverage_noise(torch.rand(10), torch.arange(9))
    with pytest.raises(ValueError, match="n_boot"):
        dg.coverage_noise(torch.rand(10), n_boot=1)
    res = dg.expected_coverage(torch.randn(50, 20, 3), torch.randn(20, 3), groups=torch.arange(20) // 4)
    assert res.ece_noise > 0 and res.distance_ece_noise == res.ece_noise
    # one trajectory tells nothing of the spread between trajectories
    se, noise = dg.coverage_noise(torch.rand(10), torch.zeros(10))
    assert math.isnan(noise) and torch.isnan(se).all()
    assert dg.expected_coverage(torch.randn(50, 20, 3), torch.randn(20, 3), groups=torch.zeros(20)).ece_noise is None
