"""ComposedScore: exactness of the Gaussian-corrected composition, other window lengths, guidance, persistence."""

import pytest
import torch

import sbida
from sbida.estimators import ComposedScore, Estimator, load
from sbida.estimators.composed import compose_eps
from sbida.estimators.sde import CosineSchedule

SMALL = {"channels": 8, "depth": 1, "features": 16, "emb_features": 8, "unet_channels": [8, 16], "steps": 4}


def diffused_eps(x, mean, var, mu, sigma):
    """Exact noise prediction of N(mean, diag var) diffused to (mu, sigma)."""
    return sigma * (x - mu * mean) / (mu**2 * var + sigma**2)


def test_gaussian_correction_is_exact_for_gaussians():
    """Prior N(0, v0) and T independent Gaussian observations: the composed noise equals the posterior's at every s,
    while the plain sum of scores is wrong except near s = 0."""
    g = torch.Generator().manual_seed(0)
    T, D = 5, 7
    v0 = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    lik = 0.2 + 2 * torch.rand(T, D, generator=g, dtype=torch.float64)  # precisions of the observations
    z = torch.randn(T, D, generator=g, dtype=torch.float64)
    vk = 1 / (1 / v0 + lik)  # single-observation posteriors
    mk = vk * lik * z
    vp = 1 / (1 / v0 + lik.sum(0))  # the window posterior
    mp = vp * (lik * z).sum(0)
    sch = CosineSchedule()
    x = torch.randn(3, D, generator=g, dtype=torch.float64)
    means = torch.cat([mk, torch.zeros(1, D, dtype=torch.float64)])
    var = torch.cat([vk, v0[None]])
    for s in (0.05, 0.3, 0.7, 0.95):
        mu, sigma = sch.mu(torch.tensor(s)), sch.sigma(torch.tensor(s))
        eps = diffused_eps(x[None], means[:, None], var[:, None], mu, sigma)  # (T+1, 3, D)
        exact = diffused_eps(x, mp, vp, mu, sigma)
        got = compose_eps(eps, 1 / var[:, None], (mu / sigma) ** 2, "gauss")
        assert torch.allclose(got, exact, atol=1e-10), s
        if s > 0.2:
            assert not torch.allclose(compose_eps(eps, 1 / var[:, None], (mu / sigma) ** 2, "none"), exact, atol=1e-2)


@pytest.fixture(scope="module")
def tiny():
    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=8, n_states=40)
    train, val = task.simulate(progress=False).split(0.75, 0.25)
    ests = {}
    for mode in ("composed", "guided"):
        ests[mode] = ComposedScore(task, mode=mode, **SMALL)
        ests[mode].fit(train, val, epochs=1, steps_per_epoch=2, progress=False)
    return task, train, val, ests


@pytest.mark.parametrize("mode", ["composed", "guided"])
def test_save_load_gives_identical_samples(tiny, tmp_path, mode):
    task, train, _, ests = tiny
    est = ests[mode]
    x, y, m, t = train.get(torch.arange(4))
    other = load(est.save(tmp_path / f"{mode}.pt"))
    assert isinstance(other, ComposedScore) and other.hparams == est.hparams
    a = est.posterior(y, m, t).sample(6, generator=torch.Generator().manual_seed(3))
    b = other.posterior(y, m, t).sample(6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (6, 4, 8) and torch.equal(a, b)


def test_window_length_may_differ_from_training(tiny):
    task, train, _, ests = tiny
    est = ests["composed"]
    x, y, m, t = train.get(torch.arange(3))
    for lags in ([-2, -1, 0], [0], list(range(-9, 1))):
        k = len(lags)
        s = est.posterior(y[:, -k:], m[:, -k:], t, lags=lags).sample(4, generator=torch.Generator().manual_seed(0))
        assert s.shape == (4, 3, 8) and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="window of 3"):
        est.posterior(y, m, t, lags=[-2, -1, 0])
    with pytest.raises(ValueError, match="window of 10"):
        est.posterior(y[:, :4], m[:, :4], t)
    with pytest.raises(ValueError, match="distinct"):
        est.posterior(y[:, :2], m[:, :2], t, lags=[0, 0])


def test_guidance_pulls_samples_towards_the_observations():
    """Guided mode with an untrained prior score: a larger guidance weight (smaller gamma) fits y_t better."""
    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=8, n_states=40)
    data = task.simulate(progress=False)
    est = ComposedScore(task, mode="guided", **SMALL)
    est.fit(data, epochs=1, steps_per_epoch=2, progress=False)
    x, y, m, t = data.get(torch.arange(6))
    H = task.observation.matrix(dtype=torch.float32)
    misfit = []
    for gamma in (100.0, 0.1):
        s = est.posterior(y, m, t, gamma=gamma, steps=8).sample(16, generator=torch.Generator().manual_seed(0))
        r = (s @ H.T - y[:, -1])[:, m[:, -1]]
        misfit.append(float(r.square().mean()))
    assert misfit[1] < 0.5 * misfit[0], misfit


def test_bad_input_is_a_clear_error(tiny):
    task, train, _, ests = tiny
    x, y, m, t = train.get(torch.arange(4))
    with pytest.raises(RuntimeError, match="not trained"):
        ComposedScore(task, **SMALL).posterior(y, m, t)
    with pytest.raises(ValueError, match="mode"):
        ComposedScore(task, mode="sum")
    with pytest.raises(ValueError, match="NaN"):
        ests["composed"].posterior(torch.where(m, torch.nan, y), m, t)
    with pytest.raises(ValueError, match="correction"):
        ests["composed"].posterior(y, m, t, correction="exact")
    with pytest.raises(ValueError, match="gamma"):
        ests["guided"].posterior(y, m, t, gamma=-1.0)


def test_kolmogorov_trains_and_samples():
    task = sbida.tasks.get("kolmogorov", n_trajectories=2, n_states=12, burn_in=2)
    data = task.simulate(progress=False)
    est = ComposedScore(task, **SMALL)
    est.fit(data, epochs=1, steps_per_epoch=2, batch_size=4, progress=False)
    x, y, m, t = data.get(torch.arange(2))
    s = est.posterior(y, m, t, steps=2).sample(2, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 2, 2, 32, 32) and torch.isfinite(s).all()


def test_config_file_matches_the_code():
    cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "composed.yaml")
    assert set(cfg["estimator"]) == set(ComposedScore.defaults) | {"seed"}
    import inspect
    assert set(cfg["fit"]) <= set(inspect.signature(Estimator.fit).parameters)
