r"""Variance-preserving diffusion with a cosine schedule, and its sampler (DDIM-like predictor, Langevin corrector).

A state ``x`` (standardized) is diffused to time ``s in [0, 1]`` as

.. math:: x_s = \mu_s x + \sigma_s \varepsilon, \qquad \varepsilon \sim \mathcal{N}(0, I), \qquad
          \mu_s = \cos\theta_s, \quad \sigma_s = \sin\theta_s, \quad
          \theta_s = \theta_{\min} + s (\theta_{\max} - \theta_{\min}),

so that ``mu_s^2 + sigma_s^2 = 1`` (variance preserving); ``x_0`` is the data up to a noise ``sin(theta_min)`` and
``x_1`` is nearly ``N(0, I)``. A network :math:`\hat\varepsilon(x_s, s)` trained by denoising score matching,
``E || eps_hat(mu_s x + sigma_s eps, s) - eps ||^2``, gives the score
:math:`\nabla \log p_s(x_s) = -\hat\varepsilon / \sigma_s` and the denoiser (Tweedie)
:math:`\hat x_0 = (x_s - \sigma_s \hat\varepsilon) / \mu_s`.

Sampling integrates from ``s = 1`` to ``0`` on the grid ``s_i = (1 - i / steps)^2`` (finer at low noise).
The predictor is the deterministic DDIM
update :math:`x_{s'} = \mu_{s'} \hat x_0 + \sigma_{s'} \hat\varepsilon`; after each predictor step but the last,
``corrections`` Langevin steps at ``s'``

.. math:: x \leftarrow x + h \nabla \log p_{s'}(x) + \sqrt{2h}\, z, \qquad h = \tau \sigma_{s'}^2

move the samples towards ``p_{s'}`` (Song et al., 2021; Rozet & Louppe, 2023). The step is ``tau`` times the
squared noise scale, itself at most the variance of ``p_{s'}`` along any direction, so that the stationary
variance of the discretized Langevin chain exceeds the target's by a factor at most ``1 / (1 - tau / 2)`` on
Gaussians (a step normalized by the mean squared score instead grows far larger at low noise on tight
posteriors and inflates them).

The deterministic predictor, though, narrows a Gaussian wherever its signal-to-noise ratio changes much within one
step, i.e. in the directions whose variance ``v`` (standardized) the grid's last steps pass: with the exact noise of
``N(0, v)`` (20 000 draws), 16 steps and one correction at ``tau = 0.4`` (PosteriorScore's defaults) draw variances
0.69 v, 0.82 v, 0.94 v, 1.00 v and 1.02 v at ``v = 1e-4, 1e-3, 1e-2, 0.1, 1``; 32 steps 0.90 v, 0.97 v, 1.02 v,
1.04 v, 1.03 v (``benchmarks/RESULTS.md``). Posteriors much tighter than the prior in some directions want more
steps; on ``lorenz96`` K=40 (posterior variances mostly above 0.01) the grid ``(i / steps)^3`` gave a PosteriorScore
the same calibration as the default ``(i / steps)^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CosineSchedule", "sample_vp", "dsm_loss"]

RHO = 2.0  # the grid of diffusion times is (i / steps) ** RHO: finer steps at low noise


class CosineSchedule:
    """The VP cosine schedule ``mu_s = cos(theta_s)``, ``sigma_s = sin(theta_s)``.

    Args:
        sigma_min: noise scale at ``s = 0`` (``theta_min = asin(sigma_min)``).
        mu_min: signal scale at ``s = 1`` (``theta_max = acos(mu_min)``); not much smaller than ``1e-2``, since the
            first predictor step divides by it.
    """

    def __init__(self, sigma_min: float = 1e-3, mu_min: float = 2e-2):
        if not (0 < sigma_min < 0.1 and 0 < mu_min < 0.1):
            raise ValueError(f"sigma_min and mu_min must be in (0, 0.1), got {sigma_min} and {mu_min}")
        self.theta_min, self.theta_max = math.asin(sigma_min), math.acos(mu_min)

    def theta(self, s: Tensor) -> Tensor:
        return self.theta_min + s * (self.theta_max - self.theta_min)

    def mu(self, s: Tensor) -> Tensor:
        """Signal scale ``(...)`` at diffusion times ``s (...)``."""
        return torch.cos(self.theta(s))

    def sigma(self, s: Tensor) -> Tensor:
        """Noise scale ``(...)`` at diffusion times ``s (...)``."""
        return torch.sin(self.theta(s))


def dsm_loss(eps_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, schedule: CosineSchedule,
             rho: float = 1.0) -> Tensor:
    """Denoising score matching loss (noise prediction) of a batch of standardized states.

    Args:
        eps_fn: ``(x_s (B, *state), s (B,)) -> eps_hat (B, *state)``.
        x: clean states ``(B, *state)``.
        schedule: the diffusion schedule.
        rho: diffusion times are drawn as ``s = u ** rho``, ``u ~ U(0, 1)``; ``rho > 1`` puts more weight on low
            noise (the fine structure of tight posteriors), as the sampler's grid does.

    Returns:
        The scalar ``mean || (eps_hat - eps) / mu_s ||^2`` with ``s = u ** rho`` (the loss of ``v = mu eps - sigma
        x``, which weighs the noise levels so that the denoised state ``x_0 = (x_s - sigma eps) / mu`` is as accurate
        near ``s = 1`` as elsewhere).
    """
    if not 0 < rho < math.inf:
        raise ValueError(f"rho must be positive and finite, got {rho}")
    B = x.shape[0]
    s = torch.rand(B, dtype=x.dtype, device=x.device) ** rho
    eps = torch.randn_like(x)
    shape = (B,) + (1,) * (x.dim() - 1)
    xs = schedule.mu(s).reshape(shape) * x + schedule.sigma(s).reshape(shape) * eps
    return ((eps_fn(xs, s) - eps) / schedule.mu(s).reshape(shape)).square().mean()


def sample_vp(eps_fn: Callable[[Tensor, Tensor], Tensor], shape: tuple[int, ...], schedule: CosineSchedule,
              steps: int = 64, corrections: int = 1, tau: float = 0.1, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Draw samples by the DDIM-like predictor with Langevin corrector, from ``s = 1`` to ``s = 0``.

    Args:
        eps_fn: ``(x_s (N, *state), s (N,)) -> eps_hat (N, *state)``, the noise prediction (of a conditional,
            composed or guided score).
        shape: ``(N, *state)``, the samples drawn.
        schedule: the diffusion schedule.
        steps: predictor steps (``>= 1``).
        corrections: Langevin steps after each predictor step but the last (``>= 0``).
        tau: Langevin step scale (``> 0``).
        generator: random generator of the initial noise and of the Langevin noise.

    Returns:
        Samples ``(N, *state)`` (standardized units).
    """
    if steps < 1 or corrections < 0 or tau <= 0:
        raise ValueError(f"need steps >= 1, corrections >= 0 and tau > 0, got {steps}, {corrections}, {tau}")
    N = shape[0]
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype, device=device) ** RHO
    for i in range(steps):
        s, s_next = grid[i].expand(N), grid[i + 1].expand(N)
        mu, sigma = schedule.mu(s[0]), schedule.sigma(s[0])
        mu_n, sigma_n = schedule.mu(s_next[0]), schedule.sigma(s_next[0])
        eps = eps_fn(x, s)
        x0 = (x - sigma * eps) / mu
        x = mu_n * x0 + sigma_n * eps
        if i == steps - 1:
            break
        for _ in range(corrections):
            eps = eps_fn(x, s_next)
            z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
            x = x - (tau * sigma_n) * eps + math.sqrt(2 * tau) * sigma_n * z
    return x
