"""CODA: its windows, loss, closure, Laplace covariance and forecasts, and the trained estimator."""


import copy

import pytest
import torch

import sbida
from sbida.estimators import CODA
from sbida.estimators.coda_parts import (
    CODAWindows,
    LocalClosure,
    coda_loss,
    forecast_rmse,
    gauss_newton_posterior,
    observation_jacobians,
    time_reversed,
)
from sbida.observations import RandomMask
from sbida.simulators import Lorenz96


@pytest.fixture(scope="module")
def sparse():
    """A small lorenz96-sparse set: 24 trajectories of 160 states (K=40, dt=0.01, 75 % missing, sigma=1)."""
    task = sbida.tasks.get("lorenz96-sparse", n_trajectories=24, n_states=160)
    return task, task.simulate(progress=False)


def test_windows_pick_the_right_observations(sparse):
    _, data = sparse
    view = CODAWindows(data, rollout=5)
    offsets = data.window.offsets()  # -25 .. 25
    assert int(view.targets[0]) == 25 and int(view.targets[-1]) == 160 - 1 - 5 - 25
    i = torch.tensor([0, len(view.targets) + 3, len(view) - 1])
    yw, mw, ys, ms, yr, mr, t, tw = view.get(i)
    assert yw.shape == (3, 51, 40) and yr.shape == (3, 6, 40) and t.shape == (3,)
    n, s = 1, int(view.targets[3])
    assert torch.equal(yw[1], data.y[n, s + offsets[0]: s + offsets[-1] + 1])
    assert torch.equal(ys[1], data.y[n, s + 5 + offsets[0]: s + 5 + offsets[-1] + 1])
    assert torch.equal(yr[1], data.y[n, s: s + 6]) and torch.equal(mr[1], data.mask[n, s: s + 6])
    assert float(tw[1] - t[1]) == pytest.approx(5 * 0.01)
    with pytest.raises(ValueError, match="too short"):
        CODAWindows(data, rollout=150)
    with pytest.raises(ValueError, match="rollout"):
        CODAWindows(data, rollout=0)


def test_without_the_mask_input_the_network_sees_only_the_observed_values(sparse):
    """``mask_input=False`` (the mask ablation): the analysis depends on the observed values alone, not on where the
    mask is nor on what lies under it; with the mask input (the default) it depends on the mask."""
    task, data = sparse
    _, y, m, _ = data.get(torch.arange(4))
    torch.manual_seed(0)
    est = CODA(task, channels=[8, 16], rollout=5, mask_input=False)
    est.fit_standardization(data)
    noisy = torch.where(m, y, torch.randn_like(y))  # other values under the mask
    with torch.no_grad():
        a = est.analysis(y, m)
        assert torch.allclose(a, est.analysis(noisy, m))
        assert torch.allclose(a, est.analysis(torch.where(m, y, torch.zeros_like(y)), torch.ones_like(m)))
        est.hparams["mask_input"] = True
        assert not torch.allclose(a, est.analysis(y, m)) and not torch.allclose(est.analysis(y, m),
                                                                                 est.analysis(noisy, m))


def test_loss_at_the_truth_is_the_noise_level(sparse):
    """At the true states the data term is E[sum m eps^2] / D = (w+1) (1 - p_missing) and the model term is 0."""
    task, data = sparse
    view = CODAWindows(data, rollout=4)
    idx = torch.arange(len(view))
    n, s = idx // len(view.targets), view.targets[idx % len(view.targets)]
    x_t, x_tw = data.states[n, s], data.states[n, s + 4]
    *_, yr, mr, _, _ = view.get(idx)
    with torch.no_grad():
        loss, terms = coda_loss(x_t, x_tw, yr, mr, task.simulator, task.observation, every=1, alpha=1.0)
    assert terms["model"] < 1e-8
    assert terms["data"] == pytest.approx(5 * 0.25, rel=0.03)
    # a perturbed start costs more in both terms
    with torch.no_grad():
        _, bad = coda_loss(x_t + 0.5 * torch.randn_like(x_t), x_tw, yr, mr, task.simulator, task.observation, 1, 1.0)
    assert bad["data"] > terms["data"] + 0.2 and bad["model"] > 0.01


def test_local_closure_starts_at_zero_and_is_translation_equivariant():
    c = LocalClosure(hidden=8, layers=2, stencil=3)
    x = torch.randn(5, 12)
    assert torch.equal(c(x), torch.zeros_like(x))
    torch.nn.init.normal_(c.net[-1].weight)
    assert torch.allclose(c(torch.roll(x, 4, -1)), torch.roll(c(x), 4, -1), atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        LocalClosure(stencil=2)


def test_gauss_newton_covariance_matches_autograd():
    torch.manual_seed(0)
    sim = Lorenz96(8, dt=0.05)
    obs = RandomMask(0.5, sigma=0.7).bind((8,))
    x = 2 * torch.randn(3, 8, dtype=torch.float64)
    mask = torch.rand(3, 3, 8) > 0.5
    prior = torch.full((8,), 4.0, dtype=torch.float64)
    L = gauss_newton_posterior(sim, obs, x, mask, [0, 1, 3], 1, prior)
    assert torch.equal(L, L.tril()) and (L.diagonal(dim1=-2, dim2=-1) > 0).all()
    C = L @ L.mT
    ref = Lorenz96(8, dt=0.05, backend="reference")
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda z: ref.rollout(z[None], 3, check=False)[0, [0, 1, 3]], x[b])
        J = J * mask[b, :, :, None].double()  # (3, 8, 8): observed rows only
        P = torch.einsum("lmd,lme->de", J, J) / 0.49 + torch.eye(8, dtype=torch.float64) / 4.0
        assert torch.allclose(C[b], torch.linalg.inv(P), atol=1e-10)


def test_gauss_newton_factor_of_a_long_window_holds_in_float32():
    """Over 25 saved states of Lorenz-96 K=40 the Gauss-Newton precision's condition number passes 1e8, beyond
    float32 (1 / eps = 8e6), where its Cholesky factorization can fail; the factor is computed in float64 and
    returned in float32."""
    task = sbida.tasks.get("lorenz96", length=25, n_trajectories=4, n_states=128, seed=0)
    x = task.simulate(progress=False).get(torch.arange(0, 400, 50))[0]  # (8, 40) float32
    obs, lags = task.observation, list(range(-24, 1))
    J = observation_jacobians(task.simulator, obs, x.double(), lags, 1)  # (8, 25, M, 40)
    mask = torch.ones(J.shape[:3], dtype=torch.bool)
    J = J.reshape(len(x), -1, 40)
    P = J.mT @ J / obs.sigma**2 + torch.eye(40, dtype=torch.float64) / 13.0
    assert torch.linalg.cond(P).max() > 1e8
    L = gauss_newton_posterior(task.simulator, obs, x, mask, lags, 1, torch.full((40,), 13.0))
    assert L.dtype == torch.float32 and torch.isfinite(L).all() and (L.diagonal(dim1=-2, dim2=-1) > 0).all()
    # L^T P L = I: the factor whitens the float64 precision, up to the float32 rounding of L
    eye = torch.eye(40, dtype=torch.float64).expand(len(x), 40, 40)
    err = (L.double().mT @ P @ L.double() - eye).abs().max()
    assert err < 1e-3, err


def test_backward_jacobians_invert_the_forward_ones():
    """Past observations enter the Laplace covariance through the time-reversed simulator: its Jacobian over two
    saved states is the inverse of the forward one (up to RK4's error), and it leaves the original untouched."""
    sim = Lorenz96(8, dt=0.05, backend="reference")
    x = sim.rollout(sim.initial_state(2, torch.Generator().manual_seed(0)).double(), 100, every=100)[:, -1]
    obs = RandomMask(0.0, sigma=1.0).bind((8,))
    back = time_reversed(sim)
    assert back.dt == -0.05 and sim.dt == 0.05
    J_back = observation_jacobians(sim, obs, x, [-2], 1)[:, 0]  # d x_{t-2} / d x_t (all observed)
    x_prev = back.rollout(x, 2, check=False)[:, -1]
    for b in range(2):
        J_fwd = torch.autograd.functional.jacobian(lambda z: sim.rollout(z[None], 2, check=False)[0, -1], x_prev[b])
        assert torch.allclose(J_back[b] @ J_fwd, torch.eye(8, dtype=torch.float64), atol=1e-3)
    with pytest.raises(ValueError, match="no time step"):
        time_reversed(torch.nn.Identity())


def test_jacobians_of_a_tuned_simulator_keep_no_autograd_graph():
    """With a trainable forcing (CODA's parameter tuning) and grad mode on, the Jacobians are those of the fixed
    simulator and carry no graph: a kept graph costs some 20 MB per window over 51 states of K=40."""
    fixed = Lorenz96(8, dt=0.05)
    tuned = copy.deepcopy(fixed)
    del tuned.F
    tuned.register_parameter("F", torch.nn.Parameter(torch.tensor(8.0, dtype=torch.float64)))
    obs = RandomMask(0.0, sigma=1.0).bind((8,))
    x = fixed.rollout(fixed.initial_state(3, torch.Generator().manual_seed(0)).double(), 50, every=50)[:, -1]
    assert torch.is_grad_enabled()
    J = observation_jacobians(tuned, obs, x, [-1, 0, 3], 1)
    assert J.grad_fn is None and not J.requires_grad
    assert torch.equal(J, observation_jacobians(fixed, obs, x, [-1, 0, 3], 1))
    L = gauss_newton_posterior(tuned, obs, x, torch.ones(3, 3, 8, dtype=torch.bool), [-1, 0, 3], 1, torch.ones(8))
    assert L.grad_fn is None and torch.isfinite(L).all()


def test_forecast_rmse_is_zero_from_the_truth_and_grows_from_an_error():
    sim = Lorenz96(40, dt=0.05)
    x0 = sim.rollout(sim.initial_state(8, torch.Generator().manual_seed(1)), 200, every=200)[:, -1]
    truth = sim.rollout(x0, 20)
    assert forecast_rmse(sim, x0, truth).max() < 1e-5
    err = forecast_rmse(sim, x0 + 0.01 * torch.randn_like(x0), truth)
    assert err[0] < 0.02 and err[-1] > 5 * err[0]  # chaos: small errors grow


# -------------------------------------------------------------------------------- trained estimator


@pytest.fixture(scope="module")
def trained():
    """CODA on lorenz96-sparse with F started at 6 instead of 8 (tuned jointly): 400 steps of 32 windows."""
    task = sbida.tasks.get("lorenz96-sparse", n_trajectories=32, n_states=192)
    train, test = task.simulate(progress=False).split(0.8, 0.2)
    est = CODA(task, channels=[16, 32, 64], rollout=10, alpha=1.0, tune={"F": 6.0}, param_lr=0.05, seed=0)
    est.fit(train, None, epochs=1, batch_size=32, lr=3e-3, steps_per_epoch=400, progress=False)
    return task, train, test, est


def test_forcing_is_tuned_from_observations(trained):
    *_, est = trained
    F = est.parameter_history["F"]
    assert len(F) == 400 and F[0] == pytest.approx(6.0, abs=0.01)
    assert abs(F[-1] - 8.0) < 0.25  # joint training alone: pulled low by the analyses' errors
    assert abs(float(est.dynamics.F.detach()) - F[-1]) < 0.01


def test_refined_forcing_is_within_a_tenth(trained):
    """4D-Var over 256 windows with free initial states removes the errors-in-variables bias of joint training."""
    task, train, _, est = trained
    est = copy.deepcopy(est)
    joint = est.parameter_history["F"][-1]
    refined = est.refine_parameters(train, windows=256, rollout=50)["F"]
    assert abs(refined - 8.0) < 0.1 and abs(refined - 8.0) < abs(joint - 8.0)
    assert est.parameter_history["F"][-1] == refined == pytest.approx(float(est.dynamics.F.detach()))
    with pytest.raises(ValueError, match="no tuned parameters"):
        CODA(task, channels=[8, 16], rollout=5).refine_parameters(train)


def test_analysis_beats_oi_and_laplace_posterior(trained):
    task, train, test, est = trained
    x, y, m, t = test.get(torch.arange(0, len(test), 3))
    post = est.posterior(y, m, t)
    assert isinstance(post, sbida.posterior.GaussianPosterior) and post.mean().shape == x.shape
    rmse = float((post.mean() - x).pow(2).mean().sqrt())
    oi = sbida.baselines.OI.from_task(task).fit(train)
    rmse_oi = float((oi.posterior(y, m, t).mean() - x).pow(2).mean().sqrt())
    assert rmse < 0.95 < 0.5 * rmse_oi  # sigma = 1 and 75 % missing: the window beats the noise and OI by far
    std = post.std()
    assert torch.isfinite(std).all() and (std > 0).all() and float(std.mean()) < 1.0
    point = est.posterior(y, m, t, uncertainty="none")
    assert torch.equal(point.mean(), post.mean()) and torch.equal(point.std(), torch.zeros_like(x))


def test_laplace_scale_fitted_on_observations_calibrates_the_spread(trained):
    """The whole-window Gauss-Newton covariance, scaled by the factor estimated from the innovations after held-out
    windows (no true state used), has the spread of the analysis error; unscaled it is far too narrow. Training
    windows understate the factor."""
    task, train, test, est = trained
    assert float(est.laplace_scale) == 1.0  # fit() without val leaves it
    calib, held = test.split(0.5, 0.5, seed=1)
    x, y, m, t = held.get(torch.arange(0, len(held), 2))
    est = copy.deepcopy(est)
    scale = est.calibrate_laplace(calib)
    assert scale > 1.5 * est.calibrate_laplace(train)
    ratio = {}
    for s in (scale, 1.0):
        est.laplace_scale.fill_(s)
        post = est.posterior(y, m, t)
        ratio[s] = float(post.std().pow(2).mean().sqrt() / (post.mean() - x).pow(2).mean().sqrt())
    assert 0.85 < ratio[scale] < 1.15 and ratio[1.0] < 0.7, ratio


def test_save_and_load_give_the_same_analysis(trained, tmp_path):
    *_, test, est = trained
    _, y, m, t = test.get(torch.arange(8))
    path = est.save(tmp_path / "coda.pt")
    loaded = sbida.estimators.load(path)
    assert isinstance(loaded, CODA) and float(loaded.dynamics.F.detach()) == float(est.dynamics.F.detach())
    assert torch.equal(loaded.posterior(y, m, t).mean(), est.posterior(y, m, t).mean())


def test_bad_input(trained):
    task, *_, est = trained
    with pytest.raises(ValueError, match="uncertainty"):
        CODA(task, uncertainty="bootstrap")
    with pytest.raises(ValueError, match="no parameter"):
        CODA(task, tune={"G": 1.0})
    with pytest.raises(ValueError, match="divisible"):
        CODA(task, channels=[8, 8, 8, 8, 8])
    _, y, m, t = trained[2].get(torch.arange(4))
    with pytest.raises(ValueError, match="window of 51"):
        est.posterior(y[:, :10], m[:, :10], t)


@pytest.mark.slow
def test_learned_closure_improves_the_forecast():
    """Closure learned from sparse noisy slow observations of the two-scale model: the hybrid model's free
    forecast beats the truncated model's up to 2 time units, and B(x) has the sign of the mean coupling."""
    task = sbida.tasks.get("lorenz96-two-scale", n_trajectories=24, n_states=160)
    train = task.simulate(progress=False)
    est = CODA(task, channels=[16, 32, 64], rollout=10, alpha=1.0, closure={"hidden": 32, "layers": 2})
    est.fit(train, None, epochs=1, batch_size=32, lr=3e-3, steps_per_epoch=200, progress=False)
    two = task.simulator
    x0 = two.rollout(two.initial_state(16, torch.Generator().manual_seed(5)), 2000, every=2000)[:, -1]
    truth = two.rollout(x0, 400, every=2, output=True)  # (16, 201, 36): 2 time units at 0.01
    hybrid = forecast_rmse(est.dynamics, two.output(x0), truth, every=2)
    truncated = forecast_rmse(two.truncated(), two.output(x0), truth, every=2)
    for lead in (50, 100, 200):  # 0.5, 1 and 2 time units
        assert hybrid[lead] < 0.7 * truncated[lead]
    with torch.no_grad():
        b = est.dynamics.closure(torch.tensor([[-5.0, 0.0, 10.0]]))[0]
    assert b[0] > 0 > b[2]  # the mean coupling pushes X back towards ~0: positive for X < 0, negative for large X


def test_laplace_posterior_with_a_learned_closure():
    """The Laplace posterior and its calibration run the dynamics in float64: a closure's float32 weights are cast
    on a copy (they made both fail), and the closure gets no weight decay."""
    task = sbida.tasks.get("lorenz96-two-scale", n_trajectories=6, n_states=80)
    train, val = task.simulate(progress=False).split(0.5, 0.5)
    est = CODA(task, channels=[8], rollout=4, closure={"hidden": 8, "layers": 1})
    est.fit(train, val, epochs=1, batch_size=8, steps_per_epoch=2, progress=False)  # ends with calibrate_laplace
    assert 1e-3 <= float(est.laplace_scale) <= 1e3
    assert next(est.dynamics.closure.parameters()).dtype == torch.float32  # the model's own closure untouched
    _, y, m, t = val.get(torch.arange(3))
    post = est.posterior(y, m, t)
    assert post.sample(4).shape == (4, 3, *est.state_shape) and torch.isfinite(post.sample(4)).all()
    closure = {id(p) for p in est.dynamics.closure.parameters()}
    groups = [g for g in est.param_groups(1e-3, 1e-4) if {id(p) for p in g["params"]} == closure]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_config_file_matches_the_code():
    import inspect

    cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "coda.yaml")
    assert set(cfg["estimator"]) == set(CODA.defaults) | {"seed"}
    assert {k: v for k, v in cfg["estimator"].items() if k != "seed"} == CODA.defaults
    assert set(cfg["fit"]) <= set(inspect.signature(CODA.fit).parameters)
