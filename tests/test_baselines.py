"""Classical baselines: exactness on the linear-Gaussian task, skill on Lorenz-96, the cycled ETKF reference, errors."""

import math

import pytest
import torch

import sbida
from sbida.baselines import OI, Climatology, CycledETKF, EnKS, FourDVar, batched_lbfgs
from sbida.data import simulate_windows
from sbida.observations import RandomMask, Stations
from sbida.simulators import Lorenz96, Simulator


def exact_climatology(sim, steps=64):
    """The exact prior N(0, A^s Sigma_0 A^sT) of the linear-Gaussian task at each step."""
    times = torch.arange(steps, dtype=torch.float64) * sim.dt
    covs = torch.stack([sim.prior(s)[1] for s in range(steps)])
    return Climatology(times, torch.zeros(steps, sim.K, dtype=torch.float64), covs)


@pytest.fixture(scope="module", params=["end", "centre"])
def linear(request):
    task = sbida.tasks.get("linear-gaussian", **{"window.align": request.param})
    data = task.simulate(progress=False, n_trajectories=16, n_states=40)
    x, y, m, t = data.get(torch.arange(0, len(data), 23)[:24])
    mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, task.window.offsets())
    return task, (x, y, m, t), mean, cov, exact_climatology(task.simulator)


def test_enks_is_exact_on_linear_gaussian(linear):
    """ETKF/EnKS with an initial ensemble of the prior's exact moments gives the Kalman smoother exactly."""
    task, (x, y, m, t), mean, cov, clim = linear
    enks = EnKS.from_task(task, members=64, init="gaussian", moment_match=True, climatology=clim)
    post = enks.posterior(y, m, t, generator=torch.Generator().manual_seed(0))
    A = post.members - post.mean()
    ecov = torch.einsum("mbi,mbj->bij", A, A) / (post.size - 1)
    assert (post.mean() - mean).abs().max() < 1e-8
    assert (ecov - cov).abs().max() < 1e-8


def test_random_ensemble_approaches_exact_posterior(linear):
    """Without moment matching the error is the initial ensemble's sampling error: it shrinks with the size."""
    task, (x, y, m, t), mean, cov, clim = linear
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    err = {}
    for M in (20, 100):
        post = EnKS.from_task(task, members=M, init="gaussian", climatology=clim).posterior(
            y, m, t, generator=torch.Generator().manual_seed(1))
        err[M] = (((post.mean() - mean) / sd).pow(2).mean().sqrt().item(), (post.std() / sd - 1).abs().mean().item())
    # measured: M=100 -> 0.22 posterior sd in the mean, 2 % in the sd; M=20 (< D=32, rank deficient) -> 0.9, 12 %
    assert err[100][0] < 0.35 and err[100][1] < 0.04
    assert err[20][0] > 2 * err[100][0] and err[20][1] > 2 * err[100][1]


def test_fourdvar_is_exact_on_linear_gaussian(linear):
    task, (x, y, m, t), mean, cov, clim = linear
    fv = FourDVar.from_task(task, climatology=clim, tol=1e-7)
    post = fv.posterior(y, m, t)
    assert post.info["max_grad"] < 1e-5
    assert (post.mean() - mean).abs().max() < 1e-6
    assert (post.covariance() - cov).abs().max() < 1e-8


def test_oi_is_gaussian_conditioning_on_the_target_time(linear):
    task, (x, y, m, t), mean, cov, clim = linear
    j = task.window.offsets().index(0)
    ref_mean, ref_cov = task.simulator.exact_posterior(y[:, j:j + 1], m[:, j:j + 1], t, task.observation, [0])
    post = OI.from_task(task, climatology=clim).posterior(y, m, t)
    assert torch.allclose(post.mean(), ref_mean, atol=1e-9)
    assert torch.allclose(post.covariance(), ref_cov, atol=1e-9)
    # the window carries more information than its target time alone
    assert (mean - x).pow(2).mean() < 0.5 * (ref_mean - x).pow(2).mean()


def test_climatology_follows_the_transient():
    task = sbida.tasks.get("lorenz96")
    data = task.simulate(progress=False, n_trajectories=400, n_states=120)
    clim = Climatology.fit(data)
    assert clim.index(torch.tensor([0.0])).item() == 0
    mu0, C0 = clim.moments(torch.tensor([0.0]))
    mu1, C1 = clim.moments(torch.tensor([5.9]))
    # t = 0: x0 ~ N(0, I); later: the attractor (mean ~2.3, variance ~13)
    assert mu0.abs().max() < 0.5 and (C0[0].diagonal() - 1).abs().mean() < 0.15
    assert 1.5 < mu1.mean() < 3.0 and 9 < C1[0].diagonal().mean() < 17
    s = clim.sample(torch.tensor([0.0, 5.9]), 100, torch.Generator().manual_seed(0), kind="gaussian",
                    moment_match=True, dtype=torch.float64)
    A = s - s.mean(0)
    assert torch.allclose(s.mean(0)[1], mu1[0], atol=1e-9)
    assert torch.allclose(A[:, 1].T @ A[:, 1] / 99, C1[0], atol=1e-8)


def test_climatology_pools_the_states_of_data_on_the_attractor():
    """A spin-up (``burn_in > 0``) makes the data stationary: one bin of every state by default, as many as
    ``stationary=False`` would spread over bins of ``10 D`` states; empirical draws of a small bin are distinct."""
    task = sbida.tasks.get("lorenz96-sparse", K=8, n_trajectories=6, n_states=64)
    data = task.simulate(progress=False)
    assert data.meta["burn_in"] > 0
    pooled, binned = Climatology.fit(data), Climatology.fit(data, stationary=False)
    assert len(pooled.times) == 1 and pooled.samples.shape[1] == 6 * 64
    assert len(binned.times) == math.ceil(64 / math.ceil(80 / 6)) and binned.samples.shape[1] == 6 * 14
    assert len(Climatology.fit(data, width=8).times) == 8  # an explicit width wins
    x = data.states.reshape(-1, 8).double()
    assert torch.allclose(pooled.moments(torch.tensor([3.0]))[1][0], x.T.cov() + 1e-6 * x.var(0).mean() * torch.eye(8))
    draws = binned.sample(torch.tensor([0.2, 0.4]), 84, torch.Generator().manual_seed(0))  # a whole bin of 84
    for b in range(2):
        assert draws[:, b].unique(dim=0).shape[0] == 84


def test_fourdvar_analysis_alone_is_the_mean_of_its_laplace_posterior(linear):
    """``uncertainty="none"``: the same L-BFGS analysis as the Gaussian posterior's mean, without its covariance."""
    task, (x, y, m, t), mean, cov, clim = linear
    fv = FourDVar.from_task(task, climatology=clim, tol=1e-7)
    point = fv.posterior(y, m, t, uncertainty="none")
    assert isinstance(point, sbida.posterior.PointPosterior) and point.info["max_grad"] < 1e-5
    assert torch.equal(point.mean(), fv.posterior(y, m, t).mean())
    assert (point.mean().double() - mean).abs().max() < 1e-4 and point.std().eq(0).all()
    with pytest.raises(ValueError, match="uncertainty must be"):
        fv.posterior(y, m, t, uncertainty="ensemble")


@pytest.mark.slow
def test_enks_and_fourdvar_beat_oi_and_climatology_on_lorenz96():
    torch.set_num_threads(1)
    task = sbida.tasks.get("lorenz96")
    data = task.simulate(progress=False, n_trajectories=120, n_states=160)
    train, val, test = data.split(0.7, 0.1, 0.2)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:160]
    x, y, m, t = test.get(idx)

    def rmse(p):
        return (p.mean() - x).pow(2).mean().sqrt().item()

    oi = OI.from_task(task).fit(train)
    clim_rmse = (oi.climatology.moments(t)[0].to(x.dtype) - x).pow(2).mean().sqrt().item()
    oi_rmse = rmse(oi.posterior(y, m, t))
    enks = EnKS.from_task(task, members=100, climatology=oi.climatology)
    info = enks.tune(val, grid=(1.0, 1.02, 1.05, 1.1), n_windows=64)
    enks_rmse = rmse(enks.posterior(y, m, t, generator=torch.Generator().manual_seed(0)))
    fv = FourDVar.from_task(task, climatology=oi.climatology, max_iter=150)
    fv_rmse = rmse(fv.posterior(y, m, t))
    assert 3.2 < clim_rmse < 4.2
    assert oi_rmse < clim_rmse
    assert enks_rmse < oi_rmse - 0.15, (enks_rmse, oi_rmse, info)
    assert fv_rmse < oi_rmse - 0.1, (fv_rmse, oi_rmse)


def test_tune_records_the_inflation():
    task = sbida.tasks.get("lorenz96", K=16)
    data = task.simulate(progress=False, n_trajectories=40, n_states=80)
    train, val = data.split(0.8, 0.2)
    enks = EnKS.from_task(task, members=20).fit(train)
    grid = (1.0, 1.1, 1.3, 3.0)  # (1.5 blows up on some windows: spread 19-146 by the seed of the ensembles)
    info = enks.tune(val, grid=grid, n_windows=32)
    assert info["inflation"] == enks.inflation == grid[min(range(4), key=lambda i: info["rmse"][i])]
    assert info["members"] == 20 and len(info["rmse"]) == len(info["spread"]) == 4
    assert info["inflation"] != 3.0  # tripling the anomalies at every step is never best (or blows up: nan)
    assert info["spread"][2] > info["spread"][1] > info["spread"][0]  # inflation widens the ensemble
    x, y, m, t = val.get(torch.arange(5))
    post = enks.posterior(y, m, t)
    assert post.info["inflation"] == info["inflation"] and post.info["tuning"]["grid"] == list(grid)
    assert post.sample(7).shape == (7, 5, 16)


@pytest.mark.slow
def test_cycled_etkf_matches_published_lorenz96_figure():
    """K=40, F=8, full observation every 0.05, sigma=1, 40 members: analysis RMSE ~0.18 (short run here)."""
    torch.set_num_threads(1)
    sim = Lorenz96(K=40, F=8.0, dt=0.05)
    obs = RandomMask(p_missing=0.0, sigma=1.0)
    truth = simulate_windows(sim, obs, 1, n_trajectories=2, states=600, burn_in=2000, seed=3, progress=False)
    pool = simulate_windows(sim, obs, 1, n_trajectories=32, states=32, burn_in=2000, seed=4, progress=False)
    etkf = CycledETKF(sim, obs, members=40, inflation=1.02).fit(pool)
    mean, std = etkf.run(truth.y, truth.mask, generator=torch.Generator().manual_seed(0), progress=False)
    rmse = (mean - truth.states).pow(2).mean(-1).sqrt()[:, 150:].mean().item()
    spread = std.pow(2).mean(-1).sqrt()[:, 150:].mean().item()
    clim_rmse = (truth.states - truth.states.mean((0, 1))).pow(2).mean().sqrt().item()
    assert rmse < 0.25 and rmse < 0.1 * clim_rmse and 3.0 < clim_rmse < 4.5
    assert 0.5 < spread / rmse < 2.0


def test_large_localization_radius_is_the_global_analysis():
    sim, obs = Lorenz96(K=12), RandomMask(0.5, 1.0)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(10, 3, 12, generator=g, dtype=torch.float64)
    y = torch.randn(3, 12, generator=g, dtype=torch.float64)
    m = torch.rand(3, 12, generator=g) > 0.5
    glob = CycledETKF(sim, obs, members=10).analysis(E, y, m, 1.1)[0]
    wide = CycledETKF(sim, obs, members=10, localization=1e5).analysis(E, y, m, 1.1)[0]
    narrow = CycledETKF(sim, obs, members=10, localization=1.0).analysis(E, y, m, 1.1)[0]
    assert (glob - wide).abs().max() < 1e-6
    assert (glob - narrow).abs().max() > 1e-2
    # an unobserved cell far from every observation keeps its (inflated) forecast under narrow localization
    m2 = torch.zeros(3, 12, dtype=torch.bool)
    m2[:, 0] = True
    out = CycledETKF(sim, obs, members=10, localization=1.0).analysis(E, y, m2, 1.0)[0]
    assert torch.allclose(out[:, :, 6], E[:, :, 6], atol=1e-12)


def test_batched_lbfgs_solves_independent_quadratics():
    """To a gradient of 1e-10, far below the square root of the cost's round-off (3e-8): there the Armijo test
    compares noise, and before the approximate Wolfe test three of the six problems took 500 iterations of tiny steps
    (10 217 evaluations) without converging; now 29 iterations and 38 evaluations."""
    g = torch.Generator().manual_seed(0)
    B, D = 6, 10
    Q = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    A = Q @ Q.mT + torch.logspace(-1, 2, B, dtype=torch.float64)[:, None, None] * torch.eye(D, dtype=torch.float64)
    b = torch.randn(B, D, generator=g, dtype=torch.float64)

    calls = []

    def fun(v):
        calls.append(1)
        Av = (A @ v[..., None]).squeeze(-1)
        return 0.5 * (v * Av).sum(-1) - (b * v).sum(-1), Av - b

    v, it = batched_lbfgs(fun, torch.zeros(B, D, dtype=torch.float64), max_iter=500, tol=1e-10)
    assert torch.allclose(v, torch.linalg.solve(A, b), atol=1e-8)
    assert it < 60 and len(calls) < 120, (it, len(calls))


def test_bad_input():
    task = sbida.tasks.get("lorenz96", K=16)
    data = task.simulate(progress=False, n_trajectories=8, n_states=30)
    x, y, m, t = data.get(torch.arange(4))
    enks = EnKS.from_task(task, members=10)
    with pytest.raises(ValueError, match="fit"):
        enks.posterior(y, m, t)
    enks.fit(data)
    with pytest.raises(ValueError, match="y must be"):
        enks.posterior(y[:, :3], m[:, :3], t)
    with pytest.raises(ValueError, match="mask must"):
        enks.posterior(y, m[..., :2], t)
    with pytest.raises(ValueError, match="t must"):
        enks.posterior(y, m, t[:2])
    bad = y.clone()
    bad[m] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        enks.posterior(bad, m, t)
    empty = m.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="empty mask"):
        FourDVar.from_task(task).fit(data).posterior(y, empty, t)
    with pytest.raises(ValueError, match="inflation"):
        EnKS.from_task(task, inflation=0.9)
    with pytest.raises(ValueError, match="members"):
        EnKS.from_task(task, members=1)
    with pytest.raises(ValueError, match="grid"):
        enks.tune(data, grid=(0.5,))
    with pytest.raises(ValueError, match="offsets"):
        OI(task.simulator, task.observation, [-2, -1])
    with pytest.raises(ValueError, match="every"):
        EnKS(task.simulator, task.observation, task.window.offsets(), every=2).fit(data)
    with pytest.raises(ValueError, match="observed state"):  # vorticity integrated, velocity observed
        EnKS.from_task(sbida.tasks.get("kolmogorov"))
    field = Stations(every=2, kernel_width=0.0)

    class Field(Simulator):
        state_shape, dt = (1, 4, 4), 1.0

        def step(self, x):
            return x

    with pytest.raises(ValueError, match="1-D"):
        EnKS(Field(), field, [0], localization=2.0)
    with pytest.raises(ValueError, match="unknown baseline"):
        sbida.baselines.get("3dvar", task)
    two = sbida.tasks.get("lorenz96-two-scale")
    assert OI.from_task(two).state_shape == (36,)  # the truncated model


def test_climatology_and_interpolation_reference_points():
    """The climatological prior ignores the observations; the interpolation returns a noise-free observed field
    where it is dense and the climatological mean far from any observation."""
    task = sbida.tasks.get("lorenz96-sparse", n_trajectories=16)
    train, test = task.simulate(progress=False).split(0.75, 0.25)
    x, y, m, t = test.get(torch.arange(0, len(test), 50))
    clim = sbida.baselines.get("climatology", task).fit(train)
    a, b = clim.posterior(y, m, t), clim.posterior(torch.randn_like(y), m, t)
    assert torch.equal(a.mean(), b.mean()) and torch.allclose(a.mean(), clim.climatology.moments(t)[0].float())
    interp = sbida.baselines.get("interpolation", task, width=0.2).fit(train)
    j = interp.target_index
    obs = m[:, j]
    est = interp.posterior(y, m, t).mean()
    assert torch.allclose(est[obs], y[:, j][obs], atol=0.05)  # a narrow kernel returns the observation itself
    empty = m.clone()
    empty[:, j] = False
    empty[:, j, 0] = True  # one observed cell at the target time: the opposite cell falls back to the mean
    far = interp.posterior(y, empty, t).mean()[:, 20]
    assert torch.allclose(far, clim.climatology.moments(t)[0][:, 20].float(), atol=1e-3)
    with pytest.raises(ValueError, match="width"):
        sbida.baselines.get("interpolation", task, width=-1.0)


def test_baselines_that_never_integrate_estimate_a_simulators_output():
    """On the Kolmogorov flow (vorticity state 64x64, velocity output 2x32x32) the climatology, the interpolation and
    OI estimate the observed velocity; OI beats the climatology there, and the integrating baselines refuse."""
    task = sbida.tasks.get("kolmogorov", n_trajectories=4, n_states=24, burn_in=2)
    data = task.simulate(progress=False)
    x, y, m, t = data.get(torch.tensor([5, 30, 55]))
    rmse = {}
    for name in ("climatology", "interpolation", "oi"):
        b = sbida.baselines.get(name, task).fit(data)
        assert b.state_shape == (2, 32, 32)
        mean = b.posterior(y, m, t).mean()
        assert mean.shape == x.shape and torch.isfinite(mean).all()
        rmse[name] = float((mean - x).pow(2).mean().sqrt())
    assert rmse["oi"] < 0.6 * rmse["climatology"]
    for name in ("enks", "fourdvar"):
        with pytest.raises(ValueError, match="integrates the observed state"):
            sbida.baselines.get(name, task)
