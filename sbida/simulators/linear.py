r"""A linear-Gaussian system whose posterior is known exactly.

Linear advection-diffusion on a periodic grid of :math:`K` cells: one step shifts the field by an integer number
of cells and damps Fourier mode :math:`k` by :math:`e^{-\kappa k^2}`,

.. math:: x_{s+1} = A x_s, \qquad A = D S, \qquad x_0 \sim \mathcal{N}(0, \Sigma_0),

with :math:`\Sigma_0` stationary (diagonal in Fourier space, spectrum :math:`\propto (1 + k^2\ell^2)^{-2}`).
The shift is an integer number of cells and the diffusion weak, so :math:`A` stays well conditioned over a window
(a fractional Fourier shift with the Nyquist mode makes it nearly singular).

With observations :math:`y_j = H x_{s_j} + \sigma\varepsilon_j` at the times of a window, the posterior of the state
at the window's start :math:`x_{s_0}` is Gaussian; :func:`gaussian_window_posterior` computes it in information
form with the observation operators :math:`G_j = H A^{s_j - s_0}` (rows of missing values zeroed),

.. math:: P^{-1} = P_0^{-1} + \sigma^{-2} \sum_j G_j^\top G_j, \qquad
          P^{-1} m = P_0^{-1} m_0 + \sigma^{-2} \sum_j G_j^\top y_j,

and pushes it to the target time, :math:`\mathcal{N}(A^d m, A^d P A^{d\top})`. With deterministic dynamics this is
the exact Kalman filter (target at the window's end) or smoother (target inside the window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Simulator

__all__ = ["LinearGaussian", "gaussian_window_posterior"]


class LinearGaussian(Simulator):
    """Linear advection-diffusion ``x_{s+1} = A x_s`` on ``K`` periodic cells with a Gaussian initial state.

    Args:
        K: number of cells.
        shift: cells the field moves by at each step (an integer, so that ``A`` is well conditioned).
        diffusion: ``kappa``: Fourier mode of angular wavenumber ``k`` (radians per cell) is damped by
            ``exp(-kappa k^2)`` per step.
        length_scale: correlation length of the initial field, in cells.
        init_std: marginal standard deviation of the initial field.
        dt: time of one step.
    """

    def __init__(self, K: int = 32, shift: int = 1, diffusion: float = 0.005, length_scale: float = 2.0,
                 init_std: float = 1.0, dt: float = 1.0):
        super().__init__()
        if K < 2:
            raise ValueError(f"LinearGaussian needs K >= 2, got {K}")
        if int(shift) != shift:
            raise ValueError(f"shift must be an integer number of cells (a fractional shift makes the propagator "
                             f"nearly singular), got {shift}")
        if diffusion < 0 or length_scale <= 0 or init_std <= 0 or dt <= 0:
            raise ValueError("diffusion must be >= 0 and length_scale, init_std, dt > 0")
        self.K, self.shift, self.diffusion = int(K), int(shift), float(diffusion)
        self.length_scale, self.init_std, self.dt = float(length_scale), float(init_std), float(dt)
        self.state_shape = (self.K,)
        k = 2 * math.pi * torch.fft.rfftfreq(self.K, dtype=torch.float64)  # radians per cell
        spectrum = (1 + (k * self.length_scale) ** 2) ** -2.0
        # Fourier multipliers of one step and of the initial covariance, as K x K real matrices
        eye = torch.eye(self.K, dtype=torch.float64)
        damp = torch.exp(-self.diffusion * k**2)
        A = torch.fft.irfft(torch.fft.rfft(torch.roll(eye, self.shift, dims=0), dim=0) * damp[:, None], n=self.K,
                            dim=0)
        C = torch.fft.irfft(torch.fft.rfft(eye, dim=0) * spectrum[:, None], n=self.K, dim=0)
        C = C * (self.init_std**2 / C.diagonal().mean())
        self.register_buffer("A", A)  # (K, K), float64
        self.register_buffer("prior_cov", 0.5 * (C + C.T))  # (K, K), Sigma_0
        self.register_buffer("prior_chol", torch.linalg.cholesky(self.prior_cov + 1e-12 * eye))

    def step(self, x: Tensor) -> Tensor:
        return x @ self.A.to(x.dtype).T

    def initial_state(self, n, generator=None, dtype=None, device=None) -> Tensor:
        z = torch.randn(n, self.K, generator=generator, dtype=torch.float64, device=device)
        return (z @ self.prior_chol.to(z.device).T).to(dtype or torch.get_default_dtype())

    def propagator(self, steps: int) -> Tensor:
        """``A^steps``, ``(K, K)`` in float64."""
        return torch.linalg.matrix_power(self.A, int(steps))

    def prior(self, steps: int) -> tuple[Tensor, Tensor]:
        """Mean ``(K,)`` and covariance ``(K, K)`` of ``x_steps`` (zero mean, ``A^s Sigma_0 A^{s T}``), float64."""
        As = self.propagator(steps)
        return torch.zeros(self.K, dtype=torch.float64, device=As.device), As @ self.prior_cov @ As.T

    def exact_posterior(self, y: Tensor, mask: Tensor, t: Tensor, obs, offsets: Sequence[int], every: int = 1,
                        burn_in: int = 0) -> tuple[Tensor, Tensor]:
        """Exact posterior of the target state of windows of observations.

        Args:
            y: observations ``(B, T, *obs_shape)``, zeros where missing.
            mask: boolean mask ``(B, T, *obs_shape)``.
            t: times of the targets ``(B,)``, on the dataset's clock (``t = 0`` at its first saved state).
            obs: the (linear) observation model that made ``y``.
            offsets: the window's times relative to the target, in saved states (``T`` integers, increasing).
            every: simulator steps per saved state.
            burn_in: simulator steps run from the draw of ``x_0`` before the first saved state (the dataset's
                ``meta["burn_in"]``): the prior of a window's start is that of ``x_0`` propagated by them too.

        Returns:
            Mean ``(B, K)`` and covariance ``(B, K, K)`` in float64.
        """
        if int(burn_in) != burn_in or burn_in < 0:
            raise ValueError(f"burn_in must be an integer >= 0, got {burn_in}")
        steps = torch.round(torch.as_tensor(t, dtype=torch.float64) / self.dt).long() + int(burn_in)
        start = steps + offsets[0] * every
        if (start < 0).any():
            raise ValueError("a window starts before x_0 was drawn; check t, burn_in and the offsets")
        H = obs.matrix(dtype=torch.float64, device=y.device)
        mean = torch.empty(y.shape[0], self.K, dtype=torch.float64, device=y.device)
        cov = torch.empty(y.shape[0], self.K, self.K, dtype=torch.float64, device=y.device)
        for s in torch.unique(start).tolist():  # windows with the same start share their prior
            i = (start == s).nonzero().squeeze(-1)
            m0, P0 = self.prior(s)
            m, P = gaussian_window_posterior(y[i], mask[i], m0, P0, self.A, H, obs.sigma,
                                             [(o - offsets[0]) * every for o in offsets], -offsets[0] * every)
            mean[i], cov[i] = m, P
        return mean, cov


def gaussian_window_posterior(y: Tensor, mask: Tensor, m0: Tensor, P0: Tensor, A: Tensor, H: Tensor,
                              sigma: float, obs_steps: Sequence[int], target_step: int) -> tuple[Tensor, Tensor]:
    """Posterior of ``x_target`` given a window, for deterministic linear dynamics (float64).

    Args:
        y: ``(B, T, *obs_shape)`` observations (zeros where missing).
        mask: ``(B, T, *obs_shape)`` boolean mask.
        m0, P0: prior mean ``(D,)`` and covariance ``(D, D)`` of the state at step 0 (the window's start).
        A: one-step propagator ``(D, D)``.
        H: observation matrix ``(M, D)``.
        sigma: observation noise standard deviation.
        obs_steps: step of each of the ``T`` observation times, relative to the window's start.
        target_step: step of the target state, relative to the window's start.

    Returns:
        Mean ``(B, D)`` and covariance ``(B, D, D)``.
    """
    B, T = y.shape[:2]
    G = torch.stack([H @ torch.linalg.matrix_power(A, int(s)) for s in obs_steps])  # (T, M, D)
    yf = y.reshape(B, T, -1).to(torch.float64)
    mf = mask.reshape(B, T, -1).to(torch.float64)
    L0 = torch.linalg.cholesky(P0)
    P0_inv = torch.cholesky_inverse(L0)
    precision = P0_inv + torch.einsum("tmd,btm,tme->bde", G, mf, G) / sigma**2
    info = P0_inv @ m0 + torch.einsum("tmd,btm->bd", G, mf * yf) / sigma**2
    L = torch.linalg.cholesky(precision)
    m = torch.cholesky_solve(info[..., None], L).squeeze(-1)
    P = torch.cholesky_inverse(L)
    Ad = torch.linalg.matrix_power(A, int(target_step))
    m = m @ Ad.T
    P = Ad @ P @ Ad.T
    return m, 0.5 * (P + P.mT)
