"""PosteriorScore and the VP diffusion sampler: exactness on Gaussians, the linear-Gaussian posterior, persistence."""

import math
import threading

import pytest
import torch

import sbida
from sbida.estimators import Estimator, PosteriorScore, load
from sbida.estimators.score import chunked_sampler
from sbida.estimators.sde import CosineSchedule, sample_vp
from sbida.posterior import SamplerPosterior

SMALL = {"channels": 8, "depth": 1, "features": 16, "emb_features": 8, "unet_channels": [8, 16], "steps": 4}
MEDIUM = {"channels": 16, "depth": 1, "features": 32, "emb_features": 16, "unet_channels": [16, 32]}


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


@pytest.mark.parametrize("steps, corrections, tau, var_tol",
                         [(32, 1, 0.3, 0.06), (128, 0, 0.3, 0.06), (16, 1, 0.4, 0.04)])
def test_sampler_draws_a_gaussian_from_its_exact_score(steps, corrections, tau, var_tol):
    """With the exact score of N(m, diag v) the predictor-corrector sampler returns its mean and variance.

    Means and variances as in standardized units; the start from N(0, I) at s = 1 (where the signal mu_min = 0.02
    remains) biases the mean by about 0.02 m sqrt(v) without corrector, below the tolerance of 0.05 sd. The default
    sampler (16 steps, one correction, tau 0.4) is held to 4 % on v >= 0.05; at v = 0.01 its coarse grid shrinks the
    variance by about 6 % (8 % allowed; 20000 samples give a standard error of 1 %).
    """
    sch = CosineSchedule()
    m = torch.linspace(-2, 2, 6, dtype=torch.float64)
    v = torch.tensor([0.01, 0.05, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    x = sample_vp(gaussian_eps(m, v, sch), (20000, 6), sch, steps=steps, corrections=corrections, tau=tau,
                  generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ((x.mean(0) - m).abs() / v.sqrt()).max() < 0.05, ((x.mean(0) - m) / v.sqrt()).tolist()
    tol = torch.full((6,), var_tol, dtype=torch.float64)
    tol[0] = max(var_tol, 0.08)
    assert ((x.var(0) / v - 1).abs() <= tol).all(), (x.var(0) / v).tolist()
    with pytest.raises(ValueError, match="steps"):
        sample_vp(gaussian_eps(m, v, sch), (2, 6), sch, steps=0)


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_dsm_loss_draws_diffusion_times_as_a_power_of_a_uniform(rho):
    """s = u ** rho: E[s] = 1 / (1 + rho); the loss of the exact noise predictor of a point mass at 0 is zero."""
    from sbida.estimators.sde import dsm_loss
    sch = CosineSchedule()
    seen = []

    def eps(xs, s):
        seen.append(s)
        return xs / sch.sigma(s)[:, None]  # x = 0: x_s = sigma_s eps exactly

    torch.manual_seed(0)
    loss = dsm_loss(eps, torch.zeros(20000, 3), sch, rho=rho)
    assert float(loss) < 1e-8
    assert abs(float(seen[0].mean()) - 1 / (1 + rho)) < 0.01
    with pytest.raises(ValueError, match="rho"):
        dsm_loss(eps, torch.zeros(2, 3), sch, rho=0.0)


def test_default_sampler_settings_are_the_checked_ones():
    h = PosteriorScore.defaults
    assert (h["steps"], h["corrections"], h["tau"]) == (16, 1, 0.4)


def test_periodic_conv2d_matches_the_circular_padding_mode():
    """The explicit circular pad + unpadded convolution equals torch's circular padding mode (also strided)."""
    from sbida.nn import periodic_conv
    torch.manual_seed(0)
    for stride, k in ((1, 3), (2, 3), (1, 5)):
        conv = periodic_conv(2, 3, 4, k, stride=stride)
        ref = torch.nn.Conv2d(3, 4, k, stride=stride, padding=k // 2, padding_mode="circular")
        ref.load_state_dict(conv.state_dict())
        x = torch.randn(2, 3, 9, 8)
        assert conv(x).shape == ref(x).shape
        assert torch.allclose(conv(x), ref(x), atol=1e-5)
    conv1 = periodic_conv(1, 3, 4, 3, stride=2)
    ref1 = torch.nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="circular")
    with torch.no_grad():
        ref1.weight.copy_(conv1.weight[:, :, 0])
        ref1.bias.copy_(conv1.bias)
    x = torch.randn(2, 3, 11)
    assert torch.allclose(conv1(x), ref1(x), atol=1e-5)


@pytest.mark.parametrize("state_shape", [(12,), (2, 8, 8)])
def test_conditioned_network_equals_the_full_network(state_shape):
    """Computing the windows' shares once (context conv, t/vec embedding) and broadcasting them over samples gives
    the full network's output on rows repeated sample-major; a wrong share, order or broadcast would not."""
    from sbida.estimators.score import ScoreNet
    torch.manual_seed(0)
    grid = state_shape[-1:] if len(state_shape) == 1 else state_shape[1:]
    net = ScoreNet(state_shape, 5, 6, channels=(8, 16), blocks=1, emb_features=8)
    for p in net.parameters():  # the output conv and the FiLMs start at zero: give every weight a value
        torch.nn.init.normal_(p, std=0.2)
    B, n = 3, 4
    t, ctx, vec = torch.randn(B), torch.randn(B, 5, *grid), torch.randn(B, 6)
    x, s = torch.randn(n * B, *state_shape), torch.rand(n * B)
    full = net(x, s, t.repeat(n), ctx.repeat(n, *([1] * (ctx.dim() - 1))), vec.repeat(n, 1))
    fast = net.conditioned(t, ctx, vec)(x, s)
    assert full.abs().mean() > 0.1
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-5), float((fast - full).abs().max())
    wrong = net(x, s, t.repeat_interleave(n), ctx.repeat_interleave(n, 0), vec.repeat_interleave(n, 0))
    assert not torch.allclose(fast, wrong, atol=1e-3)
    with pytest.raises(ValueError, match="n \\* 3"):
        net.conditioned(t, ctx, vec)(x[:5], s[:5])
    with pytest.raises(ValueError, match="context map"):
        net.unet.context_share(ctx[:, :4])


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
    # the wrapper itself: passes of at most rows // B samples, each window's draws kept in its column
    calls = []

    def draw(n, g):
        calls.append(n)
        return torch.arange(3.0) + 0.1 * torch.rand(n, 3, generator=g)

    out = chunked_sampler(draw, 3, 6)(7, torch.Generator().manual_seed(0))
    assert sorted(calls) == [1, 2, 2, 2] and out.shape == (7, 3)
    assert torch.equal(out.floor(), torch.arange(3.0).expand(7, 3))
    assert out[:, 0].unique().numel() == 7  # each pass draws its own numbers
    again = chunked_sampler(draw, 3, 6)(7, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # the same seed, the same draws


def test_passes_run_in_parallel_with_the_same_samples_as_one_after_the_other(tiny):
    """Several passes on 2 threads run two at a time (a thread each) and draw what 1 thread draws (each pass has its
    own generator, seeded in order); the thread count is restored; a different seed draws different samples."""
    task, train, _, est = tiny
    _, y, m, t = train.get(torch.arange(3))
    threads, seen = torch.get_num_threads(), []

    def draw(n, generator):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return torch.randn(n, 3, generator=generator)

    est.hparams["sample_rows"] = 6  # two samples per pass, four passes
    try:
        torch.set_num_threads(2)
        a = est.posterior(y, m, t).sample(7, generator=torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == 2
        z2 = chunked_sampler(draw, 3, 6)(7, torch.Generator().manual_seed(0))
        torch.set_num_threads(1)
        b = est.posterior(y, m, t).sample(7, generator=torch.Generator().manual_seed(0))
        z1 = chunked_sampler(draw, 3, 6)(7, torch.Generator().manual_seed(0))
        c = est.posterior(y, m, t).sample(7, generator=torch.Generator().manual_seed(1))
    finally:
        est.hparams["sample_rows"] = PosteriorScore.defaults["sample_rows"]
        torch.set_num_threads(threads)
    # the same noise; the window's encoding on 2 threads and on 1 may differ in the last bits
    assert torch.allclose(a, b, rtol=0, atol=1e-4) and (a - c).abs().max() > 0.1
    assert torch.equal(z1, z2) and z1.shape == (7, 3)
    assert len({z1[i:i + 2].sum().item() for i in range(0, 7, 2)}) == 4  # the passes' generators differ
    parallel, serial = seen[:4], seen[4:]
    assert all(k == 1 for _, k in parallel) and threading.get_ident() not in {i for i, _ in parallel}
    assert {i for i, _ in serial} == {threading.get_ident()}


def test_sampling_passes_are_cache_sized_on_a_cpu_and_bounded_by_sample_rows(tiny):
    """On a CPU a pass holds about PASS_VALUES state values (at least PASS_MIN_ROWS rows), never more than
    ``sample_rows``; elsewhere it is ``sample_rows``. The network sees passes of that many rows."""
    from sbida.estimators.score import PASS_MIN_ROWS, PASS_VALUES, pass_rows

    cpu = torch.device("cpu")
    assert pass_rows(8192, 40, cpu) == PASS_VALUES // 40
    assert pass_rows(8192, 2048, cpu) == max(PASS_MIN_ROWS, PASS_VALUES // 2048)
    assert pass_rows(100, 40, cpu) == 100
    assert pass_rows(8192, 40, torch.device("meta")) == 8192
    task, train, _, est = tiny  # K = 8
    x, y, m, t = train.get(torch.arange(2))
    rows = []
    hook = est.net.unet.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    try:
        est.posterior(y, m, t).sample(PASS_VALUES // 8, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert max(rows) == PASS_VALUES // 8 and len(rows) % 2 == 0  # 2 windows: two passes of half the samples each


def test_bad_input_is_a_clear_error(tiny, rejects_bad_windows):
    task, train, _, est = tiny
    x, y, m, t = train.get(torch.arange(4))
    rejects_bad_windows(PosteriorScore(task, **SMALL), est, y, m, t)
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
    assert all(map(math.isfinite, hist["train_loss"]))
    x, y, m, t = data.get(torch.arange(2))
    s = est.posterior(y, m, t).sample(3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 2, 2, 32, 32) and torch.isfinite(s).all()


def test_config_file_matches_the_code():
    cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "score.yaml")
    assert set(cfg["estimator"]) == set(PosteriorScore.defaults) | {"seed"}
    import inspect
    assert set(cfg["fit"]) <= set(inspect.signature(Estimator.fit).parameters)


@pytest.fixture(scope="module")
def lg():
    """PosteriorScore trained on the linear-Gaussian task on a small budget (about a minute on 2 cores)."""
    task = sbida.tasks.get("linear-gaussian")
    train, val, test = task.simulate(progress=False, n_trajectories=256).split(0.8, 0.1, 0.1)
    est = PosteriorScore(task, **MEDIUM)
    hist = est.fit(train, val, epochs=8, batch_size=256, lr=2e-3, seed=0, progress=False)
    x, y, m, t = test.get(torch.arange(0, len(test), len(test) // 24)[:24])
    mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, test.window.offsets(),
                                               every=test.meta["every"])
    s = est.posterior(y, m, t).sample(100, generator=torch.Generator().manual_seed(0))
    return hist, x, mean, cov, s


@pytest.mark.slow
def test_linear_gaussian_posterior_is_informed_and_calibrated_at_a_small_budget(lg):
    """What 8 small epochs reach: a posterior mean within 30 % of the exact posterior's RMSE (the prior mean is about
    twice as far), calibrated marginal and joint (distance) coverage."""
    hist, x, mean, cov, s = lg
    assert hist["val_loss"][-1] < hist["val_loss"][0]
    rmse = float((s.mean(0).double() - x).pow(2).mean().sqrt())
    exact = float((mean - x).pow(2).mean().sqrt())
    prior = float(x.pow(2).mean().sqrt())
    assert exact < 0.6 * prior, (exact, prior)  # the observations are informative
    assert rmse < 1.3 * exact, (rmse, exact)
    res = sbida.diagnostics.expected_coverage(s, x.float())
    assert res.marginal_ece <= 0.05 and res.ece <= 0.08, (res.marginal_ece, res.ece)


@pytest.mark.slow
@pytest.mark.xfail(reason="targets of the full budget, not reached at a test budget: 8 small epochs give a "
                          "calibrated but too broad posterior; the default network on 45k windows (256 test windows "
                          "x 100 samples, C2ST on 8 windows x 400) reaches RMSE 1.11x exact, variance 1.19x, ECE "
                          "0.024, AUC 0.90 after 8 epochs, and with loss_rho=2 RMSE 1.04x, variance 1.12x, ECE "
                          "0.045, AUC 0.74 after 14 epochs; 4096 trajectories (180k windows) x 29 epochs (30 min on "
                          "one thread) meet every target: RMSE 1.007x, ECE 0.026, AUC 0.565 (benchmarks/"
                          "linear_gaussian.py)", strict=False)
def test_linear_gaussian_posterior_meets_the_targets(lg):
    hist, x, mean, cov, s = lg
    rmse = float((s.mean(0).double() - x).pow(2).mean().sqrt())
    exact = float((mean - x).pow(2).mean().sqrt())
    res = sbida.diagnostics.expected_coverage(s, x.float())
    ref = torch.distributions.MultivariateNormal(mean[:4], cov[:4]).sample((100,)).float()
    auc = sum(sbida.diagnostics.c2st(s[:, b], ref[:, b]) for b in range(4)) / 4
    assert rmse <= 1.15 * exact and res.ece <= 0.05 and auc <= 0.65, (rmse / exact, res.ece, auc)
