r"""Time-dependent climatology: the distribution of the state at time :math:`t` before any observation.

The tasks start from a random initial state at :math:`t = 0` and include the transient, so the prior of a state
depends on its time. The training trajectories are cut into bins of ``width`` consecutive saved states (every
trajectory contributes ``width`` states to a bin), and each bin :math:`k` gets the sample mean and covariance

.. math:: \mu_k = \frac{1}{n} \sum_i x_i, \qquad
          C_k = \frac{1}{n - 1} \sum_i (x_i - \mu_k)(x_i - \mu_k)^\top + \epsilon\, \tfrac{\operatorname{tr} C}{D} I,

over its :math:`n = N \cdot \text{width}` states (a tiny ridge :math:`\epsilon` keeps :math:`C_k` invertible). The
width is the smallest that gives every bin at least ``min_samples`` states (by default ``10 D``), so with many
trajectories each saved time has its own bin and the transient is resolved. A time is served by the bin whose centre
is nearest; beyond the last bin the statistics are taken as stationary (the last bin's).

Data that start on the attractor (a spin-up: ``burn_in > 0`` in the dataset's ``meta``) are stationary, and by
default one bin pools all their states: a covariance estimated from :math:`n` states has relative errors of about
:math:`\sqrt{D / n}`, and with 40 training trajectories the bins of :math:`10 D` (nearly equal, consecutive) states
left 4D-Var's RMSE on ``lorenz96-sparse`` a third higher, 0.341 against 0.253 (``benchmarks/RESULTS.md``).

Samples at a time are either training states of that bin drawn at random (``"empirical"``, which keeps the
non-Gaussian shape of the attractor) or Gaussian draws from :math:`(\mu_k, C_k)`; a Gaussian ensemble can be
*moment matched* (its sample mean and covariance are exactly :math:`\mu_k, C_k`, for ``n > D``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Climatology"]


class Climatology:
    """Mean, covariance and samples of the state as functions of time (binned).

    Args:
        times: ``(nb,)`` the time at the centre of each bin (increasing).
        mean: ``(nb, D)`` mean of the flattened state in each bin.
        cov: ``(nb, D, D)`` covariance in each bin.
        samples: optional ``(nb, n, D)`` states of each bin (for empirical draws).
        state_shape: shape of one state (defaults to ``(D,)``).
    """

    def __init__(self, times: Tensor, mean: Tensor, cov: Tensor, samples: Tensor | None = None,
                 state_shape: tuple[int, ...] | None = None):
        times = torch.as_tensor(times, dtype=torch.float64)
        nb = times.shape[0] if times.dim() == 1 else -1
        if times.dim() != 1 or nb < 1 or mean.dim() != 2 or mean.shape[0] != nb:
            raise ValueError(f"expected times (nb,) and mean (nb, D) with nb >= 1, got {tuple(times.shape)} and "
                             f"{tuple(mean.shape)}")
        D = mean.shape[1]
        if tuple(cov.shape) != (nb, D, D):
            raise ValueError(f"cov must be (nb, D, D) = ({nb}, {D}, {D}), got {tuple(cov.shape)}")
        if samples is not None and (samples.dim() != 3 or samples.shape[0] != nb or samples.shape[2] != D):
            raise ValueError(f"samples must be (nb, n, D) = ({nb}, n, {D}), got {tuple(samples.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("the climatological mean or covariance contains NaN or infinite values")
        if nb > 1 and not (times[1:] > times[:-1]).all():
            raise ValueError("the bin times must be increasing")
        self.times = times
        self.mean_, self.cov_ = mean.to(torch.float64), cov.to(torch.float64)
        self.samples = samples
        self.state_shape = tuple(state_shape) if state_shape is not None else (D,)
        if math.prod(self.state_shape) != D:
            raise ValueError(f"state_shape {self.state_shape} does not hold D={D} values")
        self.chol_ = torch.linalg.cholesky(0.5 * (self.cov_ + self.cov_.mT))

    @property
    def dim(self) -> int:
        """Number of values ``D`` of a flattened state."""
        return self.mean_.shape[1]

    @classmethod
    def fit(cls, dataset, width: int | None = None, min_samples: int | None = None, ridge: float = 1e-6,
            keep_samples: bool = True, stationary: bool | None = None) -> Climatology:
        """Estimate the binned climatology from a dataset's trajectories.

        Args:
            dataset: a :class:`~sbida.data.WindowDataset` (its ``states`` ``(N, S, *state_shape)`` and ``times``).
            width: saved states per bin; by default all of them where ``stationary``, else the smallest giving
                ``min_samples`` states per bin.
            min_samples: states wanted per bin (default ``10 D``).
            stationary: one bin of every state (when ``width`` is not given); default: whether the dataset's
                trajectories had a spin-up (``dataset.meta["burn_in"] > 0``).
            ridge: relative ridge added to each covariance (times its mean variance).
            keep_samples: keep the states of each bin for empirical draws.

        Returns:
            A :class:`Climatology`.
        """
        states, times = dataset.states, dataset.times
        N, S = states.shape[:2]
        state_shape = tuple(states.shape[2:])
        D = math.prod(state_shape)
        if N < 2:
            raise ValueError(f"a climatology needs at least 2 trajectories, got {N}")
        if not torch.isfinite(states).all():
            raise ValueError("the dataset's states contain NaN or infinite values")
        min_samples = 10 * D if min_samples is None else int(min_samples)
        if stationary is None:
            stationary = int((getattr(dataset, "meta", None) or {}).get("burn_in", 0)) > 0
        if width is None:
            width = S if stationary else max(1, math.ceil(min_samples / N))
        width = int(width)
        if width < 1:
            raise ValueError(f"width must be >= 1 saved state, got {width}")
        width = min(width, S)
        nb = math.ceil(S / width)
        starts = torch.tensor([min(k * width, S - width) for k in range(nb)])  # the last bin ends at S
        idx = starts[:, None] + torch.arange(width)  # (nb, width)
        x = states.reshape(N, S, D).to(torch.float64)[:, idx]  # (N, nb, width, D)
        x = x.permute(1, 0, 2, 3).reshape(nb, N * width, D)
        mean = x.mean(1)
        xc = x - mean[:, None]
        cov = xc.mT @ xc / (N * width - 1)
        scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        cov = cov + ridge * scale[:, None, None] * torch.eye(D, dtype=torch.float64)
        bin_times = times.to(torch.float64)[idx].mean(1)
        samples = x.to(states.dtype) if keep_samples else None
        return cls(bin_times, mean, cov, samples, state_shape)

    def index(self, t: Tensor) -> Tensor:
        """Bin serving each time (the nearest bin centre): ``(B,)`` times -> ``(B,)`` long."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(t).all():
            raise ValueError("times must be finite")
        if len(self.times) == 1:
            return torch.zeros(len(t), dtype=torch.long)
        mid = 0.5 * (self.times[1:] + self.times[:-1])
        return torch.searchsorted(mid, t)

    def moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(B, D)`` and covariance ``(B, D, D)`` (float64) at times ``t`` ``(B,)``."""
        k = self.index(t)
        return self.mean_[k], self.cov_[k]

    def sample(self, t: Tensor, n: int, generator: torch.Generator | None = None, kind: str = "empirical",
               moment_match: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``n`` climatological states for each time.

        Args:
            t: ``(B,)`` times.
            n: draws per time.
            generator: random generator.
            kind: ``"empirical"`` (training states of the bin, distinct where the bin holds at most ``100 n``
                states, else with replacement: fewer than ``n / 200`` repeated pairs expected; needs stored
                samples) or ``"gaussian"``.
            moment_match: (Gaussian) make the draws' sample mean and covariance exactly the bin's (needs
                ``n > D``).
            dtype: dtype of the result.

        Returns:
            ``(n, B, D)`` flattened states.
        """
        if kind not in ("empirical", "gaussian"):
            raise ValueError(f"kind must be 'empirical' or 'gaussian', got {kind!r}")
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        k = self.index(t)
        B, D = len(k), self.dim
        if kind == "empirical":
            if self.samples is None:
                raise ValueError("this climatology keeps no samples; use kind='gaussian' or fit with keep_samples")
            pool = self.samples.shape[1]
            if n <= pool <= 100 * n:  # distinct members: n of a random ordering of the bin, per time
                j = torch.rand(B, pool, generator=generator).topk(n, dim=1).indices.T
            else:
                j = torch.randint(pool, (n, B), generator=generator)
            return self.samples[k[None, :], j].to(dtype)
        z = torch.randn(n, B, D, generator=generator, dtype=torch.float64)
        if moment_match:
            if n <= D:
                raise ValueError(f"moment matching needs more draws than dimensions, got n={n} <= D={D}")
            z = z - z.mean(0)
            Lz = torch.linalg.cholesky(torch.einsum("nbi,nbj->bij", z, z) / (n - 1))
            z = torch.linalg.solve_triangular(Lz, z.permute(1, 2, 0), upper=False).permute(2, 0, 1)
        x = self.mean_[k] + torch.einsum("bij,nbj->nbi", self.chol_[k], z)
        return x.to(dtype)

    def __repr__(self) -> str:
        return f"Climatology(bins={len(self.times)}, D={self.dim}, t in [{self.times[0]:.3g}, {self.times[-1]:.3g}])"
