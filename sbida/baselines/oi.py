r"""Optimal interpolation: the climatological prior at the target time updated by the observation at that time.

With the climatological mean :math:`\mu_t` and covariance :math:`C_t` of the state at the target time :math:`t` and
the observed entries :math:`o` of :math:`y_t` (operator rows :math:`H_o`, noise :math:`\sigma`), the posterior is
Gaussian,

.. math:: K = C_t H_o^\top (H_o C_t H_o^\top + \sigma^2 I)^{-1}, \qquad
          m = \mu_t + K (y_o - H_o \mu_t), \qquad P = (I - K H_o) C_t,

computed in information form over all entries with the mask as weights (an unobserved entry has weight 0),

.. math:: P^{-1} = C_t^{-1} + \sigma^{-2} H^\top \operatorname{diag}(m_t) H, \qquad
          P^{-1} m = C_t^{-1} \mu_t + \sigma^{-2} H^\top \operatorname{diag}(m_t)\, y_t .

Only the observation at the target time is used (the other times of the window are ignored: OI has no dynamics);
a window with no observed value at the target time gets the climatology.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..posterior import GaussianPosterior
from .base import Baseline

__all__ = ["OI"]


class OI(Baseline):
    """Optimal interpolation with the time-binned climatological mean and covariance (see the module).

    Args: as :class:`~sbida.baselines.base.Baseline`.
    """

    name = "oi"
    integrates = False

    def posterior(self, y: Tensor, mask: Tensor, t: Tensor) -> GaussianPosterior:
        """Gaussian posterior of the target states.

        Args:
            y: ``(B, T, *obs_shape)`` observations; only time ``offsets.index(0)`` is used.
            mask: ``(B, T, *obs_shape)`` mask.
            t: ``(B,)`` target times.

        Returns:
            A :class:`~sbida.posterior.GaussianPosterior` with full covariances (as Cholesky factors ``(B, D, D)``).
        """
        yf, mf, t = self.check_windows(y, mask, t)
        mu, C = self._clim().moments(t)
        j = self.target_index
        w = mf[:, j].to(torch.float64) / self.sigma**2  # (B, P)
        H = self.H
        Lc = torch.linalg.cholesky(C)
        C_inv = torch.cholesky_inverse(Lc)
        precision = C_inv + torch.einsum("pd,bp,pe->bde", H, w, H)
        info = (C_inv @ mu[..., None]).squeeze(-1) + (w * yf[:, j].to(torch.float64)) @ H
        L = torch.linalg.cholesky(0.5 * (precision + precision.mT))
        mean = torch.cholesky_solve(info[..., None], L).squeeze(-1)
        cov = torch.cholesky_inverse(L)
        tril = torch.linalg.cholesky(0.5 * (cov + cov.mT))
        dtype = y.dtype
        post = GaussianPosterior(mean.to(dtype).reshape(-1, *self.state_shape), scale_tril=tril.to(dtype))
        post.info = {"method": self.name, "observation_times": [0]}
        return post
