"""CODA: its windows, loss, closure, Laplace covariance and forecasts, and the trained estimator."""


import pytest
import torch

import sbida
from sbida.estimators.coda_parts import (
    CODAWindows,
    LocalClosure,
    coda_loss,
    forecast_rmse,
    gauss_newton_posterior,
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
    offsets = data.window.offsets()  # -12 .. 12
    assert int(view.targets[0]) == 12 and int(view.targets[-1]) == 160 - 1 - 5 - 12
    i = torch.tensor([0, len(view.targets) + 3, len(view) - 1])
    yw, mw, ys, ms, yr, mr, t, tw = view.get(i)
    assert yw.shape == (3, 25, 40) and yr.shape == (3, 6, 40) and t.shape == (3,)
    n, s = 1, int(view.targets[3])
    assert torch.equal(yw[1], data.y[n, s + offsets[0]: s + offsets[-1] + 1])
    assert torch.equal(ys[1], data.y[n, s + 5 + offsets[0]: s + 5 + offsets[-1] + 1])
    assert torch.equal(yr[1], data.y[n, s: s + 6]) and torch.equal(mr[1], data.mask[n, s: s + 6])
    assert float(tw[1] - t[1]) == pytest.approx(5 * 0.01)
    with pytest.raises(ValueError, match="too short"):
        CODAWindows(data, rollout=150)
    with pytest.raises(ValueError, match="rollout"):
        CODAWindows(data, rollout=0)


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
    C = gauss_newton_posterior(sim, obs, x, mask, [0, 1, 3], 1, prior)
    ref = Lorenz96(8, dt=0.05, backend="reference")
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda z: ref.rollout(z[None], 3, check=False)[0, [0, 1, 3]], x[b])
        J = J * mask[b, :, :, None].double()  # (3, 8, 8): observed rows only
        P = torch.einsum("lmd,lme->de", J, J) / 0.49 + torch.eye(8, dtype=torch.float64) / 4.0
        assert torch.allclose(C[b], torch.linalg.inv(P), atol=1e-10)


def test_forecast_rmse_is_zero_from_the_truth_and_grows_from_an_error():
    sim = Lorenz96(40, dt=0.05)
    x0 = sim.rollout(sim.initial_state(8, torch.Generator().manual_seed(1)), 200, every=200)[:, -1]
    truth = sim.rollout(x0, 20)
    assert forecast_rmse(sim, x0, truth).max() < 1e-5
    err = forecast_rmse(sim, x0 + 0.01 * torch.randn_like(x0), truth)
    assert err[0] < 0.02 and err[-1] > 5 * err[0]  # chaos: small errors grow
