r"""The two reference points every assimilation method must beat: the climatological prior and a naive interpolation.

**Climatology** ignores the observations: the posterior of :math:`x_t` is the time-binned climatological Gaussian
:math:`\mathcal{N}(\mu(t), C(t))` (:class:`~sbida.baselines.climatology.Climatology`).

**Interpolation** spreads the observations of the target time over the grid with a periodic Gaussian kernel
(Nadaraya-Watson): with ``v = H^T (m \odot y)`` and ``w = H^T m`` lifted onto the grid,

.. math:: \hat x = \frac{k * v + \varepsilon\, \mu(t)}{k * w + \varepsilon},

where ``k`` is a periodic Gaussian of standard deviation ``width`` cells (by default a quarter of the mean spacing
of the observed points, ``(D / n_obs)^{1/d}``, per window) and ``epsilon`` (relative to the kernel's peak) falls back
to the climatological mean far from any observation. It is a point estimate (:class:`~sbida.posterior.PointPosterior`):
no dynamics, no uncertainty.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..posterior import GaussianPosterior, PointPosterior
from .base import Baseline

__all__ = ["ClimatologicalPrior", "Interpolation"]


class ClimatologicalPrior(Baseline):
    """The climatological Gaussian at the target time, whatever the observations (see the module)."""

    name = "climatology"
    integrates = False

    def posterior(self, y: Tensor, mask: Tensor, t: Tensor) -> GaussianPosterior:
        """Gaussian ``N(mu(t), C(t))`` for windows ``y, mask (B, T, *obs_shape)``, ``t (B,)`` (only ``t`` is used)."""
        _, _, t = self.check_windows(y, mask, t)
        mu, C = self._clim().moments(t)
        tril = torch.linalg.cholesky(0.5 * (C + C.mT))
        post = GaussianPosterior(mu.to(y.dtype).reshape(-1, *self.state_shape), scale_tril=tril.to(y.dtype))
        post.info = {"method": self.name, "observation_times": []}
        return post


class Interpolation(Baseline):
    """Kernel interpolation of the target time's observations onto the grid (see the module).

    Args:
        width: kernel standard deviation in cells (``None``: a quarter of the mean spacing of the observed points).
        floor: weight of the climatological mean, relative to the kernel's peak.
        Others: as :class:`~sbida.baselines.base.Baseline`.
    """

    name = "interpolation"
    integrates = False

    def __init__(self, *args, width: float | None = None, floor: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        if width is not None and not width > 0:
            raise ValueError(f"width must be positive (cells), got {width}")
        if not floor > 0:
            raise ValueError(f"floor must be positive, got {floor}")
        self.width, self.floor = width, float(floor)
        self.grid = self.state_shape if len(self.state_shape) == 1 else self.state_shape[1:]

    def _smooth(self, f: Tensor, width: Tensor) -> Tensor:
        """Periodic Gaussian smoothing of ``f (B, C, *grid)`` with per-window widths ``(B,)`` (kernel peak 1)."""
        dims = tuple(range(-len(self.grid), 0))
        d2 = 0
        for i, g in enumerate(self.grid):
            d = torch.arange(g, dtype=torch.float64)
            d = torch.minimum(d, g - d)  # periodic distance to cell 0
            shape = [1] * len(self.grid)
            shape[i] = g
            d2 = d2 + d.reshape(shape) ** 2
        s = width.reshape(-1, 1, *([1] * len(self.grid)))
        kernel = torch.exp(-0.5 * d2 / s**2)  # (B, 1, *grid), sampled in space: non-negative, no ringing
        return torch.fft.ifftn(torch.fft.fftn(f, dim=dims) * torch.fft.fftn(kernel, dim=dims), dim=dims).real

    def posterior(self, y: Tensor, mask: Tensor, t: Tensor) -> PointPosterior:
        """Interpolated states ``(B, *state_shape)`` from windows ``y, mask (B, T, *obs_shape)`` and ``t (B,)``."""
        yf, mf, t = self.check_windows(y, mask, t)
        j = self.target_index
        B = len(t)
        m = mf[:, j].to(torch.float64)
        v = (m * yf[:, j].to(torch.float64)) @ self.H  # (B, D)
        w = m @ self.H
        C = 1 if len(self.state_shape) == 1 else self.state_shape[0]
        shape = (B, C, *self.grid)
        if self.width is None:
            points = (w.reshape(shape).sum(1) > 0).flatten(1).sum(1).clamp_min(1)  # observed grid points
            width = 0.25 * (math.prod(self.grid) / points.to(torch.float64)) ** (1 / len(self.grid))
        else:
            width = torch.full((B,), float(self.width), dtype=torch.float64)
        mu, _ = self._clim().moments(t)
        num = self._smooth(v.reshape(shape), width).reshape(B, -1) + self.floor * mu
        den = self._smooth(w.reshape(shape), width).reshape(B, -1) + self.floor
        post = PointPosterior((num / den).to(y.dtype).reshape(B, *self.state_shape))
        post.info = {"method": self.name, "observation_times": [0]}
        return post
