r"""The pieces of CODA that do not depend on the training loop: windows, loss, closure, Laplace posterior, forecasts.

CODA (Combined Optimization of Dynamics and Assimilation) trains a DA network :math:`g` that maps an observation
window to the state at its target, :math:`\hat x_t = g(y_{t+o_1:t+o_T})`, on observations only, with the
weak-constraint 4D-Var loss

.. math::
    \mathcal{L} = \mathbb{E}_t\Big[\frac{1}{\sigma^2}\sum_{i=0}^{w} \big\|m_{t+i} \odot \big(y_{t+i} - H\,
    \mathcal{M}^{(i)}(\hat x_t)\big)\big\|^2 + \alpha\,\big\|\hat x_{t+w} - \mathcal{M}^{(w)}(\hat x_t)\big\|^2\Big],

where :math:`\mathcal{M}^{(i)}` is ``i`` saved-state steps of the (differentiable) simulator, :math:`m` the
observation mask and :math:`\hat x_{t+w} = g(y_{t+w+o_1:t+w+o_T})` the network's output for the window shifted by
``w``. ``alpha = 0`` is the hard-constraint variant. Both terms are divided by the number of state values so that
``alpha`` does not depend on the grid size.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ..data import WindowDataset
from ..observations import ObservationModel
from ..simulators.base import Simulator

__all__ = ["CODAWindows", "LocalClosure", "coda_loss", "gauss_newton_posterior", "observation_jacobians",
           "time_reversed", "forecast_rmse"]


class CODAWindows:
    """The CODA view of a :class:`~sbida.data.WindowDataset`: for a target ``s`` of trajectory ``n``, the window
    around ``s``, the window around ``s + w`` and the observations ``y_{s:s+w}`` of the rollout.

    Only the observations are used (never the true states). Targets are every saved state for which all three fit
    in the trajectory.

    Args:
        dataset: the windows (its ``window`` gives the offsets ``o_1..o_T``).
        rollout: ``w``, the rollout length in saved states (``>= 1``).
    """

    def __init__(self, dataset: WindowDataset, rollout: int):
        if int(rollout) != rollout or rollout < 1:
            raise ValueError(f"the rollout length must be an integer >= 1, got {rollout!r}")
        self.dataset, self.w = dataset, int(rollout)
        self.offsets = torch.tensor(dataset.window.offsets())
        S = dataset.states.shape[1]
        first = max(0, -int(self.offsets[0]))
        last = S - 1 - self.w - max(0, int(self.offsets[-1]))
        if last < first:
            raise ValueError(f"trajectories of {S} saved states are too short for windows with offsets "
                             f"{self.offsets[0]}..{self.offsets[-1]} and a rollout of {self.w} states")
        self.targets = torch.arange(first, last + 1)

    def __len__(self) -> int:
        return self.dataset.n_trajectories * len(self.targets)

    def get(self, index: Tensor) -> tuple[Tensor, ...]:
        """``(y, mask)`` of the window at ``s`` ``(B, T, *obs)``, of the window at ``s + w``, of the rollout
        ``(B, w + 1, *obs)``, and the times ``t_s`` and ``t_{s+w}`` ``(B,)``."""
        d = self.dataset
        index = torch.as_tensor(index, dtype=torch.long)
        n, s = index // len(self.targets), self.targets[index % len(self.targets)]
        win, shifted = s[:, None] + self.offsets, s[:, None] + self.w + self.offsets
        roll = s[:, None] + torch.arange(self.w + 1)
        N = n[:, None]
        dtype = d.states.dtype
        return (d.y[N, win], d.mask[N, win], d.y[N, shifted], d.mask[N, shifted], d.y[N, roll], d.mask[N, roll],
                d.times[s].to(dtype), d.times[s + self.w].to(dtype))


class LocalClosure(nn.Module):
    r"""A local closure :math:`B_\psi(x_k)`: the same small MLP at every node of a ring, ``(..., K) -> (..., K)``.

    With ``stencil = 1`` it is a function of :math:`x_k` alone (the CODA parametrization); with ``stencil = 3``
    or ``5`` it also sees the neighbours (circular).

    Args:
        hidden: width of the hidden layers.
        layers: number of hidden layers.
        stencil: odd number of nodes seen, centred on ``k``.
    """

    def __init__(self, hidden: int = 32, layers: int = 2, stencil: int = 1):
        super().__init__()
        if stencil < 1 or stencil % 2 == 0:
            raise ValueError(f"stencil must be a positive odd integer, got {stencil}")
        self.stencil = stencil
        mods: list[nn.Module] = [nn.Conv1d(1, hidden, stencil)]
        for _ in range(layers - 1):
            mods += [nn.SiLU(), nn.Conv1d(hidden, hidden, 1)]
        mods += [nn.SiLU(), nn.Conv1d(hidden, 1, 1)]
        self.net = nn.Sequential(*mods)
        nn.init.zeros_(self.net[-1].weight)  # start as the truncated model
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        z = x.reshape(-1, 1, shape[-1])
        p = self.stencil // 2
        if p:
            z = torch.cat((z[..., -p:], z, z[..., :p]), dim=-1)
        return self.net(z).reshape(shape)


def rollout_outputs(simulator: Simulator, x0: Tensor, saved_steps: int, every: int, check: bool = False) -> Tensor:
    """``M^{(i)}(x0)`` for ``i = 0..saved_steps`` as outputs: ``(B, *state) -> (B, saved_steps + 1, *output)``."""
    return simulator.rollout(x0, saved_steps * every, every=every, check=check, output=True)


def coda_loss(x_t: Tensor, x_tw: Tensor, y_roll: Tensor, m_roll: Tensor, simulator: Simulator,
              observation: ObservationModel, every: int = 1, alpha: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """The CODA loss of a batch (module docstring).

    The data term sums the squared residuals over the ``w + 1`` times, divided by ``sigma^2 D`` (the paper's sums:
    ``(w + 1)(1 - p_missing)`` at the truth); a masked mean instead (about 1 there) would weigh ``alpha`` that many
    times more. On ``lorenz96-sparse`` ``alpha = 6.5`` (that weighting) trained no better than 1
    (``benchmarks/RESULTS.md``).

    Args:
        x_t: network estimates at the targets, simulator states ``(B, *state)``.
        x_tw: network estimates ``w`` saved states later, as outputs ``(B, *output)`` (ignored if ``alpha == 0``).
        y_roll, m_roll: observations and mask at the ``w + 1`` saved states from the target ``(B, w + 1, *obs)``.
        simulator: the differentiable dynamics (gradients flow to its parameters and closure).
        observation: the observation model (its ``sigma`` weights the data term).
        every: simulator steps per saved state.
        alpha: weight of the model-consistency term.

    Returns:
        The scalar loss and its two terms as floats.
    """
    w = y_roll.shape[1] - 1
    traj = rollout_outputs(simulator, x_t, w, every)
    hx = observation.apply(traj)
    m = m_roll.to(hx.dtype)
    D = math.prod(traj.shape[2:])
    data = (m * (y_roll - hx) ** 2).sum(tuple(range(1, hx.dim()))) / (observation.sigma**2 * D)
    loss = data.mean()
    model = torch.zeros((), dtype=hx.dtype, device=hx.device)
    if alpha:
        model = ((x_tw - traj[:, -1]) ** 2).sum(tuple(range(1, x_tw.dim()))).mean() / D
        loss = loss + alpha * model
    return loss, {"data": float(data.detach().mean()), "model": float(model.detach())}


def time_reversed(simulator: Simulator) -> Simulator:
    """A copy of ``simulator`` that integrates backwards (its time step ``dt`` negated).

    Used over a few saved states only, to linearize the map from the target state to earlier ones: backward
    integration of dissipative or chaotic dynamics amplifies errors, so long backward rollouts are not meaningful.
    """
    if not hasattr(simulator, "dt"):
        raise ValueError(f"{type(simulator).__name__} has no time step dt to reverse")
    back = copy.deepcopy(simulator)
    back.dt = -float(simulator.dt)
    return back


def in_dtype(simulator: Simulator, dtype: torch.dtype) -> Simulator:
    """``simulator``, or a copy of it in ``dtype`` where it holds floating tensors of another (a learned closure's
    float32 weights cannot take the float64 states of the Laplace posterior)."""
    if all(t.dtype == dtype for t in (*simulator.parameters(), *simulator.buffers()) if t.is_floating_point()):
        return simulator
    return copy.deepcopy(simulator).to(dtype)


def observation_jacobians(simulator: Simulator, observation: ObservationModel, x: Tensor, lags: list[int],
                          every: int) -> Tensor:
    r"""Jacobians :math:`J_i = \partial\, H\,\mathcal{M}^{(l_i)}(x) / \partial x` of the noiseless observations
    ``lags[i]`` saved states from ``x``: forward rollouts for ``l >= 0``, rollouts of :func:`time_reversed` for
    ``l < 0`` (their Jacobian is the inverse of the forward one up to the integrator's error). Entries whose
    backward rollout is not finite are returned as NaN.

    Args:
        x: ``(B, D)`` flat 1-D states; lags: ``L`` lags in saved states; every: simulator steps per saved state.

    Returns:
        ``(B, L, M, D)`` with ``M`` the number of observed values per time; not differentiable (no autograd graph
        is kept, whatever the grad mode and the simulator's parameters).
    """
    fw, bw = max([0] + list(lags)), max([0] + [-lag for lag in lags])
    simulator = in_dtype(simulator, x.dtype)
    back = time_reversed(simulator) if bw else None

    def outputs(z: Tensor) -> Tensor:  # (D,) -> (L, M)
        ahead = simulator.rollout(z[None], fw * every, every=every, check=False, output=True)[0]
        behind = back.rollout(z[None], bw * every, every=every, check=False, output=True)[0] if back else None
        states = torch.stack([ahead[lag] if lag >= 0 else behind[-lag] for lag in lags])
        return observation.apply(states).flatten(1)

    # Forward mode needs no autograd graph. Under grad mode a trainable simulator parameter (a tuned forcing, a
    # closure) would make every step of the B x D tangent rollouts keep its inputs for a backward pass that never
    # comes: 20 MB per window for 51 states of Lorenz-96 K=40.
    with torch.no_grad():
        return torch.vmap(torch.func.jacfwd(outputs))(x.detach())


def gauss_newton_posterior(simulator: Simulator, observation: ObservationModel, x: Tensor, mask: Tensor,
                           lags: list[int], every: int, prior_var: Tensor) -> Tensor:
    r"""Laplace (Gauss-Newton) covariance of the state around ``x`` from the window's observations, as its lower
    Cholesky factor :math:`L` (:math:`C = L L^\top`).

    .. math:: C = \big(B^{-1} + \sum_{i} J_i^\top M_i^\top R^{-1} M_i J_i\big)^{-1},
        \quad J_i = \partial\, H\,\mathcal{M}^{(l_i)}(x) / \partial x,

    where ``l_i`` are the lags of the window's observations relative to the target (negative ones through
    :func:`time_reversed`; see :func:`observation_jacobians`), :math:`M_i` selects the observed entries and
    :math:`B = \mathrm{diag}` ``(prior_var)`` is a weak climatological background. Observations whose backward
    rollout is not finite are left out.

    The precision and the factor are computed in double precision whatever the dtype of ``x``: over a window of 25
    Lorenz-96 states the precision's condition number passes 1e8, beyond float32 (its Cholesky factorization then
    fails), and the factor of :math:`C` comes from the precision's (``torch.distributions``), without forming
    :math:`C`.

    Args:
        simulator: the dynamics (state = output, e.g. Lorenz-96).
        observation: the observation model.
        x: ``(B, D)`` the estimates (flat 1-D states).
        mask: ``(B, L, *obs)`` the masks at the lags.
        lags: ``L`` lags in saved states.
        every: simulator steps per saved state.
        prior_var: ``(D,)`` background variances.

    Returns:
        ``(B, D, D)`` lower Cholesky factors of the covariance matrices, in the dtype of ``x``.
    """
    J = observation_jacobians(simulator, observation, x.to(torch.float64), lags, every)  # (B, L, M, D)
    B, D = x.shape
    m = mask.flatten(2).bool()[..., None] & torch.isfinite(J).all(-1, keepdim=True)  # (B, L, M, 1)
    Jm = torch.where(m, J, torch.zeros((), dtype=J.dtype)).reshape(B, -1, D)
    precision = Jm.transpose(1, 2) @ Jm / observation.sigma**2 + torch.diag_embed(1.0 / prior_var.to(J.dtype))
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(B, D, dtype=J.dtype), precision_matrix=precision,
                                                      validate_args=False)
    return gaussian.scale_tril.to(x.dtype)


@torch.no_grad()
def forecast_rmse(simulator: Simulator, analysis: Tensor, truth: Tensor, every: int = 1) -> Tensor:
    """RMSE against truth by lead time of forecasts started from analyses.

    Args:
        simulator: the forecast model (e.g. the truncated model, with or without a learned closure).
        analysis: ``(B, *state)`` initial states.
        truth: ``(B, L + 1, *output)`` true outputs at lead times ``0..L`` saved states.
        every: simulator steps per saved state.

    Returns:
        ``(L + 1,)`` RMSE per lead time (over batch and values).
    """
    L = truth.shape[1] - 1
    fc = rollout_outputs(simulator, analysis, L, every, check=False)
    err = (fc - truth) ** 2
    return err.flatten(2).mean(-1).mean(0).sqrt()
