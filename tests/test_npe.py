"""The shared training loop and NPE: accuracy against the exact linear-Gaussian posterior, persistence, errors."""

import math
import time
import warnings
from pathlib import Path

import pytest
import torch

import sbida
from sbida.estimators import NPE, Estimator, load
from sbida.estimators.npe import EigenPower, SpectralScale
from sbida.nn import IsotropicStudentT
from sbida.posterior import DistributionPosterior

SMALL = {"channels": 8, "depth": 1, "features": 16, "emb_features": 8, "transforms": 2, "hidden": [16]}


@pytest.fixture(scope="module")
def lg():
    """A linear-Gaussian task, its data split by trajectory and an NPE trained on a small budget."""
    task = sbida.tasks.get("linear-gaussian")
    data = task.simulate(progress=False, n_trajectories=256)
    train, val, test = data.split(0.8, 0.1, 0.1)
    est = NPE(task)
    hist = est.fit(train, val, epochs=10, batch_size=256, lr=2e-3, seed=0, progress=False)
    return task, train, val, test, est, hist


@pytest.fixture(scope="module")
def tiny():
    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=8, n_states=40)
    train, val = task.simulate(progress=False).split(0.75, 0.25)
    return task, train, val


def exact(task, data, idx):
    x, y, m, t = data.get(idx)
    mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, data.window.offsets(),
                                               every=data.meta["every"])
    return x, y, m, t, mean, cov


@pytest.mark.slow
def test_npe_matches_the_exact_linear_gaussian_posterior(lg):
    task, _, _, test, est, hist = lg
    assert hist["val_loss"][-1] < hist["val_loss"][0]
    x, y, m, t, mean, cov = exact(task, test, torch.arange(0, len(test), 2))
    post = est.posterior(y, m, t)
    assert isinstance(post, DistributionPosterior) and post.has_log_prob
    rmse_npe = (post.mean().double() - x).pow(2).mean().sqrt()
    rmse_exact = (mean - x).pow(2).mean().sqrt()
    assert rmse_npe < 1.15 * rmse_exact, (float(rmse_npe), float(rmse_exact))
    # marginal 50 % and 90 % central intervals cover as often as they should
    s = post.sample(500, generator=torch.Generator().manual_seed(0))
    assert s.shape == (500, len(x), 32)
    for level in (0.5, 0.9):
        lo, hi = s.quantile((1 - level) / 2, 0), s.quantile((1 + level) / 2, 0)
        cover = ((x >= lo) & (x <= hi)).double().mean()
        assert abs(cover - level) < 0.04, (level, float(cover))


@pytest.fixture(scope="module")
def independent(lg):
    """400 windows of fresh trajectories (correlated windows of few trajectories make coverage noisy), exact
    posterior."""
    task = lg[0]
    x, y, m, t = task.independent_windows(400, seed=12345)
    mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, task.window.offsets(),
                                               every=task.config.data.save_every)
    return x, y, m, t, mean, cov


@pytest.mark.slow
def test_npe_expected_coverage_error(lg, independent):
    """Highest-density regions (ranks of log q(x) among log q of samples) cover at their level: ECE <= 0.05.
    The exact posterior scores 0.012 on these windows; the single-scale checkerboard flow scored 0.135."""
    _, _, _, _, est, _ = lg
    x, y, m, t, _, _ = independent
    post = est.posterior(y, m, t)
    g = torch.Generator().manual_seed(0)
    res = sbida.diagnostics.expected_coverage(post, x.float(), n_samples=500, generator=g)
    assert res.ece <= 0.05, (res.ece, res.coverage.tolist())


@pytest.mark.slow
@pytest.mark.xfail(reason="C2ST AUC <= 0.65 needs more than the test's budget: 256 trajectories x 10 epochs reach "
                          "AUC 0.84 (KL 2.1 nats, RMSE 1.08x exact); the task's 1024 trajectories x 10 epochs reach "
                          "0.69 (KL 0.85 nats, RMSE 1.025x, ECE 0.032); 4096 trajectories x 15 epochs (22 min on one "
                          "thread) reach 0.58 (RMSE 1.005x, ECE 0.021): benchmarks/linear_gaussian.py", strict=False)
def test_npe_c2st_against_exact_samples(lg, independent):
    _, _, _, _, est, _ = lg
    x, y, m, t, mean, cov = independent
    s = est.posterior(y[:8], m[:8], t[:8]).sample(500, generator=torch.Generator().manual_seed(1))
    ref = torch.distributions.MultivariateNormal(mean[:8], cov[:8]).sample((500,)).float()
    auc = sum(sbida.diagnostics.c2st(s[:, b], ref[:, b]) for b in range(8)) / 8
    assert auc <= 0.65, auc


@pytest.mark.slow
def test_point_estimate_is_the_flow_centre_near_the_exact_mean(lg):
    """``uncertainty="none"``: the flow's centre, one pass and no draws; on the linear-Gaussian task (a Gaussian
    posterior) as accurate as the mean of 500 draws (within 2 %), and close to it."""
    task, _, _, test, est, _ = lg
    x, y, m, t, mean, _ = exact(task, test, torch.arange(0, len(test), 2))
    point = est.posterior(y, m, t, uncertainty="none")
    assert isinstance(point, sbida.posterior.PointPosterior) and point.mean().shape == x.shape
    draws = est.posterior(y, m, t).sample(500, generator=torch.Generator().manual_seed(0)).mean(0)
    rmse = {k: float((v.double() - x).pow(2).mean().sqrt()) for k, v in
            (("point", point.mean()), ("draws", draws), ("exact", mean))}
    assert rmse["point"] < 1.02 * rmse["draws"] and rmse["point"] < 1.15 * rmse["exact"], rmse
    gap = float((point.mean().double() - draws.double()).pow(2).mean().sqrt())  # 0.05 x exact: the draws' noise
    assert gap < 0.1 * rmse["exact"], (gap, rmse)
    with pytest.raises(ValueError, match="uncertainty"):
        est.posterior(y, m, t, uncertainty="laplace")


@pytest.mark.slow
def test_npe_log_score_is_close_to_the_exact_posterior(lg):
    """The mean log-density of the truth is below the exact posterior's (the best any density does), and close."""
    task, _, _, test, est, _ = lg
    x, y, m, t, mean, cov = exact(task, test, torch.arange(0, len(test), 2))
    with torch.no_grad():
        lq = est.posterior(y, m, t).log_prob(x.float()).double()
    lp = torch.distributions.MultivariateNormal(mean, cov).log_prob(x)
    gap = float((lp - lq).mean())  # an estimate of KL(exact || NPE), averaged over windows
    se = float((lp - lq).std() / math.sqrt(len(x)))
    # measured 2.48 nats (se 0.08) at this budget: below 0.1 nats per cell (a missing standardization Jacobian alone
    # would add ~4 nats)
    assert -3 * se < gap < 0.1 * 32, (gap, se)


class _Widened(sbida.data.WindowDataset):
    """The windows of a linear-Gaussian dataset with every true state moved to ``mean + a (x - mean)`` about its
    exact posterior mean: truths of ``N(mean, a^2 cov)``, for which the calibrated spread is ``a`` times the exact
    posterior's."""

    def __init__(self, data, task, a):
        super().__init__(data.states, data.y, data.mask, data.times, window=data.window, stride=data.stride,
                         trajectory_ids=data.trajectory_ids, config=data.config, meta=data.meta)
        self.task, self.a = task, a

    def get(self, index):
        x, y, m, t = super().get(index)
        mean, _ = self.task.simulator.exact_posterior(y, m, t, self.task.observation, self.window.offsets(),
                                                      every=self.meta["every"])
        return mean + self.a * (x - mean), y, m, t


@pytest.mark.slow
def test_fit_inflation_recovers_a_known_spread_error(lg):
    """Truths spread 1.3 times wider than the exact posterior: both criteria find an inflation near 1.3 (the
    trained flow fits the exact posterior to a few percent), at which the coverage of those windows is calibrated."""
    task, _, val, _, est, _ = lg
    wide = _Widened(val, task, 1.3)
    try:
        cov = est.fit_inflation(wide, windows=512, samples=256, seed=0)
        nll = est.fit_inflation(wide, windows=512, criterion="nll", seed=0)
        assert 1.2 < cov["inflation"] < 1.4 and 1.2 < nll["inflation"] < 1.4, (cov["inflation"], nll["inflation"])
        assert est.hparams["inflation"] == nll["inflation"]
        assert cov["score_at_1"] > 0.25 and min(cov["score"]) < 0.05, (cov["score_at_1"], min(cov["score"]))
        assert nll["score_at_1"] > min(nll["score"]) + 1.0  # nats per window
        # the NLL criterion is the posterior's exact log-density of the truths, in the original units
        est.hparams["inflation"] = 1.0
        x, y, m, t = wide.get(torch.randperm(len(wide), generator=torch.Generator().manual_seed(0))[:512])
        with torch.no_grad():
            exact = -est.posterior(y, m, t).log_prob(x.float()).double().mean()
        assert nll["score_at_1"] == pytest.approx(float(exact), rel=1e-4, abs=1e-3)
        # the fit's score at a factor is the coverage of the posterior built with that factor
        est.hparams["inflation"] = cov["inflation"]
        x, y, m, t = wide.get(torch.arange(0, len(wide), 4))
        res = sbida.diagnostics.expected_coverage(est.posterior(y, m, t), x.float(), n_samples=256,
                                                  generator=torch.Generator().manual_seed(1))
        assert res.ece < 0.06, (res.ece, res.coverage.tolist())
    finally:
        est.hparams["inflation"] = 1.0


def _nll(est, data, index):
    """The mean negative log-density of the true states of windows ``index`` under ``est``'s posterior (nats)."""
    x, y, m, t = data.get(index)
    with torch.no_grad():
        return float(-est.posterior(y, m, t).log_prob(x.float()).double().mean())


def _ece(est, data, index):
    """The joint (highest-density) ECE of ``est``'s posterior on windows ``index``, 256 draws each, seeded."""
    x, y, m, t = data.get(index)
    return sbida.diagnostics.expected_coverage(est.posterior(y, m, t), x.float(), n_samples=256,
                                               generator=torch.Generator().manual_seed(1)).ece


class _Tailed(_Widened):
    """The windows of a linear-Gaussian dataset with every true state moved to ``mean + a_b (x - mean)`` by a factor
    ``a_b = sqrt((nu - 2) / w_b)``, ``w_b ~ chi^2_nu``, drawn once per window: the truths of a multivariate Student-t
    of ``nu`` degrees of freedom and the exact posterior's covariance (a spread that is right on average and wrong
    in every window, by a factor that nothing in the window tells)."""

    def __init__(self, data, task, nu):
        super().__init__(data, task, 1.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            w = torch.distributions.Chi2(torch.tensor(float(nu), dtype=torch.float64)).sample((len(data),))
        self.factors = ((nu - 2) / w).sqrt()

    def get(self, index):
        index = torch.as_tensor(index)
        x, y, m, t = sbida.data.WindowDataset.get(self, index)
        mean, _ = self.task.simulator.exact_posterior(y, m, t, self.task.observation, self.window.offsets(),
                                                      every=self.meta["every"])
        return mean + self.factors[index].reshape(-1, *[1] * (x.dim() - 1)) * (x - mean), y, m, t


@pytest.mark.slow
def test_fit_tails_recovers_known_tails(lg):
    """Truths of a Student-t of 5 degrees of freedom about the exact posterior: ``fit_tails`` finds heavy tails
    (nu 3.5-10) where the same windows without the factors give a near-Gaussian base (nu > 30), and the coverage of
    the tailed windows is calibrated with the fitted base where the Gaussian one is not."""
    task, _, val, _, est, _ = lg
    tailed = _Tailed(val, task, 5.0)
    h = dict(est.hparams)
    try:
        plain = est.fit_tails(val, windows=len(val), seed=0)
        fit = est.fit_tails(tailed, windows=len(val), seed=0)
        assert plain["tails"] > 30 and 3.5 < fit["tails"] < 10, (plain, fit)
        assert fit["nll"] < fit["nll_gaussian"] - 1.0, fit  # nats per window
        assert est.hparams["tails"] == fit["tails"]
        # the fit's NLL is the posterior's exact log-density of the truths with the fitted base, in original units
        assert fit["nll"] == pytest.approx(_nll(est, tailed, torch.arange(len(tailed))), rel=1e-4, abs=1e-3)
        with_tails = _ece(est, tailed, torch.arange(0, len(tailed), 2))
        est.hparams.update(tails=None)
        gaussian = _ece(est, tailed, torch.arange(0, len(tailed), 2))
        assert with_tails < 0.05 and gaussian > 0.1, (with_tails, gaussian)
    finally:
        est.hparams.update(h)


class _MovedTruths(sbida.data.WindowDataset):
    """The windows of ``data`` with their true states replaced by ``self.moved`` ``(N, D)``, which a subclass computes
    once at construction (the model may change afterwards)."""

    def __init__(self, data):
        super().__init__(data.states, data.y, data.mask, data.times, window=data.window, stride=data.stride,
                         trajectory_ids=data.trajectory_ids, config=data.config, meta=data.meta)

    def get(self, index):
        index = torch.as_tensor(index)
        _, y, m, t = super().get(index)
        return self.moved[index].reshape(len(index), *self.states.shape[2:]), y, m, t


class _BaseScaled(_MovedTruths):
    """The windows of a dataset with every true state moved in the base space of ``est``'s flow, ``z -> f * z``
    (``f`` ``(D,)``): truths whose images there have the covariance ``diag(f^2)`` times the model's, the flow's own
    map computed once at construction (the model may change afterwards)."""

    def __init__(self, data, est, f):
        super().__init__(data)
        x, y, m, t = sbida.data.WindowDataset.get(self, torch.arange(len(data)))  # the truths before
        with torch.no_grad():
            flow, loc, scale = est._parts(est.standardize(x, y, m, t))
            u = (est.standardize(x, y, m, t).x.flatten(1) - loc) / scale
            u = flow.transform.inv(f * flow.transform(u))
            self.moved = (est.x_mean.reshape(-1) + est.x_std.reshape(-1) * (loc + scale * u)).double()


class _Powered(_MovedTruths):
    """The windows of a dataset with every true state replaced by one draw of ``est``'s posterior with the power
    ``gamma`` on its local covariance: truths for which that posterior is calibrated by construction (drawn once, at
    construction)."""

    def __init__(self, data, est, gamma):
        super().__init__(data)
        _, y, m, t = sbida.data.WindowDataset.get(self, torch.arange(len(data)))  # the truths before
        old, est.hparams["power"] = est.hparams["power"], gamma
        try:
            gen = torch.Generator().manual_seed(5)
            draws = [est.posterior(y[i:i + 256], m[i:i + 256], t[i:i + 256]).sample(1, generator=gen)[0]
                     for i in range(0, len(data), 256)]
        finally:
            est.hparams["power"] = old
        self.moved = torch.cat(draws).double()


@pytest.mark.slow
def test_fit_power_recovers_the_power_of_the_truths(lg):
    """Truths drawn from the NPE's own posterior with a power 1.15 on its local covariance: ``fit_power`` finds it
    (within a grid step) and lowers both joint ECEs; truths drawn without a power keep 1 (the margin)."""
    task, _, val, _, est, _ = lg
    h = dict(est.hparams)
    try:
        calibrated = est.fit_power(_Powered(val, est, 1.0), windows=512, samples=128, seed=0)
        assert calibrated["power"] == 1.0 and est.hparams["power"] == 1.0, calibrated
        fit = est.fit_power(_Powered(val, est, 1.15), windows=512, samples=128, seed=0)
        assert fit["power"] in (1.125, 1.15, 1.175) and est.hparams["power"] == fit["power"], fit
        at = fit["grid"].index(fit["power"])
        assert fit["score_at_1"] > fit["score"][at] + fit["margin"], fit
        assert fit["ece"][at] < 0.05 and fit["distance_ece"][at] < 0.05, fit
    finally:
        est.hparams.update(h)


@pytest.mark.slow
def test_fit_scale_recovers_known_scales_of_the_base(lg):
    """Truths moved in the flow's base space by 1.6 in a quarter of its dimensions: ``fit_scale`` gives exactly those
    dimensions their own scales, 1.6 times the root mean square of the unmoved truths there (1.46-1.59), and keeps
    the others; its NLL is the posterior's exact log-density of the truths, and their coverage is calibrated with the
    fitted scales where it is not without. On the unmoved windows (a flow close to the exact posterior) it changes
    no scale: the differences of 25 validation trajectories from 1 are within their errors."""
    task, _, val, _, est, _ = lg
    f = torch.ones(32)
    f[::4] = 1.6
    moved = _BaseScaled(val, est, f)
    before = est.base_scale.clone()
    try:
        plain = est.fit_scale(val, windows=len(val), seed=0)
        assert plain["own"] == 0 and plain["trajectories"] == 25 and torch.equal(est.base_scale, before), plain
        rms = est._truth_latents(val, torch.arange(len(val)))[0].square().mean(0).sqrt().float()
        fit = est.fit_scale(moved, windows=len(val), seed=0)
        ratio = est.base_scale / before
        assert fit["own"] == 8 and torch.allclose(ratio, torch.where(f > 1, f * rms, 1.0), rtol=1e-4), (fit, ratio)
        assert torch.allclose(ratio, f, rtol=0.1)
        # 8 dimensions of variance 1.6^2 under a unit one: 8 x (1.56 - ln 2.56) / 2 = 2.5 nats per window to gain
        assert fit["nll"] < fit["nll_before"] - 1.5, fit
        assert fit["nll"] == pytest.approx(_nll(est, moved, torch.arange(len(moved))), rel=1e-4, abs=1e-3)
        fitted = _ece(est, moved, torch.arange(0, len(moved), 2))
        est.base_scale.copy_(before)
        unfitted = _ece(est, moved, torch.arange(0, len(moved), 2))
        assert fitted < 0.05 and unfitted > 0.1, (fitted, unfitted)
    finally:
        est.base_scale.copy_(before)


class _SpectrumScaled(_MovedTruths):
    """The windows of a dataset with every true state's departure from ``est``'s centre (its point estimate) scaled
    by ``a[k]`` at wavenumber ``k`` in standardized units (:class:`SpectralScale` about that centre): truths whose
    error spectrum about the posterior is ``a^2`` times the model's, computed once at construction."""

    def __init__(self, data, est, a):
        super().__init__(data)
        x, y, m, t = sbida.data.WindowDataset.get(self, torch.arange(len(data)))  # the truths before
        with torch.no_grad():
            centre = est.posterior(y, m, t, uncertainty="none").mean().flatten(1)
            mu, sd = est.x_mean.reshape(-1), est.x_std.reshape(-1)
            xs = SpectralScale(((centre - mu) / sd).double(), a.double(), est.state_shape)(
                ((x.flatten(1) - mu) / sd).double())
            self.moved = mu + sd * xs


@pytest.mark.slow
def test_fit_spectrum_recovers_a_known_spread_per_wavenumber(lg):
    """Truths whose departures from the posterior's centre are 1.5 times wider at wavenumbers 3-6 of the ring:
    ``fit_spectrum`` gives exactly those bins their own factors, 1.5 over the unmoved truths' spread/skill there
    (1.51-1.70), and keeps the others; its NLL is the posterior's exact log-density of the truths, over 1 nat per
    window lower than before and as low as with the exact factors 1.5 (-26.62 and -26.54). The joint coverage goes
    from ECE 0.25 to 0.065 (0.028 with the exact factors: at D = 32 the joint ECE is that sensitive to spread errors
    of 5-13 % in four bins, which 25 validation trajectories do not resolve). On the unmoved windows (a flow close
    to the exact posterior) it changes no factor."""
    task, _, val, _, est, _ = lg
    a = torch.ones(17)
    a[3:7] = 1.5
    moved = _SpectrumScaled(val, est, a)
    try:
        plain = est.fit_spectrum(val, windows=len(val), seed=0)  # the same draws: the unmoved truths' spread/skill
        assert plain["own"] == 0 and plain["trajectories"] == 25, plain
        assert torch.equal(est.spectrum_scale, torch.ones(17, dtype=torch.float64)), plain
        fit = est.fit_spectrum(moved, windows=len(val), seed=0)
        g, ratio = est.spectrum_scale.float(), torch.tensor(plain["spread_skill"]).float()
        assert fit["own"] == 4 and torch.allclose(g[3:7], a[3:7] / ratio[3:7], rtol=0.03), (fit, ratio)
        assert torch.allclose(g[3:7], a[3:7], rtol=0.15) and (g[:3] == 1).all() and (g[7:] == 1).all(), fit
        assert fit["nll"] < fit["nll_before"] - 1.0, fit
        assert fit["nll"] == pytest.approx(_nll(est, moved, torch.arange(len(moved))), rel=1e-4, abs=1e-3)
        est.spectrum_scale.copy_(a)  # the exact correction: the moved truths are as calibrated as the unmoved ones
        assert fit["nll"] < _nll(est, moved, torch.arange(len(moved))) + 0.2, fit
        fitted = _ece(est, moved, torch.arange(0, len(moved), 2))
        est.spectrum_scale.fill_(1.0)
        unfitted = _ece(est, moved, torch.arange(0, len(moved), 2))
        assert fitted < 0.4 * unfitted, (fitted, unfitted)
    finally:
        est.spectrum_scale.fill_(1.0)


@pytest.fixture
def briefly_trained(tiny):
    """A small NPE after 2 training steps (each test may change it) and 6 training windows ``(x, y, m, t)``."""
    task, train, _ = tiny
    est = NPE(task, **SMALL)
    est.fit(train, epochs=1, steps_per_epoch=2, progress=False)
    return est, train.get(torch.arange(6))


def test_inflation_widens_the_posterior_exactly(tiny, briefly_trained, tmp_path):
    """A factor s maps the draws of the same random numbers affinely (s times the spread about a centre per window)
    and takes D log s off their log-density; ``inflation_fit`` sets it after ``fit`` and it is saved."""
    task, train, val = tiny
    est, (x, y, m, t) = briefly_trained
    a = est.posterior(y, m, t)
    xa = a.sample(64, generator=torch.Generator().manual_seed(2))
    est.hparams["inflation"] = 1.5
    b = est.posterior(y, m, t)
    xb = b.sample(64, generator=torch.Generator().manual_seed(2))
    shift = xb - 1.5 * xa  # the same (1 - s) c for every draw of a window
    assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-4)
    assert torch.allclose(b.log_prob(xb), a.log_prob(xa) - 8 * math.log(1.5), atol=1e-3)
    assert torch.allclose(b.std(), 1.5 * a.std(), rtol=1e-4)
    assert b.log_prob(x.double()).dtype == b.log_prob(x).dtype  # truths in float64 are cast to the model's type

    fitted = NPE(task, **SMALL, inflation_fit="nll", inflation_windows=16)
    fitted.fit(train, val, epochs=1, steps_per_epoch=2, progress=False)
    record = fitted.inflation_record
    assert record["windows"] == 16 and record["criterion"] == "nll"
    assert fitted.hparams["inflation"] == record["inflation"] == record["grid"][min(
        range(len(record["score"])), key=record["score"].__getitem__)]
    assert load(fitted.save(tmp_path / "npe.pt")).hparams["inflation"] == record["inflation"]
    with pytest.warns(UserWarning, match="no validation windows"):
        NPE(task, **SMALL, inflation_fit="coverage").fit(train, epochs=1, steps_per_epoch=1, progress=False)
    for bad in ({"inflation": 0.0}, {"inflation": float("nan")}, {"inflation_fit": "ece"},
                {"inflation_samples": 1}):
        with pytest.raises(ValueError, match="inflation"):
            NPE(task, **SMALL, **bad)
    with pytest.raises(ValueError, match="criterion"):
        est.fit_inflation(val, criterion="ece")
    with pytest.raises(ValueError, match="grid"):
        est.fit_inflation(val, grid=[0.5, -1.0])
    with pytest.warns(UserWarning, match="edge of the grid"):
        est.fit_inflation(val, windows=8, samples=16, grid=[0.01, 0.02])


def test_tails_change_the_base_exactly(tiny, briefly_trained, tmp_path):
    """With ``tails`` the log-density is the flow's with the unit-covariance Student-t base (the flow's map and the
    Gaussian density of the same points give it back), near-infinite degrees of freedom are the Gaussian base;
    ``tails_fit`` sets ``nu`` after ``fit``, and it is saved."""
    task, train, val = tiny
    est, (x, y, m, t) = briefly_trained
    gauss = est.posterior(y, m, t)
    xs = gauss.sample(32, generator=torch.Generator().manual_seed(3))
    est.hparams.update(tails=4.0)  # scale sqrt(2 / 4)
    heavy = est.posterior(y, m, t)
    with torch.no_grad():
        flow, loc, scale = est._parts(est.standardize(None, y, m, t))
        to_base = lambda v: flow.transform(((v.flatten(2) - est.x_mean.reshape(-1)) / est.x_std.reshape(-1)  # noqa: E731
                                            - loc) / scale)
        z = to_base(xs)
        base_t = IsotropicStudentT(torch.zeros_like(z), 4.0, 0.5**0.5).log_prob(z)
        base_g = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        assert torch.allclose(heavy.log_prob(xs) - gauss.log_prob(xs), base_t - base_g, atol=1e-3)
        draws = heavy.sample(4000, generator=torch.Generator().manual_seed(4))
        r2 = to_base(draws).square().sum(-1) / (8 * 0.5)  # F(8, 4): median 1.11 (chi^2_8 / 8: 0.92)
    assert 1.0 < float(r2.median()) < 1.25, float(r2.median())
    est.hparams.update(tails=1e9)
    assert torch.allclose(est.posterior(y, m, t).log_prob(xs), gauss.log_prob(xs), atol=1e-3)
    est.hparams.update(tails=None)

    fitted = NPE(task, **SMALL, tails_fit=True, tails_windows=16)
    fitted.fit(train, val, epochs=1, steps_per_epoch=2, progress=False)
    record = fitted.tails_record
    assert record["windows"] == 16 and record["nll"] <= record["nll_gaussian"] + 1e-6
    assert fitted.hparams["tails"] == record["tails"] and 3 <= record["tails"] <= 1e6
    again = load(fitted.save(tmp_path / "npe.pt"))
    assert again.hparams["tails"] == record["tails"]
    assert torch.allclose(again.posterior(y, m, t).log_prob(xs), fitted.posterior(y, m, t).log_prob(xs))
    without_val = NPE(task, **SMALL, tails_fit=True)
    with warnings.catch_warnings():  # on by default: skipped without validation windows, and silently
        warnings.simplefilter("error")
        without_val.fit(train, epochs=1, steps_per_epoch=1, progress=False)
    assert without_val.hparams["tails"] is None and without_val.tails_record is None
    for bad in ({"tails": 2.0}, {"tails": float("inf")}, {"tails_fit": "nll"}, {"tails_windows": 1}):
        with pytest.raises(ValueError, match="tails"):
            NPE(task, **SMALL, **bad)
    with pytest.raises(ValueError, match="windows"):
        est.fit_tails(val, windows=1)


def test_base_scales_change_the_base_exactly(tiny, briefly_trained, tmp_path):
    """``base_scale`` b scales the base per dimension: the log-density is the base's at ``z / b`` less ``sum log b``
    plus the flow's log-Jacobian, draws have ``std(z) = b`` in the base space, the centre does not move; ``scale_fit``
    sets it after ``fit``, it is saved, and a model saved without it loads with ones."""
    task, train, val = tiny
    est, (x, y, m, t) = briefly_trained
    plain = est.posterior(y, m, t)
    xs = plain.sample(32, generator=torch.Generator().manual_seed(3))
    centre = est.posterior(y, m, t, uncertainty="none").mean()
    b = torch.linspace(0.6, 1.6, 8)
    est.base_scale.copy_(b)
    try:
        scaled = est.posterior(y, m, t)
        with torch.no_grad():
            flow, loc, scale = est._parts(est.standardize(None, y, m, t))
            assert isinstance(flow.transform.transforms[-1], torch.distributions.AffineTransform)
            to_base = lambda v: flow.transform.transforms[0](  # noqa: E731
                ((v.flatten(2) - est.x_mean.reshape(-1)) / est.x_std.reshape(-1) - loc) / scale)
            z = to_base(xs)
            normal = torch.distributions.Normal(0.0, 1.0)
            expected = normal.log_prob(z / b).sum(-1) - b.log().sum() - normal.log_prob(z).sum(-1)
            assert torch.allclose(scaled.log_prob(xs) - plain.log_prob(xs), expected, atol=1e-3)
            draws = scaled.sample(4000, generator=torch.Generator().manual_seed(4))
            ratio = to_base(draws).std((0, 1)) / b
        assert torch.allclose(ratio, torch.ones(8), atol=0.05), ratio
        assert torch.allclose(est.posterior(y, m, t, uncertainty="none").mean(), centre, atol=1e-5)
        old = {k: v for k, v in est.state_dict().items() if k != "base_scale"}  # a model saved before the scales
        est.load_state_dict(old)
        assert torch.equal(est.base_scale, torch.ones(8))
    finally:
        est.base_scale.fill_(1.0)

    fitted = NPE(task, **SMALL, scale_fit=True, scale_windows=16, tails_fit=False)
    fitted.fit(train, val, epochs=1, steps_per_epoch=2, progress=False)
    record = fitted.scale_record  # 2 validation trajectories: t quantiles of 1 degree of freedom, little changes
    assert record["windows"] == 16 and record["trajectories"] == 2 and record["nll"] <= record["nll_before"] + 1e-6
    assert record["scale_min"] == float(fitted.base_scale.min()) and record["scale_max"] == float(
        fitted.base_scale.max())
    fitted.base_scale.mul_(torch.linspace(0.9, 1.1, 8))  # saved and loaded with the model
    again = load(fitted.save(tmp_path / "npe.pt"))
    assert torch.equal(again.base_scale, fitted.base_scale)
    assert torch.allclose(again.posterior(y, m, t).log_prob(xs), fitted.posterior(y, m, t).log_prob(xs))
    without_val = NPE(task, **SMALL)
    with warnings.catch_warnings():  # on by default: skipped without validation windows, and silently
        warnings.simplefilter("error")
        without_val.fit(train, epochs=1, steps_per_epoch=1, progress=False)
    assert torch.equal(without_val.base_scale, torch.ones(8)) and without_val.scale_record is None
    for bad in ({"scale_fit": "yes"}, {"scale_windows": 1}):
        with pytest.raises(ValueError, match="scale"):
            NPE(task, **SMALL, **bad)
    with pytest.raises(ValueError, match="windows"):
        est.fit_scale(val, windows=1)
    with pytest.warns(UserWarning, match="one trajectory"):
        record = est.fit_scale(val.subset([0]), windows=16)
    assert record["own"] == 0 and torch.equal(est.base_scale, torch.ones(8))


def test_spectral_map_is_exact_and_changes_the_spread_per_wavenumber(tiny, briefly_trained, tmp_path):
    """:class:`SpectralScale` is linear about its centre, symmetric, inverted exactly and its log-determinant is the
    Jacobian's, on rings and on (C, H, W) grids; ``spectrum_scale`` g keeps the posterior's centre, multiplies its
    spread power at wavenumber k by g_k^2 and its log-density is the plain one at the mapped-back state less the
    log-determinant; with an inflation s the draws of the same random numbers are s times further from the centre
    and lose D log s; ``spectrum_fit`` sets it after ``fit``, it is saved, and a model saved without it loads with
    ones."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((8,), (7,), (2, 6, 5)):
        D = math.prod(shape)
        k = 5 if shape != (7,) else 4  # bins 0-4 of a ring of 8, 0-3 of a ring of 7, radial 0-4 of a 6 x 5 grid
        gains = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
        centre = torch.randn(D, generator=gen, dtype=torch.float64)
        tr = SpectralScale(centre, gains, shape)
        x = torch.randn(3, D, generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(tr, x[0])
        assert torch.allclose(tr.inv(tr(x)), x, atol=1e-12) and torch.allclose(jac, jac.T, atol=1e-12)
        assert torch.allclose(tr(x) - centre, (x - centre) @ jac.T, atol=1e-12)
        assert torch.allclose(tr.log_abs_det_jacobian(x, tr(x)), torch.linalg.slogdet(jac)[1].expand(3))
    with pytest.raises(ValueError, match="gains"):
        SpectralScale(centre, torch.ones(4, dtype=torch.float64), (8,))

    task, train, val = tiny
    est, (x, y, m, t) = briefly_trained
    plain = est.posterior(y, m, t)
    centre = est.posterior(y, m, t, uncertainty="none").mean()
    xs = plain.sample(4000, generator=torch.Generator().manual_seed(3))
    g = torch.tensor([1.0, 0.7, 1.3, 1.6, 0.9], dtype=torch.float64)
    est.spectrum_scale.copy_(g)
    try:
        scaled = est.posterior(y, m, t)
        assert torch.allclose(est.posterior(y, m, t, uncertainty="none").mean(), centre, atol=1e-5)
        ys = scaled.sample(4000, generator=torch.Generator().manual_seed(3))
        (sp0, _), (sp1, _) = (sbida.diagnostics.scores.spectral_powers(s, x) for s in (xs, ys))
        assert torch.allclose(sp1 / sp0, g.square(), rtol=0.03), sp1 / sp0
        mu, sd = est.x_mean.reshape(-1), est.x_std.reshape(-1)
        c = ((centre.flatten(1) - mu) / sd).double()
        back = mu + sd * SpectralScale(c, g, (8,)).inv(((ys[:50].flatten(2) - mu) / sd).double()).float()
        log_det = float(g.log()[[0, 1, 2, 3, 4, 3, 2, 1]].sum())
        assert torch.allclose(scaled.log_prob(ys[:50]), plain.log_prob(back) - log_det, atol=1e-3)
        est.hparams["inflation"] = 1.5  # both maps: linear about the same centre, so they compose exactly
        both = est.posterior(y, m, t)
        zs = both.sample(50, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(zs - centre, 1.5 * (ys[:50] - centre), atol=1e-4)
        assert torch.allclose(both.log_prob(zs), scaled.log_prob(ys[:50]) - 8 * math.log(1.5), atol=1e-3)
        est.hparams["inflation"] = 1.0
        old = {k: v for k, v in est.state_dict().items() if k != "spectrum_scale"}  # saved before the map
        est.load_state_dict(old)
        assert torch.equal(est.spectrum_scale, torch.ones(5, dtype=torch.float64))
        assert torch.allclose(est.posterior(y, m, t).log_prob(xs[:50]), plain.log_prob(xs[:50]))
    finally:
        est.spectrum_scale.fill_(1.0)
        est.hparams["inflation"] = 1.0

    fitted = NPE(task, **SMALL, spectrum_fit=True, spectrum_windows=16, spectrum_samples=8, tails_fit=False,
                 scale_fit=False)
    fitted.fit(train, val, epochs=1, steps_per_epoch=2, progress=False)
    record = fitted.spectrum_record
    assert record["windows"] == 16 and record["samples"] == 8 and record["trajectories"] == 2
    assert record["gains"] == fitted.spectrum_scale.tolist() and len(record["spread_skill"]) == 5
    fitted.spectrum_scale.mul_(torch.linspace(0.9, 1.1, 5, dtype=torch.float64))  # saved and loaded with the model
    again = load(fitted.save(tmp_path / "npe.pt"))
    assert torch.equal(again.spectrum_scale, fitted.spectrum_scale)
    assert torch.allclose(again.posterior(y, m, t).log_prob(xs[:50]), fitted.posterior(y, m, t).log_prob(xs[:50]))
    for bad in ({"spectrum_fit": 1}, {"spectrum_windows": 1}, {"spectrum_samples": 1}):
        with pytest.raises(ValueError, match="spectrum"):
            NPE(task, **SMALL, **bad)
    with pytest.raises(ValueError, match="samples"):
        est.fit_spectrum(val, samples=1)
    with pytest.warns(UserWarning, match="one trajectory"):
        record = est.fit_spectrum(val.subset([0]), windows=16, samples=8)
    assert record["own"] == 0 and torch.equal(est.spectrum_scale, torch.ones(5, dtype=torch.float64))


class _LinearMap(torch.distributions.Transform):
    """``z -> z M^T`` per window (``M`` ``(B, D, D)``): a flow whose Jacobian is known."""

    domain = codomain = torch.distributions.constraints.real_vector
    bijective = True

    def __init__(self, M):
        super().__init__()
        self.M = M

    def _call(self, z):
        return torch.einsum("bij,...bj->...bi", self.M, z)

    def _inverse(self, x):
        return torch.linalg.solve(self.M, x.unsqueeze(-1)).squeeze(-1)


def test_eigen_power_is_exact_and_keeps_the_volume(tiny, briefly_trained, tmp_path):
    """:class:`EigenPower` is the linear map ``V diag((lam / gm)^((g - 1) / 2)) V^T`` about its centre: it takes the
    covariance ``V diag(lam) V^T`` to ``V diag(lam^g gm^(1 - g)) V^T``, has determinant 1, is inverted by the power
    ``2 - g`` and is the identity at 1; ``NPE._local_shape`` finds ``J J^T`` of a flow with a known Jacobian; with
    ``power`` the NPE's draws of the same random numbers are mapped by it about the flow's centre and keep their
    log-density, the point estimate does not move, ``power_fit`` sets it after ``fit`` and it is saved."""
    gen = torch.Generator().manual_seed(0)
    B, D, g = 3, 6, 1.4
    A = torch.randn(B, D, D, generator=gen, dtype=torch.float64)
    cov = A @ A.mT + 0.1 * torch.eye(D, dtype=torch.float64)
    lam, V = torch.linalg.eigh(cov)
    c = torch.randn(B, D, generator=gen, dtype=torch.float64)
    tr = EigenPower(c, lam, V, g)
    x = torch.randn(5, B, D, generator=gen, dtype=torch.float64)
    gm = lam.log().mean(-1, keepdim=True).exp()
    M = V @ torch.diag_embed((lam / gm) ** ((g - 1) / 2)) @ V.mT
    assert torch.allclose(tr(x) - c, torch.einsum("bij,nbj->nbi", M, x - c), atol=1e-10)
    assert torch.allclose(M @ cov @ M.mT, V @ torch.diag_embed(lam**g * gm ** (1 - g)) @ V.mT, atol=1e-8)
    assert torch.allclose(torch.linalg.slogdet(M)[1], torch.zeros(B, dtype=torch.float64), atol=1e-10)
    assert torch.equal(tr.log_abs_det_jacobian(x, tr(x)), torch.zeros(5, B, dtype=torch.float64))
    assert torch.allclose(tr.inv(tr(x)), x, atol=1e-10)
    assert torch.allclose(EigenPower(c, lam, V, 2 - g)(tr(x)), x, atol=1e-10)
    assert torch.allclose(EigenPower(c, lam, V, 1.0)(x), x, atol=1e-12)
    with pytest.raises(ValueError, match="power"):
        EigenPower(c, lam, V, 0.0)
    with pytest.raises(ValueError, match="eigenvectors"):
        EigenPower(c, lam, V[:, :2], g)

    task, train, val = tiny
    est, (x, y, m, t) = briefly_trained
    Mz = torch.randn(2, 8, 8, generator=gen) + 3 * torch.eye(8)  # not symmetric: J J^T, not J^T J
    flow = type("Flow", (), {"base": type("Base", (), {"mean": torch.zeros(2, 8)})(),
                             "transform": _LinearMap(Mz).inv})()
    lam8, V8 = est._local_shape(flow, [])
    assert torch.allclose(V8 @ torch.diag_embed(lam8) @ V8.mT, Mz @ Mz.mT, rtol=1e-4, atol=1e-4)

    plain = est.posterior(y, m, t)
    centre = est.posterior(y, m, t, uncertainty="none").mean()
    xa = plain.sample(64, generator=torch.Generator().manual_seed(2))
    est.hparams["power"] = 1.3
    try:
        powered = est.posterior(y, m, t)
        xb = powered.sample(64, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(powered.log_prob(xb), plain.log_prob(xa), atol=1e-3)  # volume kept
        assert torch.allclose(est.posterior(y, m, t, uncertainty="none").mean(), centre)
        mu, sd = est.x_mean.reshape(-1), est.x_std.reshape(-1)
        with torch.no_grad():
            flow, loc, scale = est._parts(est.standardize(x, y, m, t))
            shaping = est._state_transforms(flow, loc, scale, power=False)
        lam_w, V_w = est._local_shape(flow, shaping)
        c_w = loc + scale * est._centre(flow)
        mapped = EigenPower(c_w.detach(), lam_w, V_w, 1.3)((xa.flatten(2) - mu) / sd)
        assert torch.allclose(mapped, (xb.flatten(2) - mu) / sd, atol=1e-4)
        assert not torch.allclose(xa, xb, atol=1e-2)
        est.hparams["inflation"] = 1.5  # both maps linear about the same centre: they commute
        both = est.posterior(y, m, t)
        xc = both.sample(64, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(xc - centre, 1.5 * (xb - centre), atol=1e-4)
        assert torch.allclose(both.log_prob(xc), powered.log_prob(xb) - 8 * math.log(1.5), atol=1e-3)
        est.hparams["inflation"] = 1.0
        assert torch.allclose(load(est.save(tmp_path / "p.pt")).posterior(y, m, t).log_prob(xb),
                              powered.log_prob(xb), atol=1e-5)
        # the training loss does not see the power
        batch = est.standardize(x, y, m, t)
        with torch.no_grad():
            est.hparams["power"] = 1.0
            plain_loss = float(est.loss(batch))
            est.hparams["power"] = 1.3
            assert float(est.loss(batch)) == pytest.approx(plain_loss, abs=1e-6)
    finally:
        est.hparams.update(power=1.0, inflation=1.0)

    fitted = NPE(task, **SMALL, power_fit=True, power_windows=16, power_samples=8, tails_fit=False,
                 scale_fit=False)
    fitted.fit(train, val, epochs=1, steps_per_epoch=2, progress=False)
    record = fitted.power_record
    assert record["windows"] == 16 and record["samples"] == 8 and len(record["score"]) == len(record["grid"]) == 13
    assert fitted.hparams["power"] == record["power"] and record["margin"] > 0
    for bad in ({"power": 0.0}, {"power": float("inf")}, {"power_fit": 1}, {"power_samples": 1}):
        with pytest.raises(ValueError, match="power"):
            NPE(task, **SMALL, **bad)
    with pytest.raises(ValueError, match="grid"):
        est.fit_power(val, grid=[1.0, -1.0])
    with pytest.raises(ValueError, match="margin"):
        est.fit_power(val, margin=-0.1)
    with pytest.raises(ValueError, match="samples"):
        est.fit_power(val, samples=1)


def test_log_prob_accounts_for_the_standardization(briefly_trained):
    """Change of variables: scaling the state standardization by a scales samples by a, densities by a^-D."""
    est, (x, y, m, t) = briefly_trained
    post = est.posterior(y, m, t)
    s = post.sample(50, generator=torch.Generator().manual_seed(1))
    lp = post.log_prob(s)
    a = 3.0
    with torch.no_grad():
        est.x_mean.mul_(a)
        est.x_std.mul_(a)
    post2 = est.posterior(y, m, t)
    s2 = post2.sample(50, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(s2, a * s, rtol=1e-5, atol=1e-5)
    assert torch.allclose(post2.log_prob(s2), lp - 8 * math.log(a), atol=1e-3)


@pytest.mark.slow
def test_save_load_gives_identical_samples(lg, tmp_path):
    task, _, _, test, est, _ = lg
    x, y, m, t = test.get(torch.arange(5))
    path = est.save(tmp_path / "npe.pt")
    other = load(path)
    assert isinstance(other, NPE) and other.hparams == est.hparams
    a = est.posterior(y, m, t).sample(100, generator=torch.Generator().manual_seed(3))
    b = other.posterior(y, m, t).sample(100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(est.posterior(y, m, t).log_prob(a), other.posterior(y, m, t).log_prob(a))
    assert torch.equal(NPE.load(path).x_std, est.x_std)


def test_bad_input_is_a_clear_error(tiny):
    task, train, val = tiny
    est = NPE(task, **SMALL)
    x, y, m, t = train.get(torch.arange(4))
    with pytest.raises(RuntimeError, match="not trained"):
        est.posterior(y, m, t)
    est.fit(train, epochs=1, steps_per_epoch=2, progress=False)
    assert est.posterior(y, m, t).sample(3).shape == (3, 4, 8)
    with pytest.raises(ValueError, match="window of 10"):
        est.posterior(y[:, :5], m[:, :5], t)
    with pytest.raises(ValueError, match="NaN"):
        est.posterior(torch.where(m, torch.nan, y), m, t)
    est.posterior(torch.where(m, y, torch.nan), m, t)  # NaN where missing is ignored
    with pytest.raises(ValueError, match="empty mask"):
        est.posterior(y, torch.zeros_like(m), t)
    with pytest.raises(ValueError, match=r"times t of shape \(4,\)"):
        est.posterior(y, m, t[:2])
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        NPE(task, chanels=8)
    with pytest.raises(ValueError, match="one integer"):
        NPE(task, flow="maf", transforms=[3, 2])
    with pytest.raises(ValueError, match="transforms"):
        NPE(task, **{**SMALL, "transforms": [3, 0]})
    per_level = NPE(task, **{**SMALL, "transforms": [3, 1]})  # couplings per level of the grid flow
    assert len(per_level.flow.couplings) == 3 + 1 + 1  # K=8: three levels
    other = sbida.tasks.get("lorenz96", K=16, n_trajectories=4, n_states=20).simulate(progress=False)
    with pytest.raises(ValueError, match="expects"):
        est.fit(other, epochs=1, progress=False)
    post = est.posterior(y, m, t)
    with pytest.raises(ValueError, match="expected states of shape"):
        post.log_prob(torch.zeros(4, 16))


def test_training_is_reproducible_and_resumable(tiny, tmp_path):
    task, train, val = tiny
    kw = {"epochs": 4, "steps_per_epoch": 3, "batch_size": 32, "patience": None, "progress": False, "seed": 5}
    a = NPE(task, **SMALL)
    ha = a.fit(train, val, **kw)
    b = NPE(task, **SMALL)
    b.fit(train, val, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert set(ha) == {"epoch", "train_loss", "val_loss", "lr", "time"} and len(ha["val_loss"]) == 4
    assert ha["lr"][-1] < ha["lr"][0]  # the cosine schedule decays
    # interrupted after two epochs, then resumed from the checkpoint: the same weights as the uninterrupted run
    ck = tmp_path / "ck.pt"
    c = NPE(task, **SMALL)
    hc = c.fit(train, val, checkpoint=ck, callback=lambda epoch, h: epoch == 1, **kw)
    assert len(hc["epoch"]) == 2
    d = NPE(task, **SMALL)
    hd = d.fit(train, val, checkpoint=ck, resume=True, **kw)
    assert hd["epoch"] == [0, 1, 2, 3] and hd["val_loss"] == ha["val_loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), d.state_dict().values()))
    # a different seed trains differently
    e = NPE(task, **SMALL)
    assert e.fit(train, val, **{**kw, "seed": 6})["train_loss"] != ha["train_loss"]


def test_training_state_loads_as_an_estimator_to_look_at_a_running_fit(tiny, tmp_path):
    """``load`` reads fit's per-epoch training state: its best (or last) weights, with a warning that the calibration
    fits of the end of fit are missing; ``after_fit`` with fit's seed then gives the very estimator fit returned."""
    task, train, val = tiny
    ck = tmp_path / "ck.pt"
    kw = {"epochs": 4, "steps_per_epoch": 3, "batch_size": 32, "patience": None, "progress": False, "seed": 5}
    done = NPE(task, **SMALL)
    done.fit(train, val, checkpoint=ck, callback=lambda epoch, h: epoch == 1, **kw)
    state = torch.load(ck, weights_only=True)
    moved = tmp_path / "moved.pt"  # last weights that differ from the best ones
    torch.save({**state, "model": {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}}, moved)
    with pytest.warns(UserWarning, match="after epoch 2: loaded its best weights.*after_fit"):
        best = sbida.estimators.load(moved)
    with pytest.warns(UserWarning, match="last weights"):
        last = NPE.load(moved, weights="last")
    assert all(torch.equal(v, best.state_dict()[k]) for k, v in state["best"].items())
    assert all(torch.equal(v + 1, last.state_dict()[k]) for k, v in state["model"].items() if v.is_floating_point())
    _, y, m, t = val.get(torch.arange(4))
    draw = lambda est: est.posterior(y, m, t).sample(8, generator=torch.Generator().manual_seed(0))  # noqa: E731
    best.after_fit(train, val, seed=5)
    assert torch.equal(draw(best), draw(done))
    with pytest.raises(ValueError, match="'best' or 'last'"):
        sbida.estimators.load(ck, weights="final")


def test_cosine_schedule_follows_the_clock_when_max_time_comes_first(tiny):
    """A run stopped by max_time long before its steps still ends at the low learning rate of the schedule."""
    task, train, val = tiny
    est = NPE(task, **SMALL)
    hist = est.fit(train, val, epochs=1000, steps_per_epoch=2, lr=1e-3, max_time=3.0, patience=None, progress=False)
    assert hist["time"][-1] >= 3.0 and len(hist["epoch"]) < 1000
    assert hist["lr"][-1] < 5e-5 < hist["lr"][0]  # lr/100 = 1e-5 at the end of the budget


def test_progress_bar_of_a_time_boxed_run_counts_the_share_of_the_budget(tiny, capsys):
    """With max_time the bar shows percent of the budget (steps or time), not billions of unreachable steps."""
    task, train, val = tiny
    NPE(task, **SMALL).fit(train, val, epochs=10**6, steps_per_epoch=2, max_time=1.0, patience=None, progress=True)
    err = capsys.readouterr().err
    assert "% of the budget" in err and "100% of the budget" in err and "2000000" not in err


def test_progress_bar_is_full_when_the_validation_spends_the_rest_of_the_budget(tiny, capsys, monkeypatch):
    """A machine under load can spend the time budget in the validation after the last step: the bar must still
    end at 100 %."""
    task, train, val = tiny
    est = NPE(task, **SMALL)
    evaluate = est.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.6)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(est, "evaluate", slow_evaluate)
    est.fit(train, val, epochs=10**6, steps_per_epoch=1, max_time=0.5, patience=None, progress=True)
    err = capsys.readouterr().err
    assert "100% of the budget" in err, err[-300:]


def test_best_epoch_is_restored_and_early_stopping(tiny):
    task, train, val = tiny
    # the fitted scales, spectrum and tails would change the validation loss after fit
    est = NPE(task, **SMALL, tails_fit=False, scale_fit=False, spectrum_fit=False)
    hist = est.fit(train, val, epochs=30, steps_per_epoch=2, lr=0.5, patience=2, progress=False, schedule="constant",
                   clip=None)
    best = min(hist["val_loss"])
    i = hist["val_loss"].index(best)
    assert len(hist["epoch"]) == min(30, i + 1 + 2)  # stopped 2 epochs (the patience) after the best one
    assert math.isclose(est.evaluate(val, seed=0), best, rel_tol=1e-5, abs_tol=1e-5)


def test_standardization_is_learned_from_the_training_set(tiny):
    task, train, _ = tiny
    est = NPE(task, **SMALL)
    est.fit(train, epochs=1, steps_per_epoch=1, progress=False)
    x, y, m, t = train.get(torch.arange(len(train)))
    assert torch.allclose(est.x_mean, x.mean(0), atol=1e-4) and torch.allclose(est.x_std, x.std(0), rtol=1e-3)
    assert math.isclose(float(est.t_stats[0]), float(t.double().mean()), rel_tol=1e-5)

    def check_y(est, y, m):  # per observed value, over the windows and lags where it is observed
        yd, md = y.double(), m.double()
        mean = (yd * md).sum((0, 1)) / md.sum((0, 1))
        std = (((yd - mean) ** 2 * md).sum((0, 1)) / (md.sum((0, 1)) - 1)).sqrt()
        assert torch.allclose(est.y_mean.double(), mean, atol=1e-5)
        assert torch.allclose(est.y_std.double(), std, rtol=1e-4)
        return mean

    y_mean = check_y(est, y, m)
    assert (y_mean - y_mean.mean()).abs().max() > 0.05  # the stations' means differ: an overall one would fail
    # random masks: the missing values (whatever they hold) take no part
    sparse = sbida.tasks.get("lorenz96-sparse", K=8, n_trajectories=2, n_states=64)
    data = sparse.simulate(progress=False)
    _, y, m, _ = data.get(torch.arange(len(data)))
    assert 0 < m.float().mean() < 0.9
    est = NPE(sparse, **SMALL)
    est.fit_standardization(data)
    check_y(est, y, m)


def test_estimator_from_shapes_and_2d_states(tmp_path):
    H = sbida.observations.Stations(count=4, kernel_width=1.0, sigma=0.5, state_shape=(2, 8, 8))
    est = NPE(state_shape=(2, 8, 8), obs_shape=(2, 4, 4), window=3, observation=H, **SMALL)
    assert est.lift.shape == (32, 128)
    x = torch.randn(4, 2, 8, 8)
    y, m = H.sample(x[:, None].expand(4, 3, 2, 8, 8))
    b = est.standardize(x, y, m, torch.zeros(4))
    assert torch.isfinite(est.loss(b))
    est.fitted.fill_(True)
    post = est.posterior(y, m, torch.zeros(4))
    assert post.sample(2).shape == (2, 4, 2, 8, 8)
    other = Estimator.load(est.save(tmp_path / "e.pt"))
    assert torch.equal(other.lift, est.lift)
    assert est.spectrum_scale.shape == (7,)  # radial wavenumbers 0-6 of the 8 x 8 grid (the corner: sqrt(32))
    with pytest.raises(ValueError, match="give a task"):
        NPE(state_shape=(8,))


def test_config_file_matches_the_code():
    cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "npe.yaml")
    assert set(cfg["estimator"]) == set(NPE.defaults) | {"seed"}
    import inspect
    params = inspect.signature(Estimator.fit).parameters
    assert set(cfg["fit"]) <= set(params)


def test_atomic_save_keeps_the_former_file_when_a_write_is_cut(tmp_path, monkeypatch):
    """A fit's training state is rewritten after every epoch; a process killed while writing leaves the former one."""
    from sbida.estimators.base import atomic_save

    path = tmp_path / "state.pt"
    atomic_save({"a": torch.ones(2)}, path)

    def cut(obj, f):
        Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
