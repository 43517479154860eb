"""PosteriorScore and the VP diffusion sampler: exactness on Gaussians, the linear-Gaussian posterior, persistence."""

import pytest
import torch

import sbida
from sbida.estimators import Estimator, PosteriorScore, load
from sbida.estimators.sde import CosineSchedule, sample_vp
from sbida.posterior import SamplerPosterior

SMALL = {"channels": 8, "depth": 1, "features": 16, "emb_features": 8, "unet_channels": [8, 16], "steps": 4}
MEDIUM = {"channels": 16, "depth": 1, "features": 32, "emb_features": 16, "unet_channels": [16, 32]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_eps(m, v, schedule):
    """The exact noise prediction of N(m, diag v) diffused by the schedule."""
    def eps(x, s):
        mu, sigma = schedule.mu(s)[:, None], schedule.sigma(s)[:, None]
        return sigma * (x - mu * m) / (mu**2 * v + sigma**2)
    return eps


def test_schedule_is_variance_preserving():
    sch = CosineSchedule(1e-3, 2e-2)
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(sch.mu(s) ** 2 + sch.sigma(s) ** 2, torch.ones_like(s))
    assert abs(float(sch.sigma(s[0])) - 1e-3) < 1e-9 and abs(float(sch.mu(s[-1])) - 2e-2) < 1e-9
    assert (sch.mu(s).diff() < 0).all()
    with pytest.raises(ValueError):
        CosineSchedule(0.5)


@pytest.mark.parametrize("steps, corrections", [(32, 1), (128, 0)])
def test_sampler_draws_a_gaussian_from_its_exact_score(steps, corrections):
    """With the exact score of N(m, diag v) the predictor-corrector sampler returns its mean and variance.

    Means and variances as in standardized units; the start from N(0, I) at s = 1 (where the signal mu_min = 0.02
    remains) biases the mean by about 0.02 m sqrt(v) without corrector, below the tolerance of 0.05 sd.
    """
    sch = CosineSchedule()
    m = torch.linspace(-2, 2, 6, dtype=torch.float64)
    v = torch.tensor([0.01, 0.05, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    x = sample_vp(gaussian_eps(m, v, sch), (20000, 6), sch, steps=steps, corrections=corrections, tau=0.3,
                  generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ((x.mean(0) - m).abs() / v.sqrt()).max() < 0.05, ((x.mean(0) - m) / v.sqrt()).tolist()
    assert torch.allclose(x.var(0) / v, torch.ones(6, dtype=torch.float64), atol=0.06), (x.var(0) / v).tolist()
    with pytest.raises(ValueError, match="steps"):
        sample_vp(gaussian_eps(m, v, sch), (2, 6), sch, steps=0)


@pytest.fixture(scope="module")
def tiny():
    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=8, n_states=40)
    train, val = task.simulate(progress=False).split(0.75, 0.25)
    est = PosteriorScore(task, **SMALL)
    est.fit(train, val, epochs=1, steps_per_epoch=2, progress=False)
    return task, train, val, est


def test_save_load_gives_identical_samples(tiny, tmp_path):
    task, train, _, est = tiny
    x, y, m, t = train.get(torch.arange(5))
    other = load(est.save(tmp_path / "score.pt"))
    assert isinstance(other, PosteriorScore) and other.hparams == est.hparams
    a = est.posterior(y, m, t).sample(20, generator=torch.Generator().manual_seed(3))
    b = other.posterior(y, m, t).sample(20, generator=torch.Generator().manual_seed(3))
    assert a.shape == (20, 5, 8) and torch.equal(a, b)
    c = other.posterior(y, m, t).sample(20, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)


def test_sampling_is_batched_in_chunks(tiny):
    """Chunking over samples (sample_rows) does not change the per-window results' shape or their windows."""
    task, train, _, est = tiny
    x, y, m, t = train.get(torch.arange(3))
    post = est.posterior(y, m, t)
    assert isinstance(post, SamplerPosterior) and not post.has_log_prob
    with pytest.raises(NotImplementedError):
        post.log_prob(x)
    est.hparams["sample_rows"] = 6  # two samples per pass
    try:
        s = est.posterior(y, m, t).sample(7, generator=torch.Generator().manual_seed(0))
    finally:
        est.hparams["sample_rows"] = PosteriorScore.defaults["sample_rows"]
    assert s.shape == (7, 3, 8) and torch.isfinite(s).all()


def test_bad_input_is_a_clear_error(tiny):
    task, train, _, est = tiny
    x, y, m, t = train.get(torch.arange(4))
    with pytest.raises(RuntimeError, match="not trained"):
        PosteriorScore(task, **SMALL).posterior(y, m, t)
    with pytest.raises(ValueError, match="window of 10"):
        est.posterior(y[:, :5], m[:, :5], t)
    with pytest.raises(ValueError, match="NaN"):
        est.posterior(torch.where(m, torch.nan, y), m, t)
    with pytest.raises(ValueError, match="empty mask"):
        est.posterior(y, torch.zeros_like(m), t)
    with pytest.raises(ValueError, match="steps"):
        est.posterior(y, m, t, steps=0)
    with pytest.raises(ValueError, match="unknown posterior options"):
        est.posterior(y, m, t, gamma=1.0)
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        PosteriorScore(task, step=3)


def test_kolmogorov_trains_and_samples():
    task = sbida.tasks.get("kolmogorov", n_trajectories=2, n_states=12, burn_in=2)
    data = task.simulate(progress=False)
    est = PosteriorScore(task, **SMALL)
    hist = est.fit(data, epochs=1, steps_per_epoch=2, batch_size=4, progress=False)
    assert all(map(lambda v: v == v, hist["train_loss"]))
    x, y, m, t = data.get(torch.arange(2))
    s = est.posterior(y, m, t).sample(3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 2, 2, 32, 32) and torch.isfinite(s).all()


def test_config_file_matches_the_code():
    cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "score.yaml")
    assert set(cfg["estimator"]) == set(PosteriorScore.defaults) | {"seed"}
    import inspect
    assert set(cfg["fit"]) <= set(inspect.signature(Estimator.fit).parameters)
